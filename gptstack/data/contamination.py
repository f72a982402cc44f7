"""Test-set contamination, the GPT-3 method (Brown et al. 2020, appendix C): an eval item is "dirty"
when any of its word n-grams also occurs in the training data. Text is lower-cased and cut into words
(punctuation dropped). n is 13 by default; `ngram=None` applies appendix C's refinement, n = the 5th
percentile of the task's item lengths in words clamped to [8, 13], so tasks of short items are not
all called clean by construction. Items shorter than n words
(at most ~5% of a task) cannot be tested this way; they count as clean and are reported as `too_short`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptstack.data.dedup import ngram_hashes, normalize, word_hashes
from gptstack.data.shards import open_shards, read_manifest
from gptstack.files import iter_jsonl
from gptstack.tokenizer import get_tokenizer


def item_text(record) -> str:
    """All string values of a task record (question, context, choices, answers), joined."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return "\n".join(item_text(v) for v in record.values())
    if isinstance(record, list):
        return "\n".join(item_text(v) for v in record)
    return ""


def read_task(path: str | Path) -> list[str]:
    """The text of each item of a JSONL task file (any JSON value per line; see item_text)."""
    items = [item_text(row) for _, row in iter_jsonl(path, ValueError, objects=False)]
    if not items:
        raise ValueError(f"{path} has no items")
    return items


def task_ngram(items: list[list[str]]) -> int:
    lengths = [len(w) for w in items] or [13]
    return int(np.clip(np.percentile(lengths, 5), 8, 13))


def training_ngrams(texts: Iterable[str], sizes: set[int]) -> dict[int, np.ndarray]:
    """Sorted unique n-gram hashes of the training text, for each n in `sizes`."""
    parts: dict[int, list[np.ndarray]] = {n: [] for n in sizes}
    for text in texts:
        h = word_hashes(normalize(text))
        for n in sizes:
            if len(h) >= n:
                parts[n].append(np.unique(ngram_hashes(h, n)))
    return {n: np.unique(np.concatenate(p)) if p else np.zeros(0, np.uint64) for n, p in parts.items()}


def shard_documents(folder: str | Path, splits: tuple[str, ...] = ("train",)) -> Iterable[str]:
    """The documents of a shard folder, decoded with its own tokenizer (split at <|endoftext|>)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    tok = get_tokenizer(folder / manifest["tokenizer"]["folder"])
    for split in splits:
        carry = np.zeros(0, dtype=np.int64)
        for shard in open_shards(folder, split):
            tokens = np.concatenate([carry, np.asarray(shard, dtype=np.int64)])
            ends = np.flatnonzero(tokens == tok.eot_id)
            start = 0
            for end in ends:
                yield tok.decode(tokens[start:end].tolist())
                start = end + 1
            carry = tokens[start:]


def occurs(hashes: np.ndarray, index: np.ndarray) -> bool:
    """Whether any of `hashes` is in the sorted array `index`: a binary search per hash, since
    np.isin would sort the whole training index again for every item."""
    if not len(index) or not len(hashes):
        return False
    at = np.minimum(np.searchsorted(index, hashes), len(index) - 1)
    return bool((index[at] == hashes).any())


def contamination_report(
    train_texts: Iterable[str], tasks: dict[str, list[str]], ngram: int | None = 13
) -> dict[str, dict]:
    """Per task: items, the n used, and which items overlap the training text."""
    words = {name: [normalize(t) for t in items] for name, items in tasks.items()}
    sizes = {name: ngram or task_ngram(w) for name, w in words.items()}
    index = training_ngrams(train_texts, set(sizes.values()))
    report = {}
    for name, items in words.items():
        n = sizes[name]
        dirty = [i for i, w in enumerate(items) if len(w) >= n and occurs(ngram_hashes(word_hashes(w), n), index[n])]
        report[name] = {"items": len(items), "ngram": n, "dirty": len(dirty), "dirty_fraction": len(dirty) / len(items),
                        "too_short": sum(len(w) < n for w in items),
                        "dirty_items": dirty}  # fmt: skip
    return report


@dataclass
class ContaminationConfig:
    dir: str  # shard folder (its train split is the training data)
    tasks: list[str]  # task JSONL files
    ngram: str = "13"  # n-gram length, or 'auto' for GPT-3 appendix C's per-task n
    out: str | None = None  # write the full report (with dirty item indices) as JSON


def contamination_of_shards(cfg: ContaminationConfig) -> dict[str, dict]:
    """`gptstack data contamination`: contamination_report of the task files against the shards
    (written to cfg.out as JSON when given)."""
    if cfg.ngram != "auto" and not cfg.ngram.isdigit():
        raise ValueError(f"--ngram must be a number or 'auto', got {cfg.ngram!r}")
    tasks = {Path(t).stem: read_task(t) for t in cfg.tasks}
    report = contamination_report(shard_documents(cfg.dir), tasks, None if cfg.ngram == "auto" else int(cfg.ngram))
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, indent=1))
    return report
