"""Inference engine benchmarks, each side by side with its baseline in this one process.

1. Batch-1 decode tokens/s of a gpt2-small-shaped model (fp32, int8, int4 group 64) on the engine
   vs transformers' `generate` with the same weights, and vs the memory-bandwidth floor: bytes of
   weights + KV read per token ÷ the machine's measured streaming read bandwidth. Decode rate =
   (n - 1) / (time for n new tokens - time for 1), so prefill is excluded for both.
2. Throughput with 1, 8 and 32 concurrent requests (32 requests, output lengths 8..64): continuous
   batching vs static batching (a batch of c requests runs until its longest finishes) vs one at a
   time.
3. Prefix caching: time to first token of a request sharing a 512-token system prompt, with the
   prefix cache warm vs disabled.
4. Speculative decoding: decode tokens/s with prompt lookup and with a 2-layer early-exit draft
   (the target's own first layers and head) vs plain decoding.

    python benchmarks/bench_infer.py [--reps 3] [--tokens 64] [--skip-hf]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from gptstack.config import get_preset
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.model import GPT, build_model, kv_cache_bytes_per_token
from gptstack.transforms.decode import decode_layout
from gptstack.transforms.quantize import quantize


def read_bandwidth(gib: float = 1.0, reps: int = 7) -> float:
    """Streaming read rate in bytes/s: a reduction over a buffer far larger than the caches."""
    buf = torch.ones(int(gib * 2**30) // 4)
    buf.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.nbytes / statistics.median(times)


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes a decode step reads: every linear layer's stored weights (codes, scales), one row of
    each embedding table."""
    total = 0
    for name, t in model.state_dict().items():
        if "wte" in name or "wpe" in name:
            total += t[0].numel() * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total  # a tied head appears in the state dict as lm_head.weight: counted whole once


def decode_rate(fn_n, fn_1, n: int, reps: int) -> float:
    """Median decode tokens/s over reps, alternating the n-token and 1-token runs."""
    rates = []
    for _ in range(reps):
        t1 = timed(fn_1)
        tn = timed(fn_n)
        rates.append((n - 1) / (tn - t1))
    return statistics.median(rates)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def engine_generate(model: GPT, prompt: list[int], n: int, **config) -> Engine:
    engine = Engine(model, EngineConfig(max_seqs=1, **config))
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return engine


def part_decode(args, bandwidth: float) -> list[dict]:
    cfg = get_preset("gpt2-small")
    prompt = list(range(1000, 1016))
    n = args.tokens
    rows = []
    base = build_model(cfg, seed=0).eval()
    if not args.skip_hf:
        from gptstack.interop.hf import to_hf_model

        hf = to_hf_model(base)
        ids = torch.tensor([prompt])

        def hf_gen(k):
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)

        hf_gen(2)
        rate = decode_rate(lambda: hf_gen(n), lambda: hf_gen(1), n, args.reps)
        rows.append(dict(impl="transformers generate, fp32", rate=rate, bytes=weight_bytes_per_token(base)))
        del hf
    models = {
        "gptstack engine, fp32": decode_layout(build_model(cfg, seed=0)),
        "gptstack engine, int8": quantize(build_model(cfg, seed=0), "int8"),
        "gptstack engine, int4 (g64)": quantize(build_model(cfg, seed=0), "int4", 64),
    }
    for name, model in models.items():
        engine_generate(model, prompt, 2)  # build the kernels, warm the caches
        rate = decode_rate(
            lambda m=model: engine_generate(m, prompt, n), lambda m=model: engine_generate(m, prompt, 1), n, args.reps
        )
        rows.append(dict(impl=name, rate=rate, bytes=weight_bytes_per_token(model)))
    kv = kv_cache_bytes_per_token(cfg, 4) * (len(prompt) + n / 2)  # K and V read at the mean context
    hf_rate = rows[0]["rate"] if not args.skip_hf else None
    print(f"\n### Batch-1 decode, gpt2-small shape, {n} new tokens after a {len(prompt)}-token prompt")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| implementation | weights + KV read per token | floor tok/s | tok/s | % of floor | × transformers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        per_token = r["bytes"] + kv
        floor = bandwidth / per_token
        vs = f"{r['rate'] / hf_rate:.2f}" if hf_rate else "-"
        rate = r["rate"]
        cells = [r["impl"], f"{per_token / 1e6:.0f} MB", f"{floor:.0f}", f"{rate:.1f}", f"{rate / floor:.0%}", vs]
        print("| " + " | ".join(cells) + " |")
    return rows


def part_throughput(args) -> None:
    cfg = get_preset("gpt2-small")
    model = decode_layout(build_model(cfg, seed=0))
    rng = random.Random(0)
    reqs = [([rng.randrange(50000) for _ in range(32)], rng.randint(8, 64)) for _ in range(args.requests)]
    total_out = sum(n for _, n in reqs)

    def params(n):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def continuous(c):
        Engine(model, EngineConfig(max_seqs=c)).generate([p for p, _ in reqs], [params(n) for _, n in reqs])

    def static(c):
        engine = Engine(model, EngineConfig(max_seqs=c))
        for i in range(0, len(reqs), c):  # the next batch starts when the whole batch has finished
            batch = reqs[i : i + c]
            engine.generate([p for p, _ in batch], [params(n) for _, n in batch])

    engine_generate(model, reqs[0][0], 2)
    serial = timed(lambda: continuous(1))
    print(f"\n### Throughput: {len(reqs)} requests, 32-token prompts, {total_out} output tokens (8..64 each)\n")
    print("| concurrency | one at a time tok/s | static batching tok/s | continuous batching tok/s | × one at a time |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for c in (1, 8, 32):
        t_static = timed(lambda c=c: static(c)) if c > 1 else serial
        t_cont = timed(lambda c=c: continuous(c)) if c > 1 else serial
        print(
            f"| {c} | {total_out / serial:.1f} | {total_out / t_static:.1f} | {total_out / t_cont:.1f} | "
            f"{serial / t_cont:.2f} |"
        )


def part_prefix(args) -> None:
    cfg = get_preset("gpt2-small")
    model = decode_layout(build_model(cfg, seed=0))
    rng = random.Random(1)
    system = [rng.randrange(50000) for _ in range(512)]

    def ttft(engine: Engine, user: list[int]) -> float:
        t = time.perf_counter()
        engine.add_request(system + user, SamplingParams(temperature=0, max_tokens=1))
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t

    on, off = Engine(model, EngineConfig(max_seqs=4)), Engine(model, EngineConfig(max_seqs=4, prefix_caching=False))
    ttft(on, [1, 2, 3])  # the first request fills the cache
    ttft(off, [1, 2, 3])
    with_cache, without = [], []
    for _ in range(args.reps):
        user = [rng.randrange(50000) for _ in range(16)]
        with_cache.append(ttft(on, user))
        without.append(ttft(off, user))
    a, b = statistics.median(with_cache), statistics.median(without)
    print("\n### Prefix caching: 512-token shared system prompt + 16-token user turn\n")
    print("| prefix cache | time to first token (ms) | speed-up | hit rate |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| off | {b * 1e3:.0f} | 1.00 | 0% |")
    print(f"| on | {a * 1e3:.0f} | {b / a:.1f} | {on.prefix_hit_rate:.0%} |")


def early_exit(model: GPT, n_layer: int) -> GPT:
    """A draft that shares the target's weights: its first n_layer blocks, final norm and head."""
    draft = build_model(model.config.replace(n_layer=n_layer))
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if k in draft.state_dict()})
    return draft.eval()


def part_speculative(args) -> None:
    cfg = get_preset("gpt2-small")
    base = build_model(cfg, seed=0)
    target = decode_layout(build_model(cfg, seed=0))
    draft = decode_layout(early_exit(base, 2))
    prompt = list(range(2000, 2032))
    n = args.tokens
    print(f"\n### Speculative decoding, gpt2-small shape, batch 1, {n} tokens (random weights: see caveat)\n")
    print("| decoding | tok/s | speed-up | draft tokens accepted |")
    print("| --- | ---: | ---: | ---: |")
    plain = decode_rate(
        lambda: engine_generate(target, prompt, n), lambda: engine_generate(target, prompt, 1), n, args.reps
    )
    print(f"| plain | {plain:.1f} | 1.00 | - |")
    for name, kw in (
        ("prompt lookup (n-gram, k=4)", dict(speculative="ngram")),
        ("early-exit draft (2 of 12 layers, k=4)", dict(speculative="draft")),
    ):
        d = draft if kw["speculative"] == "draft" else None

        def gen(k, kw=kw, d=d):
            engine = Engine(target, EngineConfig(max_seqs=1, **kw), draft=d)
            engine.generate([prompt], SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
            return engine

        rate = decode_rate(lambda gen=gen: gen(n), lambda gen=gen: gen(1), n, args.reps)
        print(f"| {name} | {rate:.1f} | {rate / plain:.2f} | {gen(n).acceptance_rate:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--parts", default="decode,throughput,prefix,speculative")
    args = ap.parse_args()
    torch.manual_seed(0)
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    bandwidth = read_bandwidth()
    parts = args.parts.split(",")
    if "decode" in parts:
        part_decode(args, bandwidth)
    if "throughput" in parts:
        part_throughput(args)
    if "prefix" in parts:
        part_prefix(args)
    if "speculative" in parts:
        part_speculative(args)


if __name__ == "__main__":
    main()
