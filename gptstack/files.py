"""Reading the project's JSON and JSONL files with errors that name the file and the line, and file checksums.

Every reader of a user's JSON config or JSONL rows goes through these two functions, so a broken
file always fails the same way: one line saying `path:line: not valid JSON (reason)`, raised as the
caller's own error class (ConfigError, DataError, TaskError, … all ValueError subclasses).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoint and index checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, error: type[Exception] = ValueError, what: str = "file") -> Any:
    """The parsed contents of a JSON file; a missing or malformed file raises `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, not UTF-8, or an integer over Python's 4,300-digit limit
        raise error(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None


def iter_jsonl(
    path: str | Path, error: type[Exception] = ValueError, objects: bool = True
) -> Iterator[tuple[str, Any]]:
    """(`path:line`, row) for each non-blank line. A line that is not JSON (or, with `objects`, not a
    JSON object) raises `error` naming `path:line`: nothing is used from a half-readable file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # bytes: UTF-8 (or -16/-32 by its first bytes), decoded by json
            except ValueError as e:  # not JSON, not UTF-8, or an integer over Python's 4,300-digit limit
                raise error(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)})") from None
            except RecursionError:  # a hostile `[[[[…` line: an error naming it, not a traceback
                raise error(f"{path}:{n}: JSON nested too deeply") from None
            if objects and not isinstance(row, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{n}", row
