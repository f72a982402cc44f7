"""Running generated code (HumanEval pass@k), each program in its own Python process.

The child runs in isolated mode (-I: no user site, no PYTHON* variables, no cwd on sys.path) in an
empty temporary directory, with a wall-clock timeout, CPU-seconds and address-space limits (RLIMIT_CPU,
RLIMIT_AS), no core dumps and a bounded output. This contains an honest model's mistakes (infinite
loops, memory blow-ups, crashes); it is not a security boundary against hostile code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str = ""


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:  # runs in the child between fork and exec
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setsid()  # its own process group, so a timeout kills whatever it spawned

    return apply


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run `program`; it passes when it exits 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="gptstack-exec-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_limits(memory_mb, int(timeout) + 1),
            )  # fmt: skip
        except OSError as e:
            return Outcome(False, "error", f"cannot start python: {e}")
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            return Outcome(False, "timeout", f"no exit within {timeout:g} s")
        if proc.returncode == 0:
            return Outcome(True, "passed")
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
        return Outcome(False, "failed", tail[0][:300] if tail else f"exit status {proc.returncode}")


def run_programs(programs: list[str], timeout: float = 10.0, memory_mb: int = 1024, workers: int = 4) -> list[Outcome]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb), programs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prob = 1.0
    for i in range(n - c + 1, n + 1):
        prob *= 1.0 - k / i
    return 1.0 - prob
