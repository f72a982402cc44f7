"""The code-execution sandbox against hostile code (issue 24, item 2): every attack that got through the
old subprocess runner, reproduced against the real bubblewrap sandbox (gptstack/eval/execution.py).

Tests that need bwrap skip where it is missing or cannot make namespaces, and fail under CI=true
(.ci/run installs it). Each attack is bounded: small limits, a few seconds of CPU, loopback only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import need_sandbox, shared_file

import gptstack
from gptstack.checkpoint import save_checkpoint
from gptstack.cli import main
from gptstack.config import ModelConfig
from gptstack.eval import execution
from gptstack.eval.execution import ENV, Job, Limits, SandboxUnavailable, isolation_problem, run_job, run_jobs
from gptstack.eval.tasks import code_job, load_task
from gptstack.model import build_model
from gptstack.tokenizer import byte_tokenizer

REPO = Path(gptstack.__file__).resolve().parents[1]
ADD = {  # a HumanEval-format item that needs no shared data
    "task_id": "local/0", "entry_point": "add", "canonical_solution": "    return a + b\n",
    "prompt": 'def add(a, b):\n    """The sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}  # fmt: skip
SLEEPER = "import time; time.sleep(60)"  # what a leftover process runs; its argv carries a marker to find it by


def marker_processes(marker: str) -> list[int]:
    """Host processes whose command line holds `marker` (sandboxed ones show up here too)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def sandbox():
    need_sandbox()


# ---- the normal path still scores ----------------------------------------------------------------


def test_a_correct_solution_passes_and_a_wrong_one_fails(sandbox):
    assert run_job(code_job(ADD, ADD["canonical_solution"])) == execution.Outcome(True, "passed")
    wrong = run_job(code_job(ADD, "    return a - b\n"))
    assert wrong.status == "failed" and wrong.detail.startswith("AssertionError at test line 2")
    raised = run_job(code_job(ADD, "    return a / 0\n"))  # the candidate's exception reaches the test as itself
    assert raised.status == "failed" and raised.detail.startswith("ZeroDivisionError: division by zero")


def test_humaneval_items_whose_tests_call_prompt_helpers_or_the_function_by_name(sandbox):
    records = {r["task_id"]: r for r in load_task(shared_file("eval/human_eval.jsonl")).records}
    picked = [records[f"HumanEval/{i}"] for i in (0, 8, 32, 33, 38, 50)]  # 8: a tuple; 32/38/50: helpers; 33: by name
    assert all(o.passed for o in run_jobs([code_job(r, r["canonical_solution"]) for r in picked])), picked
    assert not any(o.passed for o in run_jobs([code_job(r, "    return None\n") for r in picked]))


@pytest.mark.slow
def test_every_humaneval_canonical_solution_passes(sandbox):
    """All 164 tests run with the candidate in its own process: no test relies on sharing one."""
    task = load_task(shared_file("eval/human_eval.jsonl"))
    outcomes = run_jobs([code_job(r, r["canonical_solution"]) for r in task.records], Limits(timeout=30))
    assert [r["task_id"] for r, o in zip(task.records, outcomes, strict=True) if not o.passed] == []


# ---- the verdict cannot be forged ----------------------------------------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        "    return 42\n\nimport os\nos._exit(0)\n",  # the old runner scored exit status 0 as a pass
        "    import os\n    os._exit(0)\n",  # exit inside the call check() makes
        "    raise SystemExit(0)\n",
        "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    ],
    ids=["exit-after-definition", "exit-in-call", "system-exit", "suicide"],
)
def test_exiting_early_is_not_a_pass(sandbox, completion):
    outcome = run_job(code_job(ADD, completion))
    assert outcome.status == "failed", outcome


def test_a_forged_pass_marker_or_eq_is_not_a_pass(sandbox):
    forged = json.dumps({"nonce": "0" * 32, "passed": True, "detail": ""})
    completion = f"""    return Always()


class Always:  # equal to anything: the old in-process check passed it
    def __eq__(self, other):
        return True


import os
for fd in range(1024):  # every descriptor it holds, its socket to the harness included
    try:
        os.write(fd, {forged!r}.encode() + b"\\npassed\\n")
    except OSError:
        pass
for fd in range(64):  # the harness's descriptors through /proc: it is not dumpable
    try:
        with open(f"/proc/{{os.getppid()}}/fd/{{fd}}", "w") as f:
            f.write({forged!r})
    except OSError:
        pass
print({forged!r})
"""
    outcome = run_job(code_job(ADD, completion))
    assert outcome.status == "failed" and not outcome.passed, outcome


# ---- nothing outside is reachable ----------------------------------------------------------------

LEAK = r'''
import os


def ancestors():
    pid, out = os.getpid(), []
    for _ in range(3):  # parent, grandparent, great-grandparent: the harness, the evaluator, pytest
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        out.append(pid)
    return [p for p in out if p > 0]


def in_memory(pid, secret):
    try:
        with open(f"/proc/{pid}/maps") as f, open(f"/proc/{pid}/mem", "rb") as mem:
            for line in f:
                if line.rstrip().endswith(("[stack]", "[heap]")):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    mem.seek(lo)
                    if secret in mem.read(min(hi - lo, 16 << 20)):
                        return True
    except (OSError, ValueError, OverflowError):
        pass
    return False


def leak(secret, paths):
    """Which of the host's secrets this code can read: files outside, environments, memory."""
    secret = secret.encode()
    files = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                files.append(f.read(1 << 16))
        except OSError:
            files.append(b"")
    environ = b""
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ += f.read(1 << 16)
        except OSError:
            pass
    leaks = {"file": secret in files[0], "repo": bool(files[1]), "environ": secret in environ,
             "memory": any(in_memory(p, secret) for p in ancestors())}
    return {"leaks": leaks, "env": dict(os.environ)}
'''

# An evaluator process of its own that loads only the sandbox module (it imports nothing of gptstack;
# importing the package would load torch, 5-10 s on a loaded 2-core machine).
EVALUATOR = f"""
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("execution", {str(Path(execution.__file__))!r})
execution = sys.modules["execution"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(execution)
Job, Limits, run_job = execution.Job, execution.Limits, execution.run_job
jobs, unsafe = json.loads(sys.argv[1]), sys.argv[2] == "unsafe"
for job in jobs:
    job["code"] = job["code"].replace("EVALUATOR_PID", str(os.getpid()))
    outcome = run_job(Job(**job), Limits(timeout=20), unsafe=unsafe)
    print(json.dumps(outcome.__dict__), flush=True)
"""


def evaluate_elsewhere(jobs: list[Job], env: dict, unsafe: bool = False) -> list[dict]:
    """Run `jobs` from an evaluator process of its own, started with `env`: its secrets sit in its
    /proc/PID/environ and its stack, where the old runner's code read them."""
    args = [sys.executable, "-c", EVALUATOR, json.dumps([dataclasses.asdict(j) for j in jobs])]
    r = subprocess.run([*args, "unsafe" if unsafe else "safe"], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=180)  # fmt: skip
    assert r.returncode == 0, f"the evaluator died (status {r.returncode}): {r.stderr[-1500:]}"
    return [json.loads(line) for line in r.stdout.splitlines()]


def leak_job(secret: str, secret_file: Path) -> Job:
    paths = [str(secret_file), str(REPO / "README.md")]
    scrubbed = sorted({*ENV, "PWD"})  # bwrap sets PWD (to /tmp)
    test = (f"def check(candidate):\n    got = candidate({secret!r}, {paths!r})\n"
            f"    assert not any(got['leaks'].values()), got['leaks']\n"
            f"    assert set(got['env']) <= set({scrubbed!r}), got['env']\n")  # fmt: skip
    return Job(LEAK, test, "leak")


@pytest.fixture(scope="module")
def evaluator_secret(tmp_path_factory):
    secret = "gptstack-secret-" + secrets.token_hex(8)
    path = tmp_path_factory.mktemp("host") / "secret.txt"
    path.write_text(secret)
    return secret, path, {**os.environ, "GPTSTACK_TEST_SECRET": secret}


def test_files_environment_and_memory_outside_are_out_of_reach(sandbox, evaluator_secret):
    """Reading a file in the evaluator's /tmp and the repository, and the evaluator's secret through
    /proc/PID/environ and /proc/PID/mem, all fail; the candidate's own environment is the scrubbed one."""
    secret, path, env = evaluator_secret
    (outcome,) = evaluate_elsewhere([leak_job(secret, path)], env)
    assert outcome["passed"], outcome


def test_without_the_sandbox_the_same_attack_reads_the_secrets(evaluator_secret):
    """The control: through the --unsafe-exec path (no bwrap on PATH) the attack above does leak, so the
    test above is not passing for want of an attack that works."""
    secret, path, env = evaluator_secret
    (outcome,) = evaluate_elsewhere([leak_job(secret, path)], {**env, "PATH": "/nonexistent"}, unsafe=True)
    assert not outcome["passed"] and "'file': True" in outcome["detail"] and "'environ': True" in outcome["detail"]


def test_killing_the_evaluator_fails(sandbox, evaluator_secret):
    """os.kill(evaluator), os.kill(getppid()) and kill(-1) reach nothing outside the PID namespace."""
    code = "import os, signal\nfor pid in (EVALUATOR_PID, os.getppid(), -1):\n"
    code += "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
    (outcome,) = evaluate_elsewhere([Job(code)], evaluator_secret[2])  # the evaluator lived to report it
    assert outcome["status"] == "failed", outcome


def test_writing_outside_fails(sandbox, tmp_path):
    host_tmp = Path("/tmp") / f"gptstack-pwned-{secrets.token_hex(4)}"
    targets = [str(tmp_path / "pwned"), str(host_tmp), str(REPO / "pwned"), "/usr/pwned", "/pwned", "/dev/shm/pwned"]
    code = """
def scribble(paths):
    wrote = []
    for path in paths:
        try:
            with open(path, "w") as f:
                f.write("pwned")
            wrote.append(path)
        except OSError:
            pass
    return wrote
"""
    test = f"def check(candidate):\n    assert candidate({targets!r}) == [{str(host_tmp)!r}]\n"  # its own /tmp only
    try:
        assert run_job(Job(code, test, "scribble")).passed
        assert not [t for t in targets if Path(t).exists()]  # the /tmp it wrote was private and is gone
    finally:
        for t in targets:
            Path(t).unlink(missing_ok=True)


def test_no_network_in_or_out(sandbox):
    host = socket.create_server(("127.0.0.1", 0))  # a listener on the host's loopback
    host.setblocking(False)
    unix = socket.socket(socket.AF_UNIX)  # an abstract unix socket: shared by a network namespace
    unix.bind(f"\0gptstack-test-{secrets.token_hex(4)}")
    unix.listen()
    unix.setblocking(False)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        inner = free.getsockname()[1]  # a port free on the host, for the candidate to listen on
    code = """
import socket


def probe(targets, port):
    out = {}
    for name, family, address in targets:
        s = socket.socket(family)
        s.settimeout(1)
        try:
            s.connect(tuple(address) if family == socket.AF_INET else "\\0" + address[1:])
            out[name] = "connected"
        except OSError as e:
            out[name] = type(e).__name__
    server = socket.create_server(("127.0.0.1", port))  # listening works, on a loopback of its own
    server.settimeout(2)
    try:
        server.accept()
        out["accepted"] = True
    except OSError:
        out["accepted"] = False
    return out
"""
    targets = [("tcp", int(socket.AF_INET), ["127.0.0.1", host.getsockname()[1]]),
               ("unix", int(socket.AF_UNIX), "@" + os.fsdecode(unix.getsockname())[1:]),
               ("internet", int(socket.AF_INET), ["1.1.1.1", 53])]  # fmt: skip
    test = f"def check(candidate):\n    got = candidate({targets!r}, {inner})\n"
    test += "    assert 'connected' not in got.values() and got['accepted'] is False, got\n"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_job, Job(code, test, "probe"))
        refused = 0
        while not running.done():  # the host cannot reach the candidate's listener either
            try:
                socket.create_connection(("127.0.0.1", inner), timeout=0.2).close()
            except OSError:
                refused += 1
            time.sleep(0.05)
        outcome = running.result()
    assert outcome.passed, outcome
    assert refused > 0
    for listener in (host, unix):
        with pytest.raises(BlockingIOError):  # nothing ever connected to the host's listeners
            listener.accept()
        listener.close()


# ---- limits hold ---------------------------------------------------------------------------------


def test_a_fork_bomb_is_bounded_by_the_process_limit(sandbox):
    marker = f"gptstack-bomb-{secrets.token_hex(4)}"
    code = f"""
import os, sys


def bomb(n):
    started = 0
    for _ in range(n):
        try:
            pid = os.fork()
        except OSError:  # EAGAIN: RLIMIT_NPROC
            break
        if pid == 0:
            os.execv(sys.executable, [sys.executable, "-c", {SLEEPER!r}, {marker!r}])
        started += 1
    return started
"""
    limits = Limits(timeout=10, processes=4)  # the harness, the candidate and two more
    test = "def check(candidate):\n    assert candidate(64) == 2\n"
    assert run_job(Job(code, test, "bomb"), limits).passed
    assert marker_processes(marker) == []
    spin = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t = time.monotonic()
    assert run_job(Job(spin), Limits(timeout=1.5, processes=4)).status == "timeout"
    assert time.monotonic() - t < 6


def test_memory_across_children_is_bounded(sandbox):
    """The address-space limit is per process, and the process limit bounds how many there are: at
    most processes × memory_mb in all, however the candidate splits its allocations."""
    code = """
import os
import signal


def hog(children, mb, limit_mb):
    try:
        bytearray(limit_mb << 20)  # one process cannot go over memory_mb
        return "allocated past the limit"
    except MemoryError:
        pass
    r, w = os.pipe()
    forked = 0
    for _ in range(children):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            try:
                block = b"x" * (mb << 20)  # written: resident, not just reserved
                os.write(w, b"1")
            finally:
                signal.pause()
        forked += 1
    os.close(w)
    import time
    got, deadline = 0, time.monotonic() + 10  # every started child reports, however loaded the machine
    os.set_blocking(r, False)
    while got < forked and time.monotonic() < deadline:
        try:
            got += len(os.read(r, 1024))
        except BlockingIOError:
            time.sleep(0.05)
    return got
"""
    test = "def check(candidate):\n    assert candidate(20, 160, 256) == 2\n"  # 20 children asked, 2 could start
    outcome = run_job(Job(code, test, "hog"), Limits(timeout=15, memory_mb=256, processes=4))
    assert outcome.passed, outcome


def test_no_process_outlives_the_run(sandbox):
    """A daemonised grandchild (setsid, double fork) is gone when the run returns: after a timeout,
    after a normal end, and when the evaluator itself is killed (--die-with-parent); the runner
    returns at its deadline although the grandchild holds the output pipe."""
    marker = f"gptstack-orphan-{secrets.token_hex(4)}"
    spawn = f"""import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {SLEEPER!r}, {marker!r}], start_new_session=True)
time.sleep(0.3)
"""
    assert run_job(Job(spawn)).passed
    assert marker_processes(marker) == []
    with ThreadPoolExecutor(1) as pool:
        t = time.monotonic()
        running = pool.submit(run_job, Job(spawn + "time.sleep(60)\n"), Limits(timeout=3))
        assert wait_for(lambda: marker_processes(marker), 10), "the grandchild never started"
        outcome = running.result()
    assert outcome.status == "timeout" and time.monotonic() - t < 8
    assert marker_processes(marker) == []
    job = json.dumps([dataclasses.asdict(Job(spawn + "time.sleep(60)\n"))])
    evaluator = subprocess.Popen([sys.executable, "-c", EVALUATOR, job, "safe"], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: marker_processes(marker), 60), "the grandchild never started"
    finally:
        evaluator.send_signal(signal.SIGKILL)
        evaluator.wait()
    assert wait_for(lambda: not marker_processes(marker), 5), marker_processes(marker)


def test_a_400_mb_stderr_flood_is_read_and_dropped(sandbox):
    """The old runner kept all of stderr (400 MB cost it 1.2 GB); now the evaluator holds at most
    output_kb of it, and the verdict still arrives."""
    flood = "import os\nchunk = b'x' * (1 << 20)\nfor _ in range(400):\n    os.write(2, chunk)\n"
    tracemalloc.start()
    try:
        outcome = run_job(Job(flood + "raise RuntimeError('flooded')\n"), Limits(timeout=60, output_kb=64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.output_bytes >= 400 << 20 and outcome.detail == "RuntimeError: flooded", outcome
    assert peak < 8 << 20, f"the evaluator held {peak / 2**20:.1f} MB of Python memory"


# ---- no isolation: refuse, unless allowed --------------------------------------------------------


@pytest.fixture
def no_bwrap(monkeypatch, tmp_path):
    """bwrap not on PATH: what a machine without bubblewrap looks like to the evaluator."""
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    isolation_problem.cache_clear()
    execution._warn_unsafe.cache_clear()
    yield
    isolation_problem.cache_clear()
    execution._warn_unsafe.cache_clear()


def test_without_isolation_code_is_refused_unless_unsafe(no_bwrap):
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap .*not installed.*--unsafe-exec"):
        run_jobs([code_job(ADD, ADD["canonical_solution"])])
    with pytest.warns(UserWarning, match="WITHOUT isolation"):
        right = run_job(code_job(ADD, ADD["canonical_solution"]), unsafe=True)
    assert right.passed
    # the verdict still comes from the harness: exiting early is no pass on this path either
    assert run_job(code_job(ADD, "    return 42\n\nimport os\nos._exit(0)\n"), unsafe=True).status == "failed"
    assert not run_job(code_job(ADD, "    return a - b\n"), unsafe=True).passed


def _code_task(tmp_path) -> tuple[str, str]:
    model = build_model(ModelConfig(vocab_size=300, block_size=128, n_layer=1, n_head=2, n_embd=16), seed=0)
    ckpt = save_checkpoint(model, tmp_path / "run" / "checkpoints", step=1, tokenizer=byte_tokenizer())
    task = tmp_path / "add.jsonl"
    task.write_text(json.dumps(ADD) + "\n")
    return str(ckpt), str(task)


def test_cli_eval_runs_code_in_the_sandbox(sandbox, tmp_path):
    ckpt, task = _code_task(tmp_path)
    out = tmp_path / "r.json"
    assert main(["eval", ckpt, "--tasks", task, "--max-gen-tokens", "4", "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["add"]["pass@1"] == 0.0  # a random model's 4 tokens


def test_cli_eval_refuses_code_without_isolation_unless_unsafe_exec(no_bwrap, tmp_path, capsys):
    ckpt, task = _code_task(tmp_path)
    args = ["eval", ckpt, "--tasks", task, "--max-gen-tokens", "4", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refusing to run generated code" in err and "--unsafe-exec" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match="WITHOUT isolation"):
        assert main([*args, "--unsafe-exec"]) == 0
