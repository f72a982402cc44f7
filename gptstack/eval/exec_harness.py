"""The trusted half of one code-execution run, started inside the sandbox by eval/execution.py.

    python -P -s exec_harness.py JOB_FD RESULT_FD LIMITS_JSON

It imports only the standard library (the sandbox holds the interpreter, not gptstack), and it keeps the
candidate's code in a process of its own, so that nothing that code does can forge a pass:

1. closes every inherited descriptor but its two, applies the rlimits (CPU seconds, address space, file
   size, processes) and, started as root by a bwrap without a user namespace, drops to the unprivileged
   uid in LIMITS_JSON;
2. makes itself non-dumpable: the candidate can neither ptrace it, nor read /proc/PID/mem, nor reopen
   its descriptors through /proc/PID/fd;
3. forks the candidate process before it reads the job, so that process never holds the test or the nonce;
4. reads the job from JOB_FD: {"code", "test", "entry_point", "prelude", "nonce"};
5. has the candidate process run the code; with a test, runs the prelude (the task's prompt, for helpers
   that the test calls) and the test in its own process and calls `check(candidate)` with a proxy: each
   call's arguments go to the candidate process as plain data, its answer comes back the same way (JSON,
   tags for tuples, sets, dicts, bytes), so an object with a forged `__eq__` never reaches the test;
6. writes {"nonce", "passed", "detail"} on RESULT_FD once check() has returned or failed.

A candidate that exits early (`os._exit(0)`), kills its parent, hangs or prints a marker leaves no
result with the nonce, which the evaluator scores as failed. Without a test (a plain program), passing
means the code ran to its end: there the whole program is the candidate.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
import struct
import sys
import traceback

MAX_MESSAGE = 8 << 20  # bytes of one message between the two processes (the candidate's answer)
PR_SET_DUMPABLE = 4


class CandidateError(Exception):
    """The candidate's code could not run, or its process went away before answering."""


# ---- plain data across the process boundary ------------------------------------------------------


def encode(v):
    """Plain data as JSON: lists as arrays, the other containers, bytes and complex as one-key objects."""
    if v is None:
        return None
    for kind in (bool, int, float, str):  # bool before int; an int or str subclass goes as the plain type
        if isinstance(v, kind):
            return kind(v)
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, tuple):
        return {"tuple": [encode(x) for x in v]}
    if isinstance(v, set | frozenset):
        return {"frozenset" if isinstance(v, frozenset) else "set": [encode(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[encode(k), encode(x)] for k, x in v.items()]}
    if isinstance(v, bytes):
        return {"bytes": v.hex()}
    if isinstance(v, complex):
        return {"complex": [v.real, v.imag]}
    raise TypeError(f"{type(v).__name__[:60]} is not plain data (None, bool, int, float, str, bytes, list, dict…)")


DECODERS = {
    "tuple": lambda b: tuple(decode(x) for x in b),
    "set": lambda b: {decode(x) for x in b},
    "frozenset": lambda b: frozenset(decode(x) for x in b),
    "dict": lambda b: {decode(k): decode(x) for k, x in b},
    "bytes": bytes.fromhex,
    "complex": lambda b: complex(float(b[0]), float(b[1])),
}


def decode(v):
    """The inverse of encode; only builtin types come out, whatever the other side sent."""
    if isinstance(v, list):
        return [decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1 or next(iter(v)) not in DECODERS:
        raise ValueError(f"not an encoded value: {str(v)[:80]}")
    tag, body = next(iter(v.items()))
    return DECODERS[tag](body)


def send(sock: socket.socket, obj) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv(sock: socket.socket):
    """One message; EOFError when the other side is gone, ValueError when it is over MAX_MESSAGE."""
    (n,) = struct.unpack("!I", _exactly(sock, 4))
    if n > MAX_MESSAGE:
        raise ValueError(f"the candidate sent {n:,} bytes (at most {MAX_MESSAGE:,})")
    return json.loads(_exactly(sock, n))


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def text_of(e: BaseException) -> str:
    try:
        return str(e)[:300]
    except BaseException:  # an exception class of the candidate's whose __str__ raises
        return "(unprintable)"


def describe(e: BaseException) -> str:
    text = text_of(e)
    if isinstance(e, CandidateError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---- the candidate process -----------------------------------------------------------------------


def serve_candidate(sock: socket.socket) -> None:
    """Run the code, then answer calls (name, args, kwargs) with the value or the exception; never returns."""
    ns = {"__name__": "__candidate__", "__builtins__": builtins}
    while True:
        try:
            msg = recv(sock)
        except (EOFError, OSError):
            os._exit(0)
        try:
            if msg["op"] == "exec":
                exec(compile(msg["code"], "<candidate>", "exec"), ns)
                reply = {"value": None}
            elif msg["name"] not in ns:
                raise NameError(f"name {msg['name']!r} is not defined")
            else:
                reply = {"value": encode(ns[msg["name"]](*decode(msg["args"]), **decode(msg["kwargs"])))}
        except BaseException as e:  # SystemExit too: the candidate does not get to end the run
            reply = {"raised": type(e).__name__, "message": text_of(e)}
        send(sock, reply)


# ---- the harness process -------------------------------------------------------------------------


class Candidate:
    """The function check() is given: each call runs in the candidate process."""

    def __init__(self, sock: socket.socket, pid: int, name: str):
        self.sock, self.pid, self.name = sock, pid, name

    def ask(self, msg: dict):
        try:
            send(self.sock, msg)
            reply = recv(self.sock)
        except (EOFError, OSError):
            raise CandidateError(f"the candidate process {gone(self.pid)}") from None
        if "raised" in reply:
            raise raised(str(reply["raised"]), str(reply.get("message", "")))
        return decode(reply["value"])

    def __call__(self, *args, **kwargs):
        return self.ask({"op": "call", "name": self.name, "args": encode(list(args)), "kwargs": encode(kwargs)})


def raised(name: str, message: str) -> Exception:
    """The candidate's exception as the test would have seen it in one process: a builtin one by its
    class (ZeroDivisionError, ValueError, ...), any other as a CandidateError naming it."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # a builtin whose constructor wants more (UnicodeDecodeError)
            pass
    return CandidateError(f"{name}: {message}" if message else name)


def gone(pid: int) -> str:
    """How the candidate process ended (it has, when its socket is closed)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "is gone"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = {signal.SIGXCPU: " (CPU limit)", signal.SIGKILL: ""}.get(sig, "")
        return f"was killed by {signal.Signals(sig).name}{why}"
    return f"exited with status {os.WEXITSTATUS(status)} before answering"


def run_check(job: dict, candidate: Candidate) -> None:
    """The prelude and the test here, the candidate's function over there: check(candidate) must return."""
    ns: dict = {"__name__": "__check__"}
    if job.get("prelude"):
        try:
            exec(compile(job["prelude"], "<prompt>", "exec"), ns)
        except Exception:  # a prompt that is no program on its own: the test gets no helpers from it
            ns = {"__name__": "__check__"}
    ns[job["entry_point"]] = candidate  # HumanEval/33's test calls the function by its name
    exec(compile(job["test"], "<test>", "exec"), ns)
    if not callable(ns.get("check")):
        raise CandidateError("the test defines no check(candidate)")
    ns["check"](candidate)


def judge(job: dict, sock: socket.socket, pid: int) -> tuple[bool, str]:
    candidate = Candidate(sock, pid, job.get("entry_point", ""))
    try:
        candidate.ask({"op": "exec", "code": job["code"]})
        if job.get("test"):
            run_check(job, candidate)
    except BaseException as e:
        where = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<test>"]
        line = job["test"].splitlines()[where[-1].lineno - 1].strip() if where and where[-1].lineno else ""
        return False, describe(e) + (f" at test line {where[-1].lineno}: {line}"[:200] if line else "")
    return True, ""


def apply_limits(limits: dict) -> None:
    cpu, memory, fsize = limits["cpu_s"], limits["memory_mb"] << 20, limits["file_mb"] << 20
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.get("uid") is not None:  # root in the sandbox: become nobody-like, a uid of this run's own
        os.setgroups([])
        os.setresgid(limits["uid"], limits["uid"], limits["uid"])
        os.setresuid(limits["uid"], limits["uid"], limits["uid"])
    if limits.get("processes"):  # counted per uid (per user namespace): this run's processes only
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def close_inherited(keep: set[int]) -> None:
    """Close what bwrap or the evaluator left open (bwrap's --info-fd) but the job and result pipes."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def main(argv: list[str]) -> None:
    job_fd, result_fd, limits = int(argv[1]), int(argv[2]), json.loads(argv[3])
    close_inherited({job_fd, result_fd})
    apply_limits(limits)
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the candidate: drop the job and result descriptors before any of its code runs
        os.close(job_fd)
        os.close(result_fd)
        ours.close()
        serve_candidate(theirs)
    theirs.close()
    with os.fdopen(job_fd, "rb") as f:
        job = json.loads(f.read())
    passed, detail = judge(job, ours, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(result_fd, "w") as f:
        f.write(json.dumps({"nonce": job["nonce"], "passed": passed, "detail": detail}))


if __name__ == "__main__":
    main(sys.argv)
