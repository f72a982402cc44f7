"""`gptstack data prepare`: documents → extract → filter → PII → quality → dedup → mixture → shards.

Stages that look at one document at a time run per chunk of documents on an executor: a local
process pool, or Dask distributed with the same stage functions. Results come back in chunk order,
so the output is byte-identical for a seed whatever the executor or worker count. Stage-A results
are cached per chunk in `OUT/.work-<fingerprint>/`, so an interrupted run resumes; shards are
written atomically and the manifest last, so a folder with a manifest is always complete. A `Ledger`
in OUT records each name a run writes before writing it: a later run replaces or removes only those,
and refuses a folder where someone else's file has a name it would write.

`prepare(cfg)` runs, in order: `_check_settings` (fail before any work), stage A per chunk
(`process_chunk`: extract, filter, PII, quality, dedup features), `_dedup` (global), `_split` (val
split and mixture), stage B (`_write_splits`: tokenize and write shards), then the manifest. A `Tally`
counts what each stage did; data/audit.py turns its dropped bytes into a warning when most of the
text is gone and into a PrepareError when nothing was kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from gptstack.checkpoint import resolve_tokenizer
from gptstack.data.audit import PrepareError, byte_audit, check_kept, warnings_for
from gptstack.data.dedup import MinHasher, dedup_keep
from gptstack.data.extract import extract_html
from gptstack.data.filters import DEFAULT_CHAINS, build_filter, mask_pii
from gptstack.data.quality import QualityClassifier
from gptstack.data.shards import (
    FORMAT,
    MANIFEST,
    ShardWriter,
    atomic_write,
    read_manifest,
    token_dtype,
    tokenizer_entry,
)
from gptstack.data.sources import Document, Skip, default_corpus, iter_documents, list_files

Doc = list[str]  # a kept document between stages: [text, source, id]


@dataclass
class PrepareConfig:
    out: str  # output folder: token shards, manifest.json and the tokenizer
    inputs: list[str] = field(default_factory=list)  # files or folders (default: the Python standard library)
    tokenizer: str = "cl100k_base"  # cl100k_base | o200k_base | bytes | a tokenizer or HF folder | CKPT | FILE.gguf
    text_field: str = "text"  # JSONL/Parquet field with the text
    filters: dict = field(default_factory=dict)  # overrides: {"gopher_quality": {"min_doc_words": 20}, "c4": false}
    pii: bool = True  # mask e-mail addresses, IP addresses and phone numbers
    quality_model: str | None = None  # a classifier from `gptstack data train-quality`
    dedup: Literal["fuzzy", "exact", "none"] = "fuzzy"  # fuzzy: MinHash-LSH near-duplicates and exact ones
    bands: int = 14  # MinHash-LSH bands
    rows: int = 8  # MinHash rows per band
    ngram: int = 5  # word n-gram (shingle) length of MinHash
    mixture: dict = field(default_factory=dict)  # epochs of each source: {source: weight}, default 1 (GPT-3 style)
    val_fraction: float = 0.01  # share of documents held out as the val split
    shard_tokens: int = 2**24  # tokens per shard file
    max_doc_bytes: int = 8_000_000  # documents larger than this are skipped when read
    seed: int = 0  # seed of the val split, the mixture and the quality classifier's sampling
    keep_text: bool = False  # also write the kept documents as documents.jsonl
    chunk_bytes: int = 1_000_000  # bytes of documents per unit of work (and of resumption)
    follow_symlinks: bool = False  # follow symbolic links that lead out of an input folder (files and folders)

    def fingerprint(self) -> str:
        """Hash of every setting that changes the output, and of the input files (names, sizes, times)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "keep_text")}
        h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        for root in self.inputs or [str(default_corpus())]:
            for path in list_files(Path(root), None if self.inputs else (".py",), self.follow_symlinks):
                st = path.stat()
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        for extra in (self.tokenizer, self.quality_model):
            if extra and Path(extra).exists():
                for path in sorted(Path(extra).rglob("*")) if Path(extra).is_dir() else [Path(extra)]:
                    if path.is_file():
                        h.update(hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()


@dataclass
class Tally:
    """What the stages did, per chunk and summed over the run: documents read and skipped per source
    and reason, documents and bytes dropped per stage and rule, PII replaced, and per stage the bytes
    that entered it and its CPU seconds."""

    read: Counter = field(default_factory=Counter)  # source → documents read (skipped ones included)
    skipped: Counter = field(default_factory=Counter)  # reason → documents that could not be read
    drops: defaultdict = field(default_factory=lambda: defaultdict(Counter))  # stage → rule → documents
    dropped_bytes: defaultdict = field(default_factory=lambda: defaultdict(Counter))  # stage → rule → bytes
    pii: Counter = field(default_factory=Counter)  # kind → replacements
    cpu: Counter = field(default_factory=Counter)  # stage → CPU seconds
    nbytes: Counter = field(default_factory=Counter)  # stage → UTF-8 bytes in

    def drop(self, stage: str, rule: str, nbytes: int, documents: int = 1) -> None:
        self.drops[stage][rule] += documents
        self.dropped_bytes[stage][rule] += nbytes

    @contextlib.contextmanager
    def timed(self, stage: str, nbytes: int = 0) -> Iterator[None]:
        """Adds the block's CPU seconds and `nbytes` to `stage`."""
        t0 = time.process_time()
        self.nbytes[stage] += nbytes
        yield
        self.cpu[stage] += time.process_time() - t0

    def to_dict(self) -> dict:
        """A chunk's counts, as stage A caches them (JSON)."""
        nested = {k: {s: dict(v) for s, v in getattr(self, k).items()} for k in ("drops", "dropped_bytes")}
        return {**nested, "pii": dict(self.pii), "cpu": dict(self.cpu), "bytes": dict(self.nbytes)}

    def add(self, chunk: dict) -> None:
        """Sum a chunk's counts into this one."""
        for name, rules in chunk["drops"].items():
            self.drops[name].update(rules)
        for name, rules in chunk.get("dropped_bytes", {}).items():  # older cache files lack it
            self.dropped_bytes[name].update(rules)
        self.pii.update(chunk["pii"])
        self.cpu.update(chunk["cpu"])
        self.nbytes.update(chunk["bytes"])


# --- executors -----------------------------------------------------------------------------------------
class LocalExecutor:
    """A process pool (or the calling process when workers == 1); results in submission order."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        if self.workers == 1:
            yield from map(fn, items)
            return
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(self.workers) as pool:
            yield from pool.imap(fn, items)


class DaskExecutor:
    """The same stage functions on a Dask distributed cluster (`address`, or a local cluster)."""

    def __init__(self, address: str | None = None, workers: int = 2):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise ImportError("the Dask executor needs dask: pip install 'gptstack[dask]'") from None

        self.cluster = None if address else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)
        self.client = Client(address or self.cluster)
        self.workers = workers

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        # Bounded in-flight futures, gathered in order: memory stays flat on big inputs.
        window = 4 * max(1, len(self.client.scheduler_info()["workers"]))
        futures = []
        for item in items:
            futures.append(self.client.submit(fn, item, pure=False))
            if len(futures) >= window:
                yield futures.pop(0).result()
        for f in futures:
            yield f.result()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# --- stage A: per-document work ----------------------------------------------------------------------
_CACHE: dict = {}  # per process: filter chains, quality classifiers and tokenizers, built once


def _chains(filters: dict) -> dict[str, list]:
    key = json.dumps(filters, sort_keys=True)
    if key not in _CACHE:
        chains = {}
        for kind, names in DEFAULT_CHAINS.items():
            chains[kind] = [build_filter(n, **filters.get(n, {})) for n in names if filters.get(n, {}) is not False]
        _CACHE[key] = chains
    return _CACHE[key]


def _quality(path: str) -> QualityClassifier:
    if ("quality", path) not in _CACHE:
        _CACHE[("quality", path)] = QualityClassifier.load(path)
    return _CACHE[("quality", path)]


def _tokenizer(spec: str):
    if ("tok", spec) not in _CACHE:
        _CACHE[("tok", spec)] = resolve_tokenizer(spec)
    return _CACHE[("tok", spec)]


def process_chunk(task: tuple[list[Document], dict]) -> dict:
    """Extract, filter, mask PII, score quality and compute dedup features for one chunk."""
    docs, cfg = task
    chains, tally = _chains(cfg["filters"]), Tally()
    kept = [d for d in (_clean(doc, chains, cfg["pii"], tally) for doc in docs) if d is not None]
    if cfg["quality_model"]:
        kept = _quality_gate(kept, cfg["quality_model"], cfg["seed"], tally)
    with tally.timed("dedup", sum(len(d.text.encode()) for d in kept)):
        hasher = MinHasher(cfg["bands"], cfg["rows"], cfg["ngram"], seed=1)
        keys, sig = hasher.features([d.text for d in kept])
    docs_out = [[d.text, d.source, d.id] for d in kept]
    return {"docs": docs_out, "keys": [k.hex() for k in keys], "sig": sig, **tally.to_dict()}


def _clean(doc: Document, chains: dict[str, list], pii: bool, tally: Tally) -> Document | None:
    """One document through extraction (HTML), its filter chain and PII masking; None when dropped."""
    text = doc.text
    if doc.kind == "html":
        with tally.timed("extract", len(text.encode())):
            text = extract_html(text)
        if not text.strip():
            tally.drop("extract", "no_main_text", 0)  # markup is not text: no bytes counted
            return None
    size = len(text.encode())
    with tally.timed("filter", size):
        text = _filter(text, size, chains["code" if doc.kind == "code" else "text"], tally)
    if text is None:
        return None
    if pii:
        with tally.timed("pii", len(text.encode())):
            text, counts = mask_pii(text)
        tally.pii.update(counts)
    return dataclasses.replace(doc, text=text)


def _filter(text: str, size: int, chain: list, tally: Tally) -> str | None:
    """The text after each filter of the chain (lines may be removed), or None at the first that drops
    it; dropped bytes are counted under the filter's rule, removed lines under `lines_removed`."""
    for f in chain:
        out, rule = f(text)
        if out is None:
            tally.drop(f.name, rule, size)
            return None
        if out is not text:
            new_size = len(out.encode())
            if new_size < size:
                tally.dropped_bytes[f.name]["lines_removed"] += size - new_size
            text, size = out, new_size
    return text


def _quality_gate(kept: list[Document], model_path: str, seed: int, tally: Tally) -> list[Document]:
    """GPT-3's classifier with Pareto sampling; it judges prose only, as GPT-3's judged web text, not code."""
    prose = [d for d in kept if d.kind != "code"]
    if not prose:
        return kept
    sizes = [len(d.text.encode()) for d in prose]
    with tally.timed("quality", sum(sizes)):
        model = _quality(model_path)
        scores = model.score([d.text for d in prose])
        keep = [model.keep(s, f"{d.source}/{d.id}", seed) for d, s in zip(prose, scores, strict=True)]
    rejected = {id(d) for d, k in zip(prose, keep, strict=True) if not k}
    lost = sum(n for n, k in zip(sizes, keep, strict=True) if not k)
    tally.drop("quality", "pareto_rejected", lost, documents=len(rejected))
    return [d for d in kept if id(d) not in rejected]


def tokenize_chunk(task: tuple[list[str], str]) -> tuple[np.ndarray, float, int]:
    """Token ids of each text followed by <|endoftext|>, concatenated; and the CPU seconds and bytes."""
    texts, spec = task
    tok = _tokenizer(spec)
    t0 = time.process_time()
    ids = tok.encode_batch(texts, num_threads=1)
    dtype = token_dtype(tok.n_vocab)
    parts = [np.array([*doc, tok.eot_id], dtype=dtype) for doc in ids]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return tokens, time.process_time() - t0, sum(len(t.encode()) for t in texts)


# --- the run -------------------------------------------------------------------------------------------
def prepare(cfg: PrepareConfig, executor=None, progress: bool = True) -> dict:
    """Runs the pipeline into `cfg.out` and returns the manifest (see module docstring). The same
    settings on the same inputs return the existing manifest; nothing kept raises PrepareError."""
    tokenizer = _check_settings(cfg)
    out, fp = Path(cfg.out), cfg.fingerprint()
    if (out / MANIFEST).is_file():
        return _existing(out, fp)
    ledger = Ledger(out)
    ledger.check()
    work = _work_folder(out, fp)
    executor = executor or LocalExecutor()
    t_start = time.time()
    tally = Tally()
    docs, keys, sig = _stage_a(cfg, work, executor, progress, tally)
    docs = _dedup(cfg, docs, keys, sig, tally)
    kept_bytes = tally.nbytes["dedup"] - sum(tally.dropped_bytes["dedup"].values())  # kept after stage A, less dups
    audit = byte_audit(tally.nbytes["filter"], kept_bytes, tally.dropped_bytes)
    check_kept(len(docs), audit, tally.drops, tally.skipped, cfg.filters, cfg.max_doc_bytes)
    if cfg.keep_text:
        lines = "".join(json.dumps({"text": t, "source": s, "id": i}, ensure_ascii=False) + "\n" for t, s, i in docs)
        atomic_write(out / ledger.record("documents.jsonl"), lines.encode())
    train, val = _split(cfg, docs, tally.read)
    parts = {"train": train, "val": val}
    spec = _worker_spec(cfg.tokenizer, tokenizer, work)
    splits, train_tokens = _write_splits(cfg, out, tokenizer, spec, parts, executor, progress, tally, ledger.record)
    if cfg.quality_model:
        shutil.copyfile(cfg.quality_model, out / ledger.record("quality.npz"))
    ledger.record("tokenizer")
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "tokenizer": tokenizer_entry(tokenizer, out, cfg.tokenizer),
        "dtype": token_dtype(tokenizer.n_vocab).name,
        "splits": splits,
        **_accounts(cfg, tally, Counter(d[1] for d in docs), train_tokens),
        "audit": audit,
        "warnings": warnings_for(audit, cfg.filters, cfg.max_doc_bytes),
        "wall_s": round(time.time() - t_start, 2),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"},
    }
    _commit(out, work, manifest, ledger)
    return manifest


def run_prepare(cfg: PrepareConfig, workers: int | None = None, dask: str | None = None, progress: bool = True) -> dict:
    """`prepare` on `workers` local processes (default: all cores), or on Dask: a scheduler address, or
    "local" for a local cluster; the cluster is closed afterwards."""
    if not dask:
        return prepare(cfg, LocalExecutor(workers), progress)
    executor = DaskExecutor(None if dask == "local" else dask)
    try:
        return prepare(cfg, executor, progress)
    finally:
        executor.close()


def _check_settings(cfg: PrepareConfig):
    """Everything that can be wrong with the settings fails before any work; returns the tokenizer."""
    tokenizer = resolve_tokenizer(cfg.tokenizer)  # fail fast on a bad name
    if cfg.dedup not in ("fuzzy", "exact", "none"):
        raise ValueError(f"dedup must be fuzzy, exact or none, not {cfg.dedup!r}")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    for name, params in cfg.filters.items():  # unknown filters or parameters fail before any work
        if params is not False:
            build_filter(name, **params)
    if cfg.quality_model:
        _quality(cfg.quality_model)
    return tokenizer


def _existing(out: Path, fingerprint: str) -> dict:
    """The manifest of a folder prepared with these settings and inputs; another folder is refused."""
    manifest = read_manifest(out)
    if manifest.get("fingerprint") != fingerprint:
        raise ValueError(f"{out} already holds shards prepared with other inputs or settings; use another --out")
    return manifest


def _work_folder(out: Path, fingerprint: str) -> Path:
    """OUT/.work-<fingerprint>/, the stage-A cache of this run (our caches of other settings are removed)."""
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".work-{fingerprint[:16]}"
    for stale in out.glob(".work-*"):
        if stale != work and WORK_NAME.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(exist_ok=True)
    return work


def _stage_a(
    cfg: PrepareConfig, work: Path, executor, progress: bool, tally: Tally
) -> tuple[list[Doc], list[bytes], np.ndarray]:
    """Read the documents in chunks and run `process_chunk` on those not cached yet; returns the kept
    documents, their exact-dedup keys and their MinHash signatures (N, bands·rows), in input order."""
    with tally.timed("read"):
        docs = iter_documents(cfg.inputs, cfg.text_field, cfg.max_doc_bytes, cfg.follow_symlinks)
        chunks = list(_chunks(docs, cfg.chunk_bytes, tally))
    tally.nbytes["read"] += sum(len(d.text.encode()) for c in chunks for d in c)
    stage_cfg = {k: getattr(cfg, k) for k in ("filters", "pii", "quality_model", "bands", "rows", "ngram", "seed")}
    results: list[dict | None] = [_load_chunk(work / f"a-{i:06d}.npz") for i in range(len(chunks))]
    todo = [i for i, r in enumerate(results) if r is None]
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc="filter+dedup features", unit="chunk",
               disable=not progress)  # fmt: skip
    for i, result in zip(todo, executor.map(process_chunk, ((chunks[i], stage_cfg) for i in todo)), strict=False):
        _save_chunk(work / f"a-{i:06d}.npz", result)
        results[i] = result
        bar.update()
    bar.close()
    docs, keys = [], []
    for r in results:
        docs += r["docs"]
        keys += [bytes.fromhex(k) for k in r["keys"]]
        tally.add(r)
    sig = np.concatenate([r["sig"] for r in results]) if results else np.zeros((0, cfg.bands * cfg.rows), np.uint32)
    return docs, keys, sig


def _save_chunk(path: Path, result: dict) -> None:
    meta = {k: v for k, v in result.items() if k != "sig"}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, sig=result["sig"], meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    os.replace(tmp, path)


def _load_chunk(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {**json.loads(z["meta"].tobytes()), "sig": z["sig"]}
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None


def _chunks(docs: Iterable[Document | Skip], size: int, tally: Tally) -> Iterator[list[Document]]:
    """Documents in chunks of about `size` characters; skips are counted in `tally`."""
    chunk, nbytes = [], 0
    for doc in docs:
        tally.read[doc.source] += 1
        if isinstance(doc, Skip):
            tally.skipped[doc.reason] += 1
            continue
        chunk.append(doc)
        nbytes += len(doc.text)
        if nbytes >= size:
            yield chunk
            chunk, nbytes = [], 0
    if chunk:
        yield chunk


def _dedup(cfg: PrepareConfig, docs: list[Doc], keys: list[bytes], sig: np.ndarray, tally: Tally) -> list[Doc]:
    """The documents that are neither an exact nor (fuzzy) a near duplicate of an earlier one."""
    with tally.timed("dedup"):
        if cfg.dedup == "none":
            status = np.zeros(len(docs), dtype=np.int8)
        else:  # 0 keep, 1 exact duplicate, 2 near duplicate
            hasher = MinHasher(cfg.bands, cfg.rows, cfg.ngram, seed=1)
            status = dedup_keep(keys, sig, hasher, fuzzy=cfg.dedup == "fuzzy")
    for rule, code in (("exact", 1), ("fuzzy", 2)):
        gone = [d for d, s in zip(docs, status, strict=True) if s == code]
        tally.drop("dedup", rule, sum(len(d[0].encode()) for d in gone), documents=len(gone))
    return [d for d, s in zip(docs, status, strict=True) if s == 0]


def _unit_hash(seed: int, *parts: str) -> float:
    digest = hashlib.blake2b("\0".join([str(seed), *parts]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _split(cfg: PrepareConfig, docs: list[Doc], read: Counter) -> tuple[list[Doc], list[Doc]]:
    """(train, val): val by a hash of the id; train documents repeated by their source's weight
    (floor(w) copies, one more with probability frac(w)), then shuffled."""
    unknown = set(cfg.mixture) - set(read)
    if unknown:
        raise ValueError(f"mixture names sources {sorted(unknown)} but the inputs are {sorted(read)}")
    val = [d for d in docs if _unit_hash(cfg.seed, "val", d[1], d[2]) < cfg.val_fraction]
    if cfg.val_fraction > 0 and not val and len(docs) > 1:
        val = [docs[-1]]
    val_ids = {(d[1], d[2]) for d in val}
    train: list[Doc] = []
    for d in docs:
        if (d[1], d[2]) in val_ids:
            continue
        w = float(cfg.mixture.get(d[1], 1.0))
        copies = int(w) + (_unit_hash(cfg.seed, "mix", d[1], d[2]) < w - int(w))
        train += [d] * copies
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    return [train[i] for i in order], val


# --- stage B: tokenize and write shards -----------------------------------------------------------------
def _worker_spec(spec: str, tokenizer, work: Path) -> str:
    """What the tokenizing workers load: `spec` itself, except for a GGUF file, whose metadata is slow to
    read (Gemma's 262,144 tokens: ~20 s, in every worker process): then the tokenizer saved once in the
    work folder. The calling process keeps the tokenizer it has (a one-worker run tokenizes here)."""
    if Path(spec).is_file():
        spec = str(tokenizer.save(work / "tokenizer"))
    _CACHE[("tok", spec)] = tokenizer
    return spec


def _write_splits(
    cfg: PrepareConfig,
    out: Path,
    tokenizer,
    spec: str,
    splits: dict[str, list[Doc]],
    executor,
    progress: bool,
    tally: Tally,
    on_write: Callable[[str], None] | None = None,
) -> tuple[dict, Counter]:
    """Each split's shard entries (ShardWriter.close), and the train tokens of each source. The workers
    tokenize with the tokenizer `spec` names (_worker_spec)."""
    written, per_source = {}, Counter()
    seconds, nbytes = 0.0, 0  # summed over the workers' batches
    dtype = token_dtype(tokenizer.n_vocab)
    for split, docs in splits.items():
        writer = ShardWriter(out, split, dtype, cfg.shard_tokens, tokenizer.eot_id, on_write)
        batches = _batches(docs, cfg.chunk_bytes)
        bar = tqdm(total=len(docs), desc=f"tokenize {split}", unit="doc", disable=not progress)
        tasks = (([d[0] for d in b], spec) for b in batches)
        for b, (tokens, cpu_s, n) in zip(batches, executor.map(tokenize_chunk, tasks), strict=False):
            writer.add(tokens)
            seconds, nbytes = seconds + cpu_s, nbytes + n
            if split == "train":
                per_source.update(_tokens_per_source(b, tokens, tokenizer.eot_id))
            bar.update(len(b))
        bar.close()
        written[split] = writer.close()
    tally.cpu["tokenize"] += seconds
    tally.nbytes["tokenize"] += nbytes
    return written, per_source


def _batches(docs: list[Doc], size: int) -> list[list[Doc]]:
    """Consecutive documents in batches of about `size` characters."""
    batches, batch, n = [], [], 0
    for d in docs:
        batch.append(d)
        n += len(d[0])
        if n >= size:
            batches.append(batch)
            batch, n = [], 0
    return batches + ([batch] if batch else [])


def _tokens_per_source(batch: list[Doc], tokens: np.ndarray, eot: int) -> Counter:
    """Tokens of each source in one tokenized batch (documents end at <|endoftext|>)."""
    ends = np.flatnonzero(tokens == eot)
    lengths = np.diff(np.concatenate([[-1], ends]))
    out: Counter = Counter()
    for d, length in zip(batch, lengths, strict=False):
        out[d[1]] += int(length)
    return out


# --- the manifest ---------------------------------------------------------------------------------------
def _accounts(cfg: PrepareConfig, tally: Tally, kept: Counter, train_tokens: Counter) -> dict:
    """The manifest's tables: sources, skips, filter drops, PII, dedup settings and stage speeds."""
    total = sum(train_tokens.values())
    sources = {
        s: {
            "documents_read": tally.read[s],
            "documents_kept": kept[s],
            "weight": float(cfg.mixture.get(s, 1.0)),
            "train_tokens": train_tokens[s],
            "share": train_tokens[s] / total if total else 0.0,
        }
        for s in tally.read
    }
    threshold = MinHasher(cfg.bands, cfg.rows, cfg.ngram, seed=1).threshold
    return {
        "sources": sources,
        "skipped": dict(tally.skipped),
        "filters": {k: dict(v) for k, v in tally.drops.items()},
        "pii": dict(tally.pii),
        "dedup": {
            "mode": cfg.dedup,
            "bands": cfg.bands,
            "rows": cfg.rows,
            "ngram": cfg.ngram,
            "threshold": round(threshold, 4),
        },
        "stages": {
            s: {"bytes": n, "cpu_s": round(tally.cpu[s], 3), "mb_per_s_per_core": n / 1e6 / max(tally.cpu[s], 1e-9)}
            for s, n in ((s, tally.nbytes[s]) for s in tally.cpu)
        },
    }


def _commit(out: Path, work: Path, manifest: dict, ledger: Ledger) -> None:
    """Remove what an earlier, interrupted run of ours wrote and this one did not (by name, from the
    ledger), write the manifest last (the folder is complete), drop the ledger and the cache."""
    for name in sorted(ledger.names - ledger.this_run):
        if (out / name).is_file():
            (out / name).unlink()
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    ledger.path.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)


# --- what a run may overwrite -----------------------------------------------------------------------------
LEDGER = ".prepare-files.json"  # {"files": [names]}: what runs of ours wrote in OUT before a manifest named it
SHARD_NAME = re.compile(r"^(train|val)-\d{6}\.bin$")
OUTPUTS = ("documents.jsonl", "quality.npz", "tokenizer")  # the other names a run writes (manifest.json aside)
WORK_NAME = re.compile(r"^\.work-[0-9a-f]{16}$")


class Ledger:
    """The names `data prepare` wrote in an output folder, each recorded before its file is written, so a
    kill never leaves a file of ours unrecorded. A run overwrites or removes only these: a file of the
    same name that someone else put there is refused, and every other file is left alone."""

    def __init__(self, out: Path):
        self.out, self.path = out, out / LEDGER
        self.names: set[str] = set()
        self.this_run: set[str] = set()
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):  # unreadable: nothing is ours
            self.names = {str(n) for n in json.loads(self.path.read_text())["files"]}

    def check(self) -> None:
        """Refuse (PrepareError) an output folder holding a file this run would overwrite that no run of
        ours wrote."""
        if not self.out.is_dir():
            return
        clash = sorted(
            p.name
            for p in self.out.iterdir()
            if (SHARD_NAME.match(p.name) or p.name in OUTPUTS) and p.name not in self.names
        )
        if clash:
            raise PrepareError(
                f"{self.out / clash[0]}: `data prepare` did not write this file ({len(clash)} such in {self.out}) "
                "and would overwrite it; move it or choose another --out"
            )

    def record(self, name: str) -> str:
        """Note `name` as ours (on disk first), and return it."""
        self.this_run.add(name)
        if name not in self.names:
            self.names.add(name)
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({"files": sorted(self.names)}).encode())
        return name


def format_stats(manifest: dict) -> str:
    """The manifest's tables as markdown (what `gptstack data stats` prints)."""
    tok = manifest["tokenizer"]
    lines = [f"tokenizer: {tok['name']} ({tok['n_vocab']:,} ids), dtype {manifest['dtype']}", ""]
    lines += ["| split | documents | tokens | shards |", "|---|---:|---:|---:|"]
    for name, s in manifest["splits"].items():
        lines.append(f"| {name} | {s['documents']:,} | {s['tokens']:,} | {len(s['shards'])} |")
    if "sources" not in manifest:  # written by write_token_arrays: no pipeline tables
        return "\n".join(lines)
    lines += ["", "| source | read | kept | weight | train tokens | share |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in manifest["sources"].items():
        lines.append(
            f"| {name} | {s['documents_read']:,} | {s['documents_kept']:,} | {s['weight']:g} "
            f"| {s['train_tokens']:,} | {s['share']:.1%} |"
        )
    lines += ["", "| removed by | rule | documents |", "|---|---|---:|"]
    for reason, n in sorted(manifest["skipped"].items()):
        lines.append(f"| read | {reason} | {n:,} |")
    for name, rules in manifest["filters"].items():
        for rule, n in sorted(rules.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {rule} | {n:,} |")
    if manifest["pii"]:
        lines += ["", "PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in sorted(manifest["pii"].items()))]
    lines += ["", "| stage | MB | CPU s | MB/s per core |", "|---|---:|---:|---:|"]
    for name, s in manifest["stages"].items():
        lines.append(f"| {name} | {s['bytes'] / 1e6:.2f} | {s['cpu_s']:.2f} | {s['mb_per_s_per_core']:.2f} |")
    if "audit" in manifest:  # manifests before the byte audit lack it
        lines += ["", _audit_line(manifest["audit"])]
    return "\n".join(lines + [f"\n{w}" for w in manifest.get("warnings", [])])


def _audit_line(audit: dict) -> str:
    worst = ", ".join(f"{rule} {n / 1e6:.2f} MB" for rule, n in list(audit["dropped"].items())[:3])
    return (
        f"text: {audit['text_bytes'] / 1e6:.2f} MB reached the filters, {audit['kept_bytes'] / 1e6:.2f} MB kept "
        f"({audit['dropped_fraction']:.0%} dropped" + (f"; most by {worst})" if worst else ")")
    )
