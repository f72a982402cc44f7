"""`gptstack data prepare`: documents → extract → filter → PII → quality → dedup → mixture → shards.

Stages that look at one document at a time run per chunk of documents on an executor: a local
process pool, or Dask distributed with the same stage functions. Results come back in chunk order,
so the output is byte-identical for a seed whatever the executor or worker count. Stage-A results
are cached per chunk in `OUT/.work-<fingerprint>/`, so an interrupted run resumes; shards are
written atomically and the manifest last, so a folder with a manifest is always complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gptstack.data.dedup import MinHasher, dedup_keep
from gptstack.data.extract import extract_html
from gptstack.data.filters import DEFAULT_CHAINS, build_filter, mask_pii
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


@dataclass
class PrepareConfig:
    out: str
    inputs: list[str] = field(default_factory=list)  # empty: the Python standard library
    tokenizer: str = "cl100k_base"  # cl100k_base | o200k_base | bytes | tokenizer folder
    text_field: str = "text"  # JSONL / Parquet column holding the text
    filters: dict = field(default_factory=dict)  # {filter: {param: value}} or {filter: false} to turn off
    pii: bool = True
    quality_model: str | None = None  # a classifier from `gptstack data train-quality`
    dedup: str = "fuzzy"  # fuzzy | exact | none
    bands: int = 14
    rows: int = 8
    ngram: int = 5
    mixture: dict = field(default_factory=dict)  # {source: weight}, default 1 (GPT-3 style epochs)
    val_fraction: float = 0.01
    shard_tokens: int = 2**24
    max_doc_bytes: int = 8_000_000
    seed: int = 0
    keep_text: bool = False
    chunk_bytes: int = 1_000_000

    def fingerprint(self) -> str:
        """Hash of every setting that changes the output, and of the input files (names, sizes, times)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "keep_text")}
        h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        for root in self.inputs or [str(default_corpus())]:
            for path in list_files(Path(root), None if self.inputs else (".py",)):
                st = path.stat()
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        for extra in (self.tokenizer, self.quality_model):
            if extra and Path(extra).exists():
                for path in sorted(Path(extra).rglob("*")) if Path(extra).is_dir() else [Path(extra)]:
                    if path.is_file():
                        h.update(hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()


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
_CACHE: dict = {}


def _chains(filters: dict) -> dict[str, list]:
    key = json.dumps(filters, sort_keys=True)
    if key not in _CACHE:
        chains = {}
        for kind, names in DEFAULT_CHAINS.items():
            chains[kind] = [build_filter(n, **filters.get(n, {})) for n in names if filters.get(n, {}) is not False]
        _CACHE[key] = chains
    return _CACHE[key]


def _quality(path: str):
    if ("quality", path) not in _CACHE:
        from gptstack.data.quality import QualityClassifier

        _CACHE[("quality", path)] = QualityClassifier.load(path)
    return _CACHE[("quality", path)]


def process_chunk(task: tuple[list[Document], dict]) -> dict:
    """Extract, filter, mask PII, score quality and compute dedup features for one chunk."""
    docs, cfg = task
    chains = _chains(cfg["filters"])
    drops: dict[str, Counter] = defaultdict(Counter)
    pii: Counter = Counter()
    cpu: Counter = Counter()
    nbytes: Counter = Counter()
    kept: list[Document] = []
    for doc in docs:
        text = doc.text
        size = len(text.encode())
        if doc.kind == "html":
            t0 = time.process_time()
            text = extract_html(text)
            cpu["extract"] += time.process_time() - t0
            nbytes["extract"] += size
            if not text.strip():
                drops["extract"]["no_main_text"] += 1
                continue
        t0 = time.process_time()
        nbytes["filter"] += len(text.encode())
        for f in chains["code" if doc.kind == "code" else "text"]:
            text, rule = f(text)
            if text is None:
                drops[f.name][rule] += 1
                break
        cpu["filter"] += time.process_time() - t0
        if text is None:
            continue
        if cfg["pii"]:
            t0 = time.process_time()
            nbytes["pii"] += len(text.encode())
            text, counts = mask_pii(text)
            pii.update(counts)
            cpu["pii"] += time.process_time() - t0
        kept.append(dataclasses.replace(doc, text=text))
    prose = [d for d in kept if d.kind != "code"]  # as GPT-3, the classifier judges web text, not code
    if cfg["quality_model"] and prose:
        t0 = time.process_time()
        model = _quality(cfg["quality_model"])
        nbytes["quality"] += sum(len(d.text.encode()) for d in prose)
        scores = model.score([d.text for d in prose])
        rejected = {
            id(d) for d, s in zip(prose, scores, strict=True) if not model.keep(s, f"{d.source}/{d.id}", cfg["seed"])
        }
        drops["quality"]["pareto_rejected"] += len(rejected)
        kept = [d for d in kept if id(d) not in rejected]
        cpu["quality"] += time.process_time() - t0
    t0 = time.process_time()
    nbytes["dedup"] += sum(len(d.text.encode()) for d in kept)
    hasher = MinHasher(cfg["bands"], cfg["rows"], cfg["ngram"], seed=1)
    keys, sig = hasher.features([d.text for d in kept])
    cpu["dedup"] += time.process_time() - t0
    return {
        "docs": [[d.text, d.source, d.id] for d in kept],
        "keys": [k.hex() for k in keys],
        "sig": sig,
        "drops": {k: dict(v) for k, v in drops.items()},
        "pii": dict(pii),
        "cpu": dict(cpu),
        "bytes": dict(nbytes),
    }


def tokenize_chunk(task: tuple[list[str], str]) -> tuple[np.ndarray, float, int]:
    """Token ids of each text followed by <|endoftext|>, concatenated; and the CPU seconds and bytes."""
    texts, spec = task
    if ("tok", spec) not in _CACHE:
        from gptstack.tokenizer import get_tokenizer

        _CACHE[("tok", spec)] = get_tokenizer(spec)
    tok = _CACHE[("tok", spec)]
    t0 = time.process_time()
    ids = tok.encode_batch(texts, num_threads=1)
    dtype = token_dtype(tok.n_vocab)
    parts = [np.array([*doc, tok.eot_id], dtype=dtype) for doc in ids]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return tokens, time.process_time() - t0, sum(len(t.encode()) for t in texts)


# --- the run -------------------------------------------------------------------------------------------
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


def _chunks(docs: Iterable[Document | Skip], size: int, skipped: Counter, read: Counter) -> Iterator[list[Document]]:
    chunk, nbytes = [], 0
    for doc in docs:
        if isinstance(doc, Skip):
            skipped[doc.reason] += 1
            read[doc.source] += 1
            continue
        read[doc.source] += 1
        chunk.append(doc)
        nbytes += len(doc.text)
        if nbytes >= size:
            yield chunk
            chunk, nbytes = [], 0
    if chunk:
        yield chunk


def _unit_hash(seed: int, *parts: str) -> float:
    digest = hashlib.blake2b("\0".join([str(seed), *parts]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def prepare(cfg: PrepareConfig, executor=None, progress: bool = True) -> dict:
    """Runs the pipeline into `cfg.out` and returns the manifest (see module docstring)."""
    from gptstack.tokenizer import get_tokenizer

    out = Path(cfg.out)
    tokenizer = get_tokenizer(cfg.tokenizer)  # fail fast on a bad name
    if cfg.dedup not in ("fuzzy", "exact", "none"):
        raise ValueError(f"dedup must be fuzzy, exact or none, not {cfg.dedup!r}")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    for name, params in cfg.filters.items():  # unknown filters or parameters fail before any work
        if params is not False:
            build_filter(name, **params)
    if cfg.quality_model:
        _quality(cfg.quality_model)
    fp = cfg.fingerprint()
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("fingerprint") == fp:
            return manifest
        raise ValueError(f"{out} already holds shards prepared with other inputs or settings; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".work-{fp[:16]}"
    for stale in out.glob(".work-*"):
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(exist_ok=True)
    executor = executor or LocalExecutor()
    t_start = time.time()

    # Stage A, per chunk, cached.
    skipped: Counter = Counter()
    read: Counter = Counter()
    stage_cfg = {k: getattr(cfg, k) for k in ("filters", "pii", "quality_model", "bands", "rows", "ngram", "seed")}
    t0 = time.process_time()
    chunks = list(
        _chunks(iter_documents(cfg.inputs, cfg.text_field, cfg.max_doc_bytes), cfg.chunk_bytes, skipped, read)
    )
    read_cpu = time.process_time() - t0
    read_bytes = sum(len(d.text.encode()) for c in chunks for d in c)
    results: list[dict | None] = [_load_chunk(work / f"a-{i:06d}.npz") for i in range(len(chunks))]
    todo = [i for i, r in enumerate(results) if r is None]
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc="filter+dedup features", unit="chunk",
               disable=not progress)  # fmt: skip
    for i, result in zip(todo, executor.map(process_chunk, ((chunks[i], stage_cfg) for i in todo)), strict=False):
        _save_chunk(work / f"a-{i:06d}.npz", result)
        results[i] = result
        bar.update()
    bar.close()
    del chunks

    drops: dict[str, Counter] = defaultdict(Counter)
    pii: Counter = Counter()
    cpu: Counter = Counter({"read": read_cpu})
    nbytes: Counter = Counter({"read": read_bytes})
    docs: list[list[str]] = []
    keys: list[bytes] = []
    for r in results:
        docs += r["docs"]
        keys += [bytes.fromhex(k) for k in r["keys"]]
        for name, rules in r["drops"].items():
            drops[name].update(rules)
        pii.update(r["pii"])
        cpu.update(r["cpu"])
        nbytes.update(r["bytes"])
    sig = np.concatenate([r["sig"] for r in results]) if results else np.zeros((0, cfg.bands * cfg.rows), np.uint32)
    del results

    # Dedup (global).
    t0 = time.process_time()
    hasher = MinHasher(cfg.bands, cfg.rows, cfg.ngram, seed=1)
    if cfg.dedup == "none":
        status = np.zeros(len(docs), dtype=np.int8)
    else:
        status = dedup_keep(keys, sig, hasher, fuzzy=cfg.dedup == "fuzzy")
    cpu["dedup"] += time.process_time() - t0
    drops["dedup"].update({"exact": int((status == 1).sum()), "fuzzy": int((status == 2).sum())})
    docs = [d for d, s in zip(docs, status, strict=False) if s == 0]
    if cfg.keep_text:
        lines = "".join(json.dumps({"text": t, "source": s, "id": i}, ensure_ascii=False) + "\n" for t, s, i in docs)
        atomic_write(out / "documents.jsonl", lines.encode())

    # Mixture and split: val by a hash of the id; train documents repeated by their source's weight
    # (floor(w) copies, one more with probability frac(w)), then shuffled.
    unknown = set(cfg.mixture) - set(read)
    if unknown:
        raise ValueError(f"mixture names sources {sorted(unknown)} but the inputs are {sorted(read)}")
    val = [d for d in docs if _unit_hash(cfg.seed, "val", d[1], d[2]) < cfg.val_fraction]
    if cfg.val_fraction > 0 and not val and len(docs) > 1:
        val = [docs[-1]]
    val_ids = {(d[1], d[2]) for d in val}
    train: list[list[str]] = []
    for d in docs:
        if (d[1], d[2]) in val_ids:
            continue
        w = float(cfg.mixture.get(d[1], 1.0))
        copies = int(w) + (_unit_hash(cfg.seed, "mix", d[1], d[2]) < w - int(w))
        train += [d] * copies
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    train = [train[i] for i in order]

    # Stage B: tokenize and write shards.
    dtype = token_dtype(tokenizer.n_vocab)
    splits = {}
    tok_cpu = 0.0
    tok_bytes = 0
    per_source_tokens: Counter = Counter()
    for split, split_docs in (("train", train), ("val", val)):
        writer = ShardWriter(out, split, dtype, cfg.shard_tokens, tokenizer.eot_id)
        batches, batch, size = [], [], 0
        for d in split_docs:
            batch.append(d)
            size += len(d[0])
            if size >= cfg.chunk_bytes:
                batches.append(batch)
                batch, size = [], 0
        batches += [batch] if batch else []
        bar = tqdm(total=len(split_docs), desc=f"tokenize {split}", unit="doc", disable=not progress)
        tasks = (([d[0] for d in b], cfg.tokenizer) for b in batches)
        for b, (tokens, seconds, n) in zip(batches, executor.map(tokenize_chunk, tasks), strict=False):
            writer.add(tokens)
            tok_cpu += seconds
            tok_bytes += n
            if split == "train":
                ends = np.flatnonzero(tokens == tokenizer.eot_id)
                lengths = np.diff(np.concatenate([[-1], ends]))
                for d, length in zip(b, lengths, strict=False):
                    per_source_tokens[d[1]] += int(length)
            bar.update(len(b))
        bar.close()
        splits[split] = writer.close()
    cpu["tokenize"] += tok_cpu
    nbytes["tokenize"] += tok_bytes

    kept_per_source = Counter(d[1] for d in docs)
    total_train = sum(per_source_tokens.values())
    sources = {
        s: {
            "documents_read": read[s],
            "documents_kept": kept_per_source[s],
            "weight": float(cfg.mixture.get(s, 1.0)),
            "train_tokens": per_source_tokens[s],
            "share": per_source_tokens[s] / total_train if total_train else 0.0,
        }
        for s in read
    }
    if cfg.quality_model:
        shutil.copyfile(cfg.quality_model, out / "quality.npz")
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "tokenizer": tokenizer_entry(tokenizer, out, cfg.tokenizer),
        "dtype": dtype.name,
        "splits": splits,
        "sources": sources,
        "skipped": dict(skipped),
        "filters": {k: dict(v) for k, v in drops.items()},
        "pii": dict(pii),
        "dedup": {
            "mode": cfg.dedup,
            "bands": cfg.bands,
            "rows": cfg.rows,
            "ngram": cfg.ngram,
            "threshold": round(hasher.threshold, 4),
        },
        "stages": {
            s: {"bytes": nbytes[s], "cpu_s": round(cpu[s], 3), "mb_per_s_per_core": nbytes[s] / 1e6 / max(cpu[s], 1e-9)}
            for s in cpu
        },
        "wall_s": round(time.time() - t_start, 2),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"},
    }
    written = {s["file"] for split in splits.values() for s in split["shards"]}
    for stale in out.glob("*.bin"):
        if stale.name not in written:
            stale.unlink()
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    shutil.rmtree(work, ignore_errors=True)
    return manifest


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
    return "\n".join(lines)
