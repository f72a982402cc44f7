"""Predictable scaling on the embedded default corpus: `gptstack scaling` over byte-level shards of the
Python standard library (prepared here if missing), then the table and the prediction errors.

    python benchmarks/bench_scaling.py --out runs/bench-scaling

With `--capability add copy` the generated task families of gptstack.eval.capability are mixed into the
training text (`--task-share` of its bytes; their test items never are) and every run is also scored
and predicted on them (issue 23):

    python benchmarks/bench_scaling.py --out runs/bench-capability --corpus-mb 4 --capability add copy \\
        --task-share 0.5 --widths 12 16 24 32 --extra-ratios 2.5 --eval-batches 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from gptstack.data.shards import write_texts
from gptstack.data.sources import corpus_texts
from gptstack.eval.capability import training_documents
from gptstack.eval.scaling import ScalingConfig
from gptstack.tokenizer import byte_tokenizer
from gptstack.train.sweep import run_sweep, sweep_markdown


def chunks(text: str, size: int = 4000) -> list[str]:
    """Pieces of about `size` characters, cut at line ends."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def task_documents(families: list[str], n_bytes: int) -> list[str]:
    """Training documents of each family, about n_bytes / len(families) bytes of each."""
    docs = []
    for family in families:
        made, size = [], 0
        while size < n_bytes / len(families):
            made += training_documents(family, 500, seed=len(made))
            size = sum(len(d) for d in made)
        docs += made
    return docs


def prepare(shards: Path, corpus_mb: float, families: list[str], task_share: float) -> None:
    texts = [c for t in corpus_texts(None, "train", max_bytes=int(corpus_mb * 1e6)) for c in chunks(t)]
    if families:
        texts += task_documents(families, int(task_share / (1 - task_share) * sum(len(t) for t in texts)))
    # The loader reads in order: shuffled ~4 kB pieces make every run's first D tokens (and the val
    # split) a uniform sample of the whole corpus, not of the few files that come first.
    random.Random(0).shuffle(texts)
    write_texts(shards, byte_tokenizer(), texts, val_fraction=0.02)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-scaling"))
    p.add_argument("--corpus-mb", type=float, default=24.0, help="bytes of stdlib source to shard")
    p.add_argument("--capability", nargs="*", default=[], help="task families to mix in, score and predict")
    p.add_argument("--task-share", type=float, default=0.25, help="share of the training bytes that are task lines")
    p.add_argument("--widths", type=int, nargs="+", help="the ladder's widths (default: ScalingConfig's)")
    p.add_argument("--extra-ratios", type=float, nargs="+", help="the extra runs' D/N (default: ScalingConfig's)")
    p.add_argument("--eval-batches", type=int, help="val batches per run (default: ScalingConfig's)")
    p.add_argument("--heldout-compute", type=float, help="held-out / largest fitted compute (default: ScalingConfig's)")
    args = p.parse_args()
    shards = args.out / "shards"
    if not (shards / "manifest.json").is_file():
        prepare(shards, args.corpus_mb, args.capability, args.task_share)
    manifest = json.loads((shards / "manifest.json").read_text())
    print(
        f"shards: {manifest['splits']['train']['tokens']:,} train / {manifest['splits']['val']['tokens']:,} val tokens"
    )
    given = {"widths": args.widths, "extra_ratios": args.extra_ratios, "eval_batches": args.eval_batches,
             "heldout_compute": args.heldout_compute}  # fmt: skip
    cfg = ScalingConfig(data=str(shards), out=str(args.out / "sweep"), capability=args.capability,
                        **{k: v for k, v in given.items() if v is not None})  # fmt: skip
    start, load = time.perf_counter(), os.getloadavg()
    results = run_sweep(cfg)
    print(sweep_markdown(results))
    print(f"\nwall time {time.perf_counter() - start:.0f} s; load average at start {load[0]:.1f}, "
          f"at the end {os.getloadavg()[0]:.1f} (2-core CPU)")  # fmt: skip


if __name__ == "__main__":
    main()
