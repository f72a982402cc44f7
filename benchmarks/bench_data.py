"""Data pipeline benchmarks, each against its baseline in the same run.

1. Per-stage MB/s per core of `gptstack data prepare` on one worker over the stdlib corpus +
   ../shared/data/text + the 120 HTML pages (CPU seconds measured inside each stage).
2. HTML extraction word-level P/R/F1 against the pages' annotated article bodies: ours vs
   trafilatura's defaults.
3. BPE training time, rustbpe vs HF tokenizers (same text, same vocabulary), and encode MB/s on one
   thread, tiktoken (our ranks) vs HF tokenizers (its own model), medians of 3.
4. MinHash dedup throughput (MB/s on one core) and recall on planted near-duplicates, ours vs
   datatrove's four MinHash stages (sha1 hashing, as FineWeb). datatrove runs in another interpreter
   (`--datatrove-python`), because it is installed only in the benchmark environment.

    python benchmarks/bench_data.py [--datatrove-python /tmp/dt/bin/python] [--skip-prepare] [--dedup-seeds 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def bench_prepare() -> None:
    from gptstack.data.pipeline import LocalExecutor, PrepareConfig, format_stats, prepare
    from gptstack.data.sources import default_corpus

    inputs = [str(default_corpus()), str(SHARED / "text"), str(SHARED / "html")]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PrepareConfig(out=tmp + "/shards", inputs=inputs, tokenizer="cl100k_base")
        t0 = time.perf_counter()
        manifest = prepare(cfg, LocalExecutor(1), progress=False)
        wall = time.perf_counter() - t0
    print(f"\n## prepare on one core: stdlib .py + .txt/.html found there, shared text, 120 pages ({wall:.0f}s wall)\n")
    print(format_stats(manifest).split("| stage |")[0].rsplit("\n\n", 1)[0])
    print("\n| stage |" + format_stats(manifest).split("| stage |")[1])


def bench_extraction() -> None:
    import trafilatura

    from gptstack.data.extract import extract_html, word_prf

    gold = json.loads((SHARED / "html" / "ground-truth.json").read_text())
    rows = {"trafilatura defaults": [], "gptstack (favor_precision, no comments)": []}
    times = dict.fromkeys(rows, 0.0)
    total = 0
    for key in sorted(gold):
        html = gzip.decompress((SHARED / "html" / f"{key}.html.gz").read_bytes())
        total += len(html)
        for name, fn in zip(rows, (lambda h: trafilatura.extract(h) or "", extract_html), strict=True):
            t0 = time.process_time()
            text = fn(html)
            times[name] += time.process_time() - t0
            rows[name].append(word_prf(text, gold[key]["articleBody"]))
    print("\n## HTML extraction, 120 annotated pages (word-level, mean over pages)\n")
    print("| extractor | precision | recall | F1 | MB/s per core |\n|---|---:|---:|---:|---:|")
    for name, scores in rows.items():
        p, r, f = (statistics.mean(s[i] for s in scores) for i in range(3))
        print(f"| {name} | {p:.4f} | {r:.4f} | {f:.4f} | {total / 1e6 / times[name]:.2f} |")


def bench_bpe(vocab: int, train_mb: float) -> None:
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HF

    from gptstack.data.sources import corpus_texts
    from gptstack.tokenizer import CHAT_TOKENS, CL100K_PATTERN, train_bpe

    train = corpus_texts(None, "train", 0.1, int(train_mb * 1e6))
    heldout = corpus_texts(None, "heldout", 0.1, 3_000_000)
    mb = sum(len(t.encode()) for t in train) / 1e6
    times: dict[str, list[float]] = {"rustbpe": [], "hf": []}
    for _ in range(3):
        for trainer in times:
            t0 = time.perf_counter()
            ours = train_bpe(train, vocab, "cl100k", trainer)
            times[trainer].append(time.perf_counter() - t0)
    print(f"\n## BPE training: {mb:.1f} MB of stdlib sources, {vocab:,} ids, cl100k regex, 2 cores (median of 3)\n")
    print("| trainer | seconds | vs HF tokenizers |\n|---|---:|---:|")
    hf_t = statistics.median(times["hf"])
    for trainer, ts in times.items():
        print(f"| {trainer} | {statistics.median(ts):.2f} | {hf_t / statistics.median(ts):.2f}× |")

    ours = train_bpe(train, vocab, "cl100k", "rustbpe")
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CL100K_PATTERN), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    n_ranks = vocab - 1 - len(CHAT_TOKENS)
    hf.train_from_iterator(
        train,
        trainers.BpeTrainer(
            vocab_size=n_ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    os.environ["RAYON_NUM_THREADS"] = "1"
    hmb = sum(len(t.encode()) for t in heldout) / 1e6
    enc = {"tiktoken (gptstack)": lambda: [ours.enc.encode_ordinary(t) for t in heldout],
           "HF tokenizers": lambda: [hf.encode(t).ids for t in heldout]}  # fmt: skip
    rates: dict[str, list[float]] = {k: [] for k in enc}
    for _ in range(3):
        for name, fn in enc.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(hmb / (time.perf_counter() - t0))
    print(f"\n## Encode, one thread, {hmb:.1f} MB held-out stdlib text (median of 3)\n")
    print("| encoder | MB/s | vs HF tokenizers |\n|---|---:|---:|")
    base = statistics.median(rates["HF tokenizers"])
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.2f} | {statistics.median(r) / base:.2f}× |")


def planted_corpus(path: Path, n_planted: int = 900, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """The stdlib .py files plus, for `n_planted` of them, a copy with 1.5% of its words replaced."""
    from gptstack.data.sources import Document, iter_documents

    docs = [d.text for d in iter_documents() if isinstance(d, Document)]
    rng = random.Random(seed)
    pairs = []
    for i in rng.sample(range(len(docs)), n_planted):
        words = docs[i].split(" ")
        real = [j for j, w in enumerate(words) if w.strip()]
        for pos in rng.sample(real, max(1, int(len(real) * 0.015))):
            words[pos] = "mutated"
        pairs.append((i, len(docs)))
        docs.append(" ".join(words))
    with open(path, "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"text": text, "id": str(i)}) + "\n")
    return docs, pairs


DATATROVE = r"""
import json, sys, time, tempfile
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

src, work = sys.argv[1], tempfile.mkdtemp()
hashing = HashConfig(precision=64, hash_fc="sha1")
cfg = MinhashConfig(hash_config=hashing, num_buckets=14, hashes_per_bucket=8, n_grams=5)
stages = {
    "signatures": [JsonlReader(src), MinhashDedupSignature(output_folder=f"{work}/sig", config=cfg)],
    "buckets": [MinhashDedupBuckets(input_folder=f"{work}/sig", output_folder=f"{work}/buckets", config=cfg)],
    "cluster": [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove", config=cfg)],
    "filter": [JsonlReader(src), MinhashDedupFilter(input_folder=f"{work}/remove"), JsonlWriter(f"{work}/out")],
}
times = {}
for name, pipeline in stages.items():
    t0 = time.process_time()
    tasks = cfg.num_buckets if name == "buckets" else 1  # one task per bucket, run one after another
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{name}").run()
    times[name] = time.process_time() - t0
import glob, gzip
kept = set()
for f in glob.glob(f"{work}/out/*"):
    with (gzip.open(f, "rt") if f.endswith(".gz") else open(f)) as fh:
        kept |= {json.loads(line)["id"] for line in fh}
print(json.dumps({"times": times, "kept": sorted(kept)}))
"""


def _run_datatrove(python: str, path: Path) -> tuple[dict, set[int]]:
    proc = subprocess.run([python, "-c", DATATROVE, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit("datatrove run failed")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["times"], {int(i) for i in out["kept"]}


def bench_dedup(datatrove_python: str | None, seeds: int) -> None:
    """Both implementations on the same corpora, `seeds` plantings; recall pooled over all pairs."""
    import numpy as np

    from gptstack.data.dedup import MinHasher, dedup_keep, normalize, shingles

    names = ["gptstack (numpy MinHash-LSH)"] + (["datatrove 0.10 (sha1, 4 stages)"] if datatrove_python else [])
    sig_rate = {n: [] for n in names}
    all_rate = {n: [] for n in names}
    caught = dict.fromkeys(names, 0)
    removed = {n: [] for n in names}
    sims: list[float] = []
    n_pairs = 0
    hasher = MinHasher()
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "docs.jsonl"
            docs, pairs = planted_corpus(path, seed=seed)
            mb = sum(len(d.encode()) for d in docs) / 1e6
            n_pairs += len(pairs)
            for a, b in pairs:
                x, y = (set(shingles(normalize(docs[i]))) for i in (a, b))
                sims.append(len(x & y) / len(x | y))
            t0 = time.process_time()
            keys, sig = hasher.features(docs)
            t_sig = time.process_time() - t0
            status = dedup_keep(keys, sig, hasher)
            t_all = time.process_time() - t0
            results = {names[0]: ({"signatures": t_sig, "all": t_all}, set(np.flatnonzero(status == 0).tolist()))}
            if datatrove_python:
                times, kept = _run_datatrove(datatrove_python, path)
                results[names[1]] = ({"signatures": times["signatures"], "all": sum(times.values())}, kept)
            for name, (times, kept) in results.items():
                sig_rate[name].append(mb / times["signatures"])
                all_rate[name].append(mb / times["all"])
                caught[name] += sum(not (a in kept and b in kept) for a, b in pairs)
                removed[name].append(len(docs) - len(kept))
    predicted = float(np.mean(hasher.probability(np.array(sims))))
    print(f"\n## MinHash dedup, 14 bands × 8 rows, word 5-grams, one core: stdlib + planted copies ({mb:.1f} MB), "
          f"{seeds} plantings\n")  # fmt: skip
    print(f"{n_pairs} planted near-duplicates in all (1.5% of words replaced; Jaccard median {np.median(sims):.3f}). "
          f"Recall = planted pairs not left with both copies; the S-curve predicts {predicted:.3f}.\n")  # fmt: skip
    print("| implementation | signatures MB/s | all stages MB/s | recall | removed per run | speed vs datatrove |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(all_rate[names[-1]])
    for name in names:
        se = np.sqrt(caught[name] / n_pairs * (1 - caught[name] / n_pairs) / n_pairs)
        print(f"| {name} | {statistics.median(sig_rate[name]):.2f} | {statistics.median(all_rate[name]):.2f} "
              f"| {caught[name] / n_pairs:.3f} ± {se:.3f} | {statistics.median(removed[name]):.0f} "
              f"| {statistics.median(all_rate[name]) / base:.1f}× |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--datatrove-python", help="interpreter with datatrove installed")
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--train-mb", type=float, default=10)
    p.add_argument("--dedup-seeds", type=int, default=3, help="plantings of near-duplicates to pool")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    if not args.skip_prepare:
        bench_prepare()
    bench_extraction()
    bench_bpe(args.vocab, args.train_mb)
    bench_dedup(args.datatrove_python, args.dedup_seeds)


if __name__ == "__main__":
    main()
