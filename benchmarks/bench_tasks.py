"""The shared tasks at 0 and 5 shots on a CPU-trained checkpoint, next to the random baselines.

python benchmarks/bench_tasks.py CKPT --limit 200 [--gen-limit 50]
"""

from __future__ import annotations

import argparse
import time

from gptstack.eval.run import run_tasks
from gptstack.eval.scorer import load_scorer
from gptstack.eval.tasks import resolve_task

SCORED = [
    "arc_easy", "arc_challenge", "boolq", "copa", "commonsense_qa", "hellaswag", "openbook_qa", "piqa",
    "winogrande", "lambada_openai", "jeopardy_all", "simple_arithmetic_withspaces", "bigbench_operators",
]  # fmt: skip
GENERATED = ["gsm8k", "human_eval"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--gen-limit", type=int, default=50, help="items of the generation tasks")
    p.add_argument("--max-gen-tokens", type=int, default=64)
    args = p.parse_args()
    scorer = load_scorer(args.checkpoint)
    results = {}
    for shots in (0, 5):
        start = time.perf_counter()
        scorer.truncated = 0
        r = run_tasks(scorer, [resolve_task(t) for t in SCORED], shots, args.limit)
        g = run_tasks(scorer, [resolve_task(t) for t in GENERATED], shots, args.gen_limit,
                      max_gen_tokens=args.max_gen_tokens)  # fmt: skip
        r["tasks"].update(g["tasks"])
        r["core"] = sum(m["centered"] for m in r["tasks"].values()) / len(r["tasks"])
        r["seconds"], r["truncated"] = time.perf_counter() - start, g["truncated_requests"]
        results[shots] = r
    print(f"checkpoint {args.checkpoint}; first {args.limit} items per task ({args.gen_limit} for generation)\n")
    print("| task | kind | items | random | 0-shot acc | 0-shot acc_norm | 5-shot acc | 5-shot acc_norm |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, m0 in results[0]["tasks"].items():
        m5 = results[5]["tasks"][name]
        norm = [f"{m['acc_norm']:.3f}" if "acc_norm" in m else "" for m in (m0, m5)]
        print(f"| {name} | {m0['kind']} | {m0['items']} | {m0['random']:.3f} | {m0['acc']:.3f} | {norm[0]} "
              f"| {m5['acc']:.3f} | {norm[1]} |")  # fmt: skip
    for shots, r in results.items():
        c = r.get("calibration", {})
        print(f"\n{shots}-shot: CORE centred accuracy {r['core']:+.4f}; ECE {c.get('ece', float('nan')):.3f}; "
              f"{r['truncated']} requests truncated to the context; {r['seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
