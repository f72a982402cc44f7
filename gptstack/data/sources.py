"""Document sources: folders of .txt/.md/.py/.html, JSONL, Parquet, gzip/zstd/bzip2/xz files, and the
embedded default corpus (the running Python's standard library sources).

Every document keeps its `source` (which input it came from) and an `id` unique within the run
(the file path relative to its input, plus `:line` for JSONL or `:row` for Parquet). A record that
cannot become a document is yielded as a `Skip` with its reason, counted, and the run goes on.

Inputs are untrusted: compressed files are decompressed while read and reading stops at the size
limit (a 2 MB .gz that inflates to 2 GB costs max_bytes, not 2 GB); JSONL is read a line at a time
with a bound on the line; a symbolic link in an input folder is not followed out of that folder
unless asked (`follow_symlinks`), and only regular files are opened (a FIFO or a device never is).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from gptstack.data.extract import extract_html

TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".py": "code", ".html": "html", ".htm": "html"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": zstandard.open}
JSONL_LINE_FACTOR = 6  # JSON escaping turns one byte of text into at most 6 (\u0001): the longest line worth parsing
PARQUET_FACTOR = 64  # a compressed Parquet file is inflated whole (Parquet needs seeking), up to this × max_bytes


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the input it came from (a name, not a machine path)
    id: str  # unique within its source
    kind: str = "text"  # text | code | html: picks the extraction and the filters


@dataclass(frozen=True)
class Skip:
    source: str
    id: str
    # decode_error | invalid_unicode | nested_too_deep | empty | too_large | missing_field | corrupt_file: <error>
    # | symlink_outside | not_a_file
    reason: str


def default_corpus() -> Path:
    """The standard library sources of the running Python: real code and docstrings on every machine."""
    return Path(sysconfig.get_paths()["stdlib"])


def _kind_and_suffix(path: Path) -> tuple[str | None, str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in RECORD_SUFFIXES:
        return "records", suffix
    return TEXT_SUFFIXES.get(suffix), suffix


def scan_files(
    root: Path, only: tuple[str, ...] | None = None, follow_symlinks: bool = False
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files to read, [(path, reason) refused]) under `root`, in a stable (sorted) order: files with a
    known suffix (ending in `only`, if given), skipping site-packages, caches and hidden folders. Refused:
    links that lead out of `root` (`symlink_outside`, unless `follow_symlinks`) and anything that is not a
    regular file (`not_a_file`: a FIFO, a device, a dangling link). `root` itself is the user's choice and
    may be a link."""
    if root.is_file():
        return [root], []
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist")
    real_root, seen = root.resolve(), set()
    found, refused = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        here, real = Path(dirpath), os.path.realpath(dirpath)
        if real in seen:  # followed links can lead back to a folder walked already (a cycle)
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__") and not d.startswith("."))
        if not follow_symlinks:  # os.walk does not enter linked folders: only those leading out are reported
            refused += [(here / d, "symlink_outside") for d in dirnames if _leaves(here / d, real_root)]
        for name in sorted(filenames):
            path = here / name
            if _kind_and_suffix(path)[0] is None or (only is not None and not name.endswith(only)):
                continue
            reason = _refusal(path, real_root, follow_symlinks)
            (refused.append((path, reason)) if reason else found.append(path))
    return found, refused


def _leaves(path: Path, real_root: Path) -> bool:
    """Whether `path` is a link whose target lies outside `real_root`."""
    return path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(real_root)


def _refusal(path: Path, real_root: Path, follow_symlinks: bool) -> str | None:
    if not follow_symlinks and _leaves(path, real_root):
        return "symlink_outside"
    try:
        regular = stat.S_ISREG(path.stat().st_mode)  # follows a link: what would be opened
    except OSError:
        regular = False
    return None if regular else "not_a_file"


def list_files(root: Path, only: tuple[str, ...] | None = None, follow_symlinks: bool = False) -> list[Path]:
    """The files `scan_files` would read."""
    return scan_files(root, only, follow_symlinks)[0]


def open_stream(path: Path) -> BinaryIO:
    """The file's bytes, decompressed (by suffix: .gz .bz2 .xz .zst) only as far as the reader reads."""
    opener = COMPRESSED.get(path.suffix.lower())
    if opener is zstandard.open:
        return io.BufferedReader(zstandard.open(path, "rb"))  # adds readline(limit)
    return opener(path, "rb") if opener else open(path, "rb")


def iter_documents(
    inputs: list[str | Path] | None = None,
    text_field: str = "text",
    max_bytes: int = 8_000_000,
    follow_symlinks: bool = False,
) -> Iterator[Document | Skip]:
    """Documents from every input in order. No `inputs` means the default corpus: the .py files of the
    standard library (31.5 MB on CPython 3.11)."""
    roots = [Path(p) for p in inputs] if inputs else [default_corpus()]
    for root in roots:
        source = "stdlib" if not inputs else root.name or str(root)
        base = root if root.is_dir() else root.parent
        files, refused = scan_files(root, None if inputs else (".py",), follow_symlinks)
        yield from (Skip(source, path.relative_to(base).as_posix(), reason) for path, reason in refused)
        for path in files:
            rel = path.relative_to(base).as_posix()
            kind, suffix = _kind_and_suffix(path)
            if suffix == ".jsonl":
                yield from _jsonl(path, source, rel, text_field, max_bytes)
            elif suffix == ".parquet":
                yield from _parquet(path, source, rel, text_field, max_bytes)
            else:
                yield _read_document(path, source, rel, kind, max_bytes)


def _corrupt(source: str, id: str, e: Exception) -> Skip:
    return Skip(source, id, f"corrupt_file: {type(e).__name__}")


def _read_document(path: Path, source: str, rel: str, kind: str, max_bytes: int) -> Document | Skip:
    """One file as one document; at most max_bytes + 1 bytes are ever decompressed."""
    try:
        with open_stream(path) as f:
            raw = f.read(max_bytes + 1)
    except Exception as e:  # unreadable, or corrupt compression
        return _corrupt(source, rel, e)
    return _document(raw, source, rel, kind, max_bytes)


def _document(raw: bytes | str, source: str, id: str, kind: str, max_bytes: int) -> Document | Skip:
    if isinstance(raw, str):
        try:
            data = raw.encode("utf-8")  # a lone surrogate (JSON's "\ud800") has no UTF-8 form
        except UnicodeEncodeError:
            return Skip(source, id, "invalid_unicode")
        if len(data) > max_bytes:
            return Skip(source, id, "too_large")
    else:
        if len(raw) > max_bytes:
            return Skip(source, id, "too_large")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return Skip(source, id, "decode_error")
    if not raw.strip():
        return Skip(source, id, "empty")
    return Document(raw, source, id, kind)


def _jsonl(path: Path, source: str, rel: str, field: str, max_bytes: int) -> Iterator[Document | Skip]:
    """One document per line, read a line at a time: a line longer than any text within the limit could
    be is skipped as too_large without being held; a broken stream ends the file with corrupt_file."""
    cap = JSONL_LINE_FACTOR * max_bytes + (1 << 16)  # + room for the other fields of the record
    lineno = 0
    try:
        with open_stream(path) as f:
            while line := f.readline(cap + 1):
                lineno += 1
                if len(line) > cap and not line.endswith(b"\n"):
                    while (rest := f.readline(cap)) and not rest.endswith(b"\n"):  # drop the rest of it
                        pass
                    yield Skip(source, f"{rel}:{lineno}", "too_large")
                elif line.strip():
                    yield _record(line, source, f"{rel}:{lineno}", field, max_bytes)
    except Exception as e:  # unreadable, or corrupt compression (the lines before it were read)
        yield _corrupt(source, rel, e)


def _record(line: bytes, source: str, id: str, field: str, max_bytes: int) -> Document | Skip:
    try:
        record = json.loads(line)
    except RecursionError:  # [[[[...]]]] deeper than the parser's stack
        return Skip(source, id, "nested_too_deep")
    except ValueError:  # not JSON, not UTF-8, or an integer over Python's 4,300-digit limit
        return Skip(source, id, "decode_error")
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return Skip(source, id, "missing_field")
    return _document(text, source, id, "text", max_bytes)


def _parquet(path: Path, source: str, rel: str, field: str, max_bytes: int) -> Iterator[Document | Skip]:
    """One document per row of `field`, read a batch of rows at a time."""
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() in COMPRESSED:
            with open_stream(path) as f:
                data = f.read(PARQUET_FACTOR * max_bytes + 1)
            if len(data) > PARQUET_FACTOR * max_bytes:
                yield Skip(source, rel, "too_large")
                return
            table = pq.ParquetFile(io.BytesIO(data))
        else:
            table = pq.ParquetFile(path)
        if field not in table.schema_arrow.names:
            yield Skip(source, rel, "missing_field")
            return
        row = 0
        for batch in table.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                id = f"{rel}:{row}"
                yield (
                    _document(text, source, id, "text", max_bytes)
                    if isinstance(text, str)
                    else Skip(source, id, "missing_field")
                )
                row += 1
    except Exception as e:  # pyarrow raises several types for a damaged file
        yield _corrupt(source, rel, e)


def heldout(doc: Document, fraction: float) -> bool:
    """A fixed, content-independent choice of held-out documents (by a hash of source and id)."""
    digest = hashlib.blake2b(f"{doc.source}\0{doc.id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def corpus_texts(
    inputs: list[str | Path] | None, part: str, heldout_fraction: float = 0.1, max_bytes: int | None = None
) -> list[str]:
    """Texts of the 'train' or 'heldout' part of the inputs (HTML pages extracted), up to `max_bytes`."""
    texts, total = [], 0
    for doc in iter_documents(inputs):
        if isinstance(doc, Skip) or heldout(doc, heldout_fraction) != (part == "heldout"):
            continue
        text = extract_html(doc.text) if doc.kind == "html" else doc.text
        texts.append(text)
        total += len(text.encode())
        if max_bytes and total >= max_bytes:
            break
    return texts
