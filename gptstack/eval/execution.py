"""Running generated code (HumanEval pass@k) in a sandbox: bubblewrap namespaces, rlimits, an unforgeable verdict.

Each run is one bubblewrap (bwrap) sandbox, the way code-evaluation services isolate untrusted programs:

    bwrap --unshare-user/pid/net/ipc/uts/cgroup --die-with-parent --new-session
          --ro-bind /usr /usr --symlink usr/lib /lib …   the interpreter, read-only: /usr, /lib*, Python's prefix
          --proc /proc --dev /dev                        a /proc of its own PID namespace: no host process in it
          --perms 1777 --size N --tmpfs /tmp             a private writable /tmp of bounded size, the cwd
          --remount-ro /dev --remount-ro /               nothing else: no /root, /home, /work, /etc, no sockets
          python -P -s /exec_harness.py JOB_FD RESULT_FD LIMITS

with a scrubbed environment (ENV: no variable of the evaluator's reaches it) and no network (a network
namespace of its own: an isolated loopback). exec_harness.py applies the rlimits (CPU seconds, address space
per process, processes, file size), runs the candidate's code in a process of its own and the trusted test in
its own process, and writes the verdict with this run's random nonce on a pipe that the candidate process
does not hold. A run passes only on that verdict: exiting 0 early or printing a marker is a failure.

The evaluator reads at most `output_kb` of the merged stdout/stderr (the rest is read and dropped), and at
the deadline kills bwrap's process group and the sandbox's PID 1, which takes the whole PID namespace with
it; every run waits until the namespace is empty (a pidfd on PID 1) before it returns. --die-with-parent
does the same if the evaluator itself dies.

Started as root (a container), bwrap makes no user namespace and the harness drops to a uid of the run's
own before the candidate starts (RLIMIT_NPROC does not apply to root). Otherwise bwrap makes an unprivileged
user namespace. Where bwrap is missing or cannot make namespaces, running code is refused with
SandboxUnavailable, unless the caller allows it (`unsafe=True`, `gptstack eval --unsafe-exec`): then the
harness runs as a plain subprocess with the same rlimits but no process limit and none of the isolation (its
verdict then holds against mistakes such as an early exit, not against code that reads the evaluator's memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import math
import os
import secrets
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from selectors import EVENT_READ, EVENT_WRITE

HARNESS = Path(__file__).with_name("exec_harness.py")
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "PYTHONHASHSEED": "0",
       "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
RUN_UIDS = (1 << 20, 1 << 24)  # as root, each run's processes get a uid of their own from this range
RESULT_BYTES = 1 << 16  # the harness's verdict is a short JSON line; more is not read
GRACE_S = 0.5  # after the verdict and bwrap's exit, how long to wait for the output pipe to close


class SandboxUnavailable(ValueError):
    """Generated code cannot be isolated here, and running it without isolation was not allowed."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds for the whole run; the CPU limit is this rounded up, + 1
    memory_mb: int = 1024  # address space of each process (RLIMIT_AS)
    processes: int = 4  # processes and threads at once, the harness's own two included (RLIMIT_NPROC)
    file_mb: int = 16  # the largest file it may write (RLIMIT_FSIZE)
    tmp_mb: int = 64  # the size of its private /tmp
    output_kb: int = 64  # stdout+stderr kept for the failure detail; the rest is read and dropped


@dataclass(frozen=True)
class Job:
    code: str  # untrusted: runs in the candidate process (HumanEval: the prompt + the completion)
    test: str = ""  # trusted: defines check(candidate); empty: the job passes when the code runs to its end
    entry_point: str = ""  # the candidate's function that check() is given
    prelude: str = ""  # trusted code whose definitions the test may call (HumanEval: the prompt)


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str = ""
    output_bytes: int = 0  # what the run wrote on stdout+stderr (all of it read, the last output_kb kept)


# ---- the sandbox ---------------------------------------------------------------------------------


def _interpreter_mounts() -> list[str]:
    """bwrap arguments for a read-only view of what Python needs: /usr, the /lib* and /bin links, its prefix."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    bound = ["/usr"]
    for path in sorted({sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}):
        if any(path == b or path.startswith(b + "/") for b in bound):
            continue
        parents = list(Path(path).parents)[-2::-1]  # /root, /root/.pyenv, …: made 0755, not the host's 0700
        args += [a for p in parents for a in ("--dir", str(p))] + ["--ro-bind", path, path]
        bound.append(path)
    return args


def _bwrap_argv(limits: Limits, info_fd: int, uid: int | None) -> list[str]:
    """The bwrap command line up to the interpreter (see the module docstring)."""
    if uid is not None:  # root: no user namespace; the harness keeps only the capability to drop to `uid`
        ns = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
              "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # fmt: skip
    else:
        ns = ["--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
              "--unshare-cgroup-try", "--disable-userns"]  # fmt: skip
    return [
        "bwrap", *ns, "--die-with-parent", "--new-session", "--info-fd", str(info_fd),
        *_interpreter_mounts(), "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp",
        "--ro-bind", str(HARNESS), "/exec_harness.py", "--remount-ro", "/dev", "--remount-ro", "/",
        "--chdir", "/tmp",
    ]  # fmt: skip


def _harness_limits(limits: Limits, uid: int | None, sandboxed: bool) -> str:
    # In a user namespace bwrap's own PID 1 is one more process of the sandbox's uid.
    processes = (limits.processes + (uid is None)) if sandboxed else 0  # unsafe: the user's count is not ours
    cpu_s = math.ceil(limits.timeout) + 1
    return json.dumps({"cpu_s": cpu_s, "memory_mb": limits.memory_mb, "file_mb": limits.file_mb,
                       "processes": processes, "uid": uid})  # fmt: skip


@cache
def isolation_problem() -> str | None:
    """Why generated code cannot be isolated here (None when bwrap works): probed once per process."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    probe = _run(Job("pass"), Limits(timeout=30), sandboxed=True)
    return None if probe.passed else f"bwrap fails here ({probe.detail or probe.status})"


def sandboxed(unsafe: bool = False) -> bool:
    """True when runs are isolated; False, with a warning, when they cannot be but `unsafe` allows it."""
    problem = isolation_problem()
    if problem is None:
        return True
    if not unsafe:
        raise SandboxUnavailable(
            f"refusing to run generated code: {problem}, so it cannot be isolated. Install bubblewrap "
            "(Debian/Ubuntu: apt-get install bubblewrap) or, for code you trust, pass --unsafe-exec"
        )
    _warn_unsafe(problem)
    return False


@cache
def _warn_unsafe(problem: str) -> None:  # once per process, not once per task
    warnings.warn(f"running generated code WITHOUT isolation ({problem}): it can read and write your files, "
                  "reach the network and see your environment", stacklevel=3)  # fmt: skip


# ---- one run -------------------------------------------------------------------------------------


def run_job(job: Job, limits: Limits = Limits(), unsafe: bool = False) -> Outcome:
    """Run one job in the sandbox (see the module docstring); refuses without one unless `unsafe`."""
    return _run(job, limits, sandboxed(unsafe))


def run_jobs(jobs: list[Job], limits: Limits = Limits(), unsafe: bool = False, workers: int = 4) -> list[Outcome]:
    isolated = sandboxed(unsafe)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda j: _run(j, limits, isolated), jobs))


def _run(job: Job, limits: Limits, sandboxed: bool) -> Outcome:
    nonce = secrets.token_hex(16)
    payload = json.dumps({**dataclasses.asdict(job), "nonce": nonce}).encode()
    uid = secrets.randbelow(RUN_UIDS[1] - RUN_UIDS[0]) + RUN_UIDS[0] if sandboxed and os.geteuid() == 0 else None
    (job_r, job_w), (res_r, res_w), (info_r, info_w) = os.pipe(), os.pipe(), os.pipe()
    harness = ["/exec_harness.py" if sandboxed else str(HARNESS), str(job_r), str(res_w)]
    argv = [os.path.realpath(sys.executable), "-P", "-s", *harness, _harness_limits(limits, uid, sandboxed)]
    if sandboxed:
        argv = _bwrap_argv(limits, info_w, uid) + argv
    with tempfile.TemporaryDirectory(prefix="gptstack-exec-") as cwd:  # the cwd without a sandbox
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                pass_fds=(job_r, res_w, info_w), start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            proc = None
            detail = f"cannot start {argv[0]}: {e}"
        finally:
            for fd in (job_r, res_w, info_w):
                os.close(fd)
        if proc is None:
            for fd in (job_w, res_r, info_r):
                os.close(fd)
            return Outcome(False, "error", detail)
        run = _Run(proc, limits, job_w, res_r, info_r)
        try:
            run.communicate(payload, time.monotonic() + limits.timeout)
        finally:
            run.end()
    return run.outcome(nonce, limits)


class _Run:
    """One started sandbox: feeding it the job, reading its bounded output and verdict, killing what is left."""

    def __init__(self, proc: subprocess.Popen, limits: Limits, job_w: int, res_r: int, info_r: int):
        self.proc, self.keep, self.job_w, self.res_r, self.info_r = proc, limits.output_kb << 10, job_w, res_r, info_r
        self.out = proc.stdout.fileno()
        self.output, self.output_bytes, self.result, self.info = bytearray(), 0, bytearray(), bytearray()
        self.timed_out, self.pidfd = False, None

    def communicate(self, payload: bytes, deadline: float) -> None:
        """Until every pipe is closed, or the deadline; once the verdict is in and bwrap has exited, only
        GRACE_S more for the output (without a sandbox, an orphan the candidate left may hold it)."""
        os.set_blocking(self.job_w, False)
        sel, grace = selectors.DefaultSelector(), None  # epoll: no limit on descriptor numbers
        for fd, event in ((self.out, EVENT_READ), (self.res_r, EVENT_READ), (self.info_r, EVENT_READ),
                          (self.job_w, EVENT_WRITE)):  # fmt: skip
            sel.register(fd, event)
        with sel:
            while sel.get_map():
                now = time.monotonic()
                if now >= min(deadline, grace or deadline):
                    self.timed_out = now >= deadline
                    return
                if grace is None and self.res_r not in sel.get_map() and self.proc.poll() is not None:
                    grace = now + GRACE_S
                for key, _ in sel.select(min(deadline, grace or deadline) - now):
                    if key.fd == self.job_w:
                        if not (payload := self._feed(payload)):
                            sel.unregister(self.job_w)
                            os.close(self.job_w)  # EOF: the harness reads the job to its end
                            self.job_w = -1
                    elif not self._read(key.fd):
                        sel.unregister(key.fd)

    def _feed(self, payload: bytes) -> bytes:
        """Write what the pipe takes; what is left (nothing once the harness is gone)."""
        try:
            return payload[os.write(self.job_w, payload) :]
        except (BlockingIOError, InterruptedError):
            return payload
        except OSError:  # EPIPE: the harness is gone
            return b""

    def _read(self, fd: int) -> bool:
        """Read what is there; False at EOF. The output keeps its last `keep` bytes, the others their first."""
        data = os.read(fd, 1 << 16)
        if not data:
            return False
        if fd == self.out:
            self.output_bytes += len(data)
            self.output += data
            del self.output[: max(0, len(self.output) - self.keep)]
            return True
        buf = self.result if fd == self.res_r else self.info
        buf += data[: max(0, RESULT_BYTES - len(buf))]
        if fd == self.info_r and self.pidfd is None:
            self._watch_namespace()
        return True

    def _watch_namespace(self) -> None:
        """A pidfd on the sandbox's PID 1 (from bwrap's --info-fd), checked to be bwrap's own child."""
        try:
            pid = int(json.loads(self.info)["child-pid"])  # ValueError until the whole JSON is in
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                self.pidfd = os.pidfd_open(pid)
        except (ValueError, KeyError, TypeError, OSError):
            pass  # bwrap failed before it started the sandbox, or the sandbox has already ended

    def end(self) -> None:
        """Kill what is left (bwrap's group, the PID namespace) and wait until all of it is gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        for fd in (self.job_w, self.res_r, self.info_r):
            if fd >= 0:
                os.close(fd)
        if self.pidfd is not None:
            poll = select.poll()  # the pidfd is readable once PID 1 has exited, after its namespace emptied
            poll.register(self.pidfd, select.POLLIN)
            poll.poll(10_000)
            os.close(self.pidfd)

    def outcome(self, nonce: str, limits: Limits) -> Outcome:
        """The harness's verdict when it carries this run's nonce; else timeout, error (bwrap's own), failed."""
        try:
            verdict = json.loads(self.result)
            genuine = isinstance(verdict, dict) and hmac.compare_digest(str(verdict.get("nonce")), nonce)
        except ValueError:
            genuine = False
        if genuine:
            passed, detail = verdict.get("passed") is True, str(verdict.get("detail", ""))[:300]
            return Outcome(passed, "passed" if passed else "failed", detail, self.output_bytes)
        if self.timed_out:
            return Outcome(False, "timeout", f"no verdict within {limits.timeout:g} s", self.output_bytes)
        lines = self.output.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1][:300] if lines else f"exit status {self.proc.returncode}, no verdict"
        return Outcome(False, "error" if last.startswith("bwrap:") else "failed", last, self.output_bytes)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prob = 1.0
    for i in range(n - c + 1, n + 1):
        prob *= 1.0 - k / i
    return 1.0 - prob
