"""Predictable scaling on the embedded default corpus: `gptstack scaling` over byte-level shards of the
Python standard library (prepared here if missing), then the table and the prediction errors.

    python benchmarks/bench_scaling.py --out runs/bench-scaling
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from gptstack.data.shards import write_texts
from gptstack.data.sources import corpus_texts
from gptstack.eval.scaling import ScalingConfig, scaling_markdown
from gptstack.tokenizer import byte_tokenizer
from gptstack.train.sweep import run_sweep


def chunks(text: str, size: int = 4000) -> list[str]:
    """Pieces of about `size` characters, cut at line ends."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/bench-scaling"))
    p.add_argument("--corpus-mb", type=float, default=24.0, help="bytes of stdlib source to shard")
    args = p.parse_args()
    shards = args.out / "shards"
    if not (shards / "manifest.json").is_file():
        texts = [c for t in corpus_texts(None, "train", max_bytes=int(args.corpus_mb * 1e6)) for c in chunks(t)]
        # The loader reads in order: shuffled ~4 kB pieces make every run's first D tokens (and the val
        # split) a uniform sample of the whole corpus, not of the few files that come first.
        random.Random(0).shuffle(texts)
        write_texts(shards, byte_tokenizer(), texts, val_fraction=0.02)
    manifest = json.loads((shards / "manifest.json").read_text())
    print(
        f"shards: {manifest['splits']['train']['tokens']:,} train / {manifest['splits']['val']['tokens']:,} val tokens"
    )
    start = time.perf_counter()
    results = run_sweep(ScalingConfig(data=str(shards), out=str(args.out / "sweep")))
    print(scaling_markdown(results))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
