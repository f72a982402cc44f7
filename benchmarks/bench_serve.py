"""Serving load benchmark in the style of vLLM's benchmark_serving: Poisson arrivals, fixed prompt and
output lengths (token-id prompts, ignore_eos), streamed completions; TTFT, TPOT and inter-token
latency p50/p99, request and output-token throughput.

Two `gptstack serve` processes on the same checkpoint, measured by the same script one after the other:
ours (continuous batching, --max-seqs 32) and the baseline (--max-seqs 1: one request at a time, the
rest queue). The load generator runs in this process (asyncio + httpx) on loopback.

    python benchmarks/bench_serve.py                      # 6 layers x 512, cl100k vocab, 32 requests
    python benchmarks/bench_serve.py --requests 64 --rates inf,2 --prompt-len 128 --output-len 64
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


async def one(h: httpx.AsyncClient, model: str, prompt: list[int], out_len: int, seed: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "ignore_eos": True, "temperature": 1.0,
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


async def load(url: str, model: str, n: int, rate: float, prompt_len: int, out_len: int, vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(256, vocab) for _ in range(prompt_len)] for _ in range(n)]
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as h:
        tasks, start = [], time.perf_counter()
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(one(h, model, p, out_len, seed + i)))
            if rate != float("inf"):
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


def start_server(ckpt: Path, port: int, max_seqs: int, log_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptstack.cli", "serve", str(ckpt), "--name", "m", "--port", str(port)]
    cmd += ["--max-seqs", str(max_seqs), "--no-exact-cache", "--log-dir", str(log_dir), "--max-waiting", "100000"]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="serve this checkpoint (default: a random 6x512 model, cl100k vocab)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rates", default="inf,1", help="request rates (req/s, Poisson), comma-separated; inf: at once")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-seqs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from gptstack.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "bench-model"
        if not args.checkpoint:
            cli(["init", "gpt2-small", str(ckpt), "--tokenizer", "cl100k_base", "--set", "n_layer=6",
                 "--set", "n_embd=512", "--set", "n_head=8", "--set", "block_size=1024"])  # fmt: skip
        vocab = json.loads((ckpt / "config.json").read_text())["model"]["vocab_size"]
        rows = []
        for rate in [float(r) for r in args.rates.split(",")]:
            for label, seqs in (("gptstack serve", args.max_seqs), ("one at a time", 1)):
                port = 8700 + len(rows)
                proc = start_server(ckpt, port, seqs, Path(tmp) / f"logs{len(rows)}")
                try:
                    url = f"http://127.0.0.1:{port}"
                    asyncio.run(load(url, "m", 2, float("inf"), args.prompt_len, 4, vocab, 999))  # warm up
                    r = asyncio.run(load(url, "m", args.requests, rate, args.prompt_len, args.output_len, vocab,
                                         args.seed))  # fmt: skip
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                rows.append({"server": label, "rate": rate, **r})
                print(f"{label} @ {rate} req/s: {r['out_tok_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.2f} s",
                      file=sys.stderr)  # fmt: skip
    print(f"\n{args.requests} requests, prompt {args.prompt_len} tokens, output {args.output_len} tokens\n")
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


if __name__ == "__main__":
    main()
