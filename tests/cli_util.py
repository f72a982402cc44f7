"""`gptstack ARGS` run through the CLI's own main() inside the test process.

A subprocess costs an interpreter and a torch import (3-5 s on 2 cores) per call; main() is the same
parser, commands and error handling (gptstack.cli.main returns the exit status and prints one-line
errors), so the tests that need a real process (SIGKILL, signals, a missing optional package, the
entry point itself) start one and the rest call this."""

from __future__ import annotations

import contextlib
import io
import sys
from types import SimpleNamespace


def gptstack(*args: str, stdin: str = "", ok: bool | None = True) -> SimpleNamespace:
    """(returncode, stdout, stderr) of `gptstack ARGS` with `stdin` as its standard input; ok=True/False
    asserts success/failure (None: no check)."""
    from gptstack.cli import main

    out, err, saved = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        sys.stdin = saved
    run = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if ok is not None:
        assert (code == 0) == ok, run.stderr
    return run
