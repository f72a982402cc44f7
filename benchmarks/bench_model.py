"""Model speed against transformers, same weights, same process, interleaved runs, medians.

1. forward+backward training tokens/s of a gpt2-small-shaped model (batch 4 × 256 by default):
   gptstack GPT vs transformers.GPT2LMHeadModel holding the same weights (exported by interop/hf.py);
2. decode-step latency at a 512-token context: one new token with the KV cache vs re-running the
   whole sequence without it, for both implementations, and for ours with the CPU decode layout
   (transforms/decode.py: linear weights stored (in, out), what `gptstack generate` uses on CPU).

    python benchmarks/bench_model.py [--reps 7] [--batch 4] [--seq 256] [--context 512]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import DynamicCache

from gptstack.config import get_preset
from gptstack.infer.kvcache import KVCache
from gptstack.interop.hf import to_hf_model
from gptstack.model import build_model
from gptstack.transforms.decode import decode_layout


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn, alternating between them every repetition (noise hits both)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()

    torch.manual_seed(0)
    ours = build_model(get_preset("gpt2-small"), seed=0)
    theirs = to_hf_model(ours)  # the same weights in transformers' GPT-2
    ours.train(), theirs.train()  # dropout is 0 in both: identical math, training-mode code paths
    idx = torch.randint(0, 50257, (args.batch, args.seq))

    def ours_step():
        _, loss = ours(idx, targets=idx)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def hf_step():
        theirs(idx, labels=idx).loss.backward()
        theirs.zero_grad(set_to_none=True)

    train = interleave({"gptstack": ours_step, "transformers": hf_step}, args.reps)
    tokens = args.batch * args.seq

    ours.eval(), theirs.eval()
    fast = decode_layout(build_model(get_preset("gpt2-small"), seed=0))  # same weights, (in, out) layout
    ctx = args.context
    seq = torch.randint(0, 50257, (1, ctx))
    cache = KVCache(ours.config, 1, ctx)
    fast_cache = KVCache(ours.config, 1, ctx)
    hf_cache = DynamicCache(config=theirs.config)
    with torch.no_grad():
        ours(seq[:, :-1], kv_cache=cache)  # prefill ctx-1 tokens once
        fast(seq[:, :-1], kv_cache=fast_cache)
        theirs(seq[:, :-1], past_key_values=hf_cache, use_cache=True)

        def ours_cached():
            cache.pos = ctx - 1  # rewrite the last slot every repetition
            ours(seq[:, -1:], kv_cache=cache)

        def fast_cached():
            fast_cache.pos = ctx - 1
            fast(seq[:, -1:], kv_cache=fast_cache)

        def hf_cached():
            theirs(seq[:, -1:], past_key_values=hf_cache, use_cache=True)
            hf_cache.crop(-1)  # drop the token again (a slice: microseconds against a ms-scale step)

        decode = interleave(
            {
                "gptstack+layout cached": fast_cached,
                "gptstack cached": ours_cached,
                "transformers cached": hf_cached,
                "gptstack+layout uncached": lambda: fast(seq),
                "gptstack uncached": lambda: ours(seq),
                "transformers uncached": lambda: theirs(seq, use_cache=False),
            },
            args.reps * 3,
        )

    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"\n### forward+backward, gpt2-small shape, batch {args.batch} × {args.seq}, fp32, median of {args.reps}\n")
    print("| implementation | s/step | tokens/s | vs transformers |")
    print("| --- | ---: | ---: | ---: |")
    for name, s in train.items():
        print(f"| {name} | {s:.3f} | {tokens / s:,.0f} | {train['transformers'] / s:.2f}× |")
    print(f"\n### one decode step at {ctx} tokens of context, batch 1, median of {args.reps * 3}\n")
    print("| implementation | ms/token | speed-up from the cache |")
    print("| --- | ---: | ---: |")
    for impl in ("gptstack+layout", "gptstack", "transformers"):
        for mode in ("cached", "uncached"):
            s = decode[f"{impl} {mode}"]
            gain = decode[f"{impl} uncached"] / decode[f"{impl} cached"]
            print(f"| {impl} {mode} | {1000 * s:.1f} | {f'{gain:.1f}×' if mode == 'cached' else ''} |")
    for impl in ("gptstack+layout", "gptstack"):
        ratio = decode["transformers cached"] / decode[f"{impl} cached"]
        print(f"\ncached decode, {impl} vs transformers: {ratio:.2f}×", end="")
    print()


if __name__ == "__main__":
    main()
