"""Predictable scaling on the embedded default corpus: `gptstack scaling` over byte-level shards of the
Python standard library (prepared here if missing), then the table and the prediction errors.

    python benchmarks/bench_scaling.py --out runs/bench-scaling
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gptstack.data.shards import write_texts
from gptstack.data.sources import corpus_texts
from gptstack.eval.scaling import ScalingConfig, run_sweep, scaling_markdown
from gptstack.tokenizer import byte_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/bench-scaling"))
    p.add_argument("--corpus-mb", type=float, default=24.0, help="bytes of stdlib source to shard")
    args = p.parse_args()
    shards = args.out / "shards"
    if not (shards / "manifest.json").is_file():
        texts = corpus_texts(None, "train", max_bytes=int(args.corpus_mb * 1e6))
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
