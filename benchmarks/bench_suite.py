"""The test suite's time budget (issue 18): the fast loop and the full suite, against their limits.

    python benchmarks/bench_suite.py            # both runs, one after the other (about 10 minutes on 2 cores)
    python benchmarks/bench_suite.py --fast     # only `-m "not slow"`

Runs pytest as a user would (`python -m pytest`, the command of the README and .ci/run) in a fresh
process, with no other load on the machine, and prints wall time, the number of tests, the budget
and the share of the budget used, then the slowest tests of each run (pytest's own --durations).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"fast loop": (["-m", "not slow"], 180.0), "full suite": ([], 600.0)}  # name → (pytest args, budget s)


def run(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=8", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"pytest {' '.join(args)} failed:\n{proc.stdout[-3000:]}")
    return seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="only the fast loop")
    names = ["fast loop"] if ap.parse_args().fast else list(RUNS)
    rows, slowest = [], {}
    for name in names:
        args, budget = RUNS[name]
        seconds, out = run(args)
        counted = re.search(r"(\d+) passed", out)
        rows.append((name, seconds, int(counted.group(1)) if counted else 0, budget))
        slowest[name] = re.findall(r"^\s*([\d.]+)s (call|setup)\s+(\S+)", out, re.M)[:8]
    print("| run | wall time | tests passed | budget | share of budget |\n|---|---:|---:|---:|---:|")
    for name, seconds, n, budget in rows:
        wall = f"{seconds / 60:.1f} min ({seconds:.0f} s)"
        print(f"| {name} | {wall} | {n} | {budget / 60:.0f} min | {seconds / budget:.0%} |")
    for name, items in slowest.items():
        print(f"\nslowest in the {name}:")
        for secs, phase, test in items:
            print(f"  {float(secs):6.1f} s  {phase:<5}  {test}")


if __name__ == "__main__":
    main()
