"""Visual question answering: `gptstack eval CKPT --tasks vqa:FILE.jsonl [--blind]`.

Each row of FILE (the image JSONL format of data/images.py: images + messages, the answer the last
assistant message) is answered by the checkpoint's LM with its vision tower: the conversation without
the answer goes through the model's chat template with each `<image>` marker replaced by a placeholder
run (vision.render_image_chat), the tower's rows are spliced in at those positions, and a greedy
generation of at most VQA_MAX_TOKENS tokens (bounded further by --max-gen-tokens) is cut at the first
line and compared with the answer by exact match after `normalize_answer` (case, spaces, quotes,
trailing punctuation, a leading article, number words and number formats: "Three." = "3" = "3.0").

Accuracy is reported per family (the rows' `family`), with two baselines beside it:
- blind (`--blind`): the same items with every image and its marker removed, so the model answers from
  the question alone; it needs no vision tower. A model that truly looks scores far above it.
- chance: the accuracy of always answering the family's most common answer in FILE, the best any
  image-blind constant answer can do (1/K for K balanced answers).

A checkpoint without a vision tower can only be scored `--blind`; asked for image answers it is refused.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from gptstack.checkpoint import load_vision
from gptstack.data.images import IMAGE_MARKER, answer_of, read_image_rows
from gptstack.eval.tasks import TaskError, normalize_number
from gptstack.infer.engine import Completion, Engine, EngineConfig, place_images
from gptstack.infer.sampling import SamplingParams
from gptstack.model import GPT
from gptstack.vision import (
    ImageError,
    VisionConfig,
    VisionTower,
    decode_image,
    image_digest,
    preprocess,
    render_image_chat,
)

PREFIX = "vqa:"
VQA_MAX_TOKENS = 24  # answers are a word or a number; an untrained model that never stops costs this much
CHUNK = 64  # rows whose preprocessed pixels are held at once
NUMBER_WORDS = {w: str(i) for i, w in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"))}  # fmt: skip
_NUMBER = re.compile(r"[-+]?\$?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|[-+]?\.\d+")  # 3, 1,000, $5, 2.50, .5


def split_specs(specs: list[str]) -> tuple[list[str], list[str]]:
    """(the FILEs of `vqa:FILE` specs, the other task specs)."""
    vqa = [s[len(PREFIX) :] for s in specs if s.startswith(PREFIX)]
    if any(not f for f in vqa):
        raise TaskError("--tasks vqa: needs a file: vqa:FILE.jsonl")
    return vqa, [s for s in specs if not s.startswith(PREFIX)]


def normalize_answer(text: str) -> str:
    """The comparable form of an answer: its first line, lower case, single spaces, no surrounding quotes
    or trailing punctuation, no leading article, number words as digits and numbers in one format."""
    lines = text.strip().splitlines()
    s = re.sub(r"\s+", " ", lines[0] if lines else "").lower().strip(" \"'`")
    s = s.rstrip(".!?,;:").strip(" \"'`")
    words = s.split(" ")
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        s = " ".join(words[1:])
    s = NUMBER_WORDS.get(s, s)
    return normalize_number(s) if s and _NUMBER.fullmatch(s) else s


def chance(rows: list[dict]) -> dict[str, float]:
    """Per family, the share of its most common (normalised) answer: the best constant guess."""
    by_family: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_family[r["family"]][normalize_answer(answer_of(r))] += 1
    return {f: c.most_common(1)[0][1] / sum(c.values()) for f, c in by_family.items()}


def limit_rows(rows: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` rows of each family (files are often grouped by family)."""
    if not limit:
        return rows
    seen: Counter = Counter()
    out = []
    for r in rows:
        seen[r["family"]] += 1
        if seen[r["family"]] <= limit:
            out.append(r)
    return out


def strip_images(messages: list[dict], marker: str) -> list[dict]:
    """The conversation with every image marker (and the newline after it) removed: the blind prompt."""
    return [{**m, "content": m["content"].replace(marker + "\n", "").replace(marker, "")} for m in messages]


# ---- answering ------------------------------------------------------------------------------------------------


def prompts(
    tokenizer, rows: list[dict], vision: tuple[VisionTower, VisionConfig] | None, marker: str = IMAGE_MARKER
) -> list[tuple]:
    """Per row, (prompt ids, its ImageInputs for the engine): the conversation without its answer, the
    assistant turn opened. With `vision` each marker is a placeholder run for the image's preprocessed
    pixels (keyed by the digest of its bytes); without it the images and their `marker`s are removed."""
    if vision is None:
        strip = [strip_images(r["messages"][:-1], marker) for r in rows]
        return [(tokenizer.encode_chat(m, add_generation_prompt=True)[0], []) for m in strip]
    cfg, out = vision[1], []
    for r in rows:
        ids, _ = render_image_chat(tokenizer, r["messages"][:-1], cfg)
        images = []
        for path in r["images"]:
            data = Path(path).read_bytes()
            try:
                images.append((image_digest(data), preprocess([decode_image(data)], cfg)[0]))  # (3, S, S)
            except ImageError as e:
                raise TaskError(f"{path}: {e}") from None
        out.append((ids, place_images(ids, images, cfg)))
    return out


def answers(
    model: GPT, tokenizer, rows: list[dict], vision: tuple[VisionTower, VisionConfig] | None, max_tokens: int,
    marker: str = IMAGE_MARKER, progress: bool = False, desc: str = "vqa",
) -> list[Completion]:  # fmt: skip
    """Greedy answers of at most `max_tokens` tokens to every row through the inference engine (continuous
    batching; the tower runs once per distinct image), CHUNK rows at a time so that only a chunk's
    pixels are held. With `vision` None the images are removed (the blind baseline)."""
    engine = Engine(model, EngineConfig(max_seqs=min(32, len(rows))), tokenizer=tokenizer, vision=vision)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out: list[Completion] = []
    with tqdm(total=len(rows), desc=desc, unit="item", disable=not progress, leave=False) as bar:
        for k in range(0, len(rows), CHUNK):
            ids, images = zip(*prompts(tokenizer, rows[k : k + CHUNK], vision, marker), strict=True)
            out += engine.generate(list(ids), params, images=list(images))
            bar.update(len(ids))
    return out


# ---- one file -------------------------------------------------------------------------------------------------


def family_metrics(rows: list[dict], items: list[dict], blind: bool, seeing: bool) -> dict:
    """{family: {items, acc (with images), blind, chance}} and the same over all rows under "all"."""
    base = chance(rows)
    out = {}
    groups = {f: [it for it in items if it["family"] == f] for f in base} | {"all": items}
    for f, its in groups.items():
        m: dict = {"items": len(its)}
        if seeing:
            m["acc"] = sum(it["correct"] for it in its) / len(its)
        if blind:
            m["blind"] = sum(it["blind_correct"] for it in its) / len(its)
        m["chance"] = base[f] if f in base else sum(base[it["family"]] for it in its) / len(its)
        out[f] = m
    return out


@dataclass
class VQATasks:
    """The VQA files of one eval, read and checked before any model runs."""

    vision: tuple[VisionTower, VisionConfig] | None  # the checkpoint's tower, None for a text-only one
    files: dict[str, list[dict]]  # task name (vqa:STEM) → its rows
    blind: bool  # also answer with the images removed
    marker: str = IMAGE_MARKER  # the image marker in the messages (the tower's VisionConfig.image_token)


def load_vqa(checkpoint: str | Path, files: list[str], blind: bool = False, limit: int | None = None) -> VQATasks:
    """The checkpoint's vision tower and the rows of `files` (the first `limit` of each family). Without a
    tower only `blind` scoring is possible; asked for image answers, TaskError."""
    vision = load_vision(checkpoint)
    if vision is None and not blind:
        raise TaskError(f"{checkpoint} has no vision tower (vision.json): vqa needs one, or --blind for text only")
    marker = vision[1].image_token if vision else IMAGE_MARKER
    named = {}
    for f in files:
        name = f"{PREFIX}{Path(f).stem}"
        if name in named:
            raise TaskError(f"two vqa files are named {Path(f).stem!r}")
        named[name] = limit_rows(read_image_rows(f, marker), limit)
    return VQATasks(vision, named, blind, marker)


def run_vqa(
    model: GPT, tokenizer, tasks: VQATasks, max_tokens: int = VQA_MAX_TOKENS, progress: bool = False
) -> tuple[dict, dict[str, list[dict]]]:
    """Answer every file's rows: ({name: {"families": {family: metrics}}}, {name: per-item outcomes})."""
    results, items = {}, {}
    for name, rows in tasks.files.items():
        its = [{"index": i, "family": r["family"], "question": r["messages"][-2]["content"] if len(r["messages"]) > 1
                else "", "answer": answer_of(r)} for i, r in enumerate(rows)]  # fmt: skip
        runs = [("", tasks.vision)] if tasks.vision else []
        runs += [("blind_", None)] if tasks.blind else []
        for key, vision in runs:
            n = min(max_tokens, VQA_MAX_TOKENS)
            got = answers(model, tokenizer, rows, vision, n, tasks.marker, progress, f"{name} {key}")
            for it, c in zip(its, got, strict=True):
                it[f"{key}generation"], it[f"{key}finish"] = c.text, c.finish_reason
                it[f"{key}correct"] = normalize_answer(c.text) == normalize_answer(it["answer"])
        results[name] = {"families": family_metrics(rows, its, tasks.blind, tasks.vision is not None)}
        items[name] = its
    return results, items


def vqa_markdown(results: dict) -> list[str]:
    """Markdown lines: one table row per file and family, accuracy next to blind and chance."""
    if not results:
        return []
    lines = ["", "| vqa | family | items | accuracy | blind | chance |", "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        for family, m in r["families"].items():
            acc = f"{m['acc']:.4f}" if "acc" in m else ""
            blind = f"{m['blind']:.4f}" if "blind" in m else ""
            lines.append(f"| {name} | {family} | {m['items']} | {acc} | {blind} | {m['chance']:.4f} |")
    return lines
