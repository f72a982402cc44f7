"""Document sources: folders of .txt/.md/.py/.html, JSONL, Parquet, gzip/zstd files, and the
embedded default corpus (the running Python's standard library sources).

Every document keeps its `source` (which input it came from) and an `id` unique within the run
(the file path relative to its input, plus `:line` for JSONL or `:row` for Parquet). A record that
cannot become a document is yielded as a `Skip` with its reason, counted, and the run goes on.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptstack.data.extract import extract_html

TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".py": "code", ".html": "html", ".htm": "html"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}
COMPRESSED = {".gz", ".zst"}


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
    reason: str  # decode_error | empty | too_large | missing_field | corrupt_file | unreadable


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


def list_files(root: Path, only: tuple[str, ...] | None = None) -> list[Path]:
    """Readable files under `root` (only those ending in `only`, if given) in a stable order (sorted),
    skipping site-packages and caches."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__") and not d.startswith("."))
        found += [
            Path(dirpath) / f
            for f in sorted(filenames)
            if _kind_and_suffix(Path(f))[0] is not None and (only is None or f.endswith(only))
        ]
    return found


def read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        return gzip.decompress(raw)
    if path.suffix.lower() == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    return raw


def iter_documents(
    inputs: list[str | Path] | None = None, text_field: str = "text", max_bytes: int = 8_000_000
) -> Iterator[Document | Skip]:
    """Documents from every input in order. No `inputs` means the default corpus: the .py files of the
    standard library (31.5 MB on CPython 3.11)."""
    roots = [Path(p) for p in inputs] if inputs else [default_corpus()]
    for root in roots:
        source = "stdlib" if not inputs else root.name or str(root)
        base = root if root.is_dir() else root.parent
        for path in list_files(root, None if inputs else (".py",)):
            rel = path.relative_to(base).as_posix()
            kind, suffix = _kind_and_suffix(path)
            try:
                raw = read_bytes(path)
            except Exception as e:  # unreadable or corrupt compression
                yield Skip(source, rel, f"corrupt_file: {type(e).__name__}")
                continue
            if kind == "records":
                yield from _records(raw, suffix, source, rel, text_field, max_bytes)
            else:
                yield _document(raw, source, rel, kind, max_bytes)


def _document(raw: bytes | str, source: str, id: str, kind: str, max_bytes: int) -> Document | Skip:
    if len(raw) > max_bytes:
        return Skip(source, id, "too_large")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return Skip(source, id, "decode_error")
    if not raw.strip():
        return Skip(source, id, "empty")
    return Document(raw, source, id, kind)


def _records(raw: bytes, suffix: str, source: str, rel: str, field: str, max_bytes: int) -> Iterator[Document | Skip]:
    if suffix == ".jsonl":
        for lineno, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            id = f"{rel}:{lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield Skip(source, id, "decode_error")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                yield Skip(source, id, "missing_field")
                continue
            yield _document(text, source, id, "text", max_bytes)
        return
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as e:  # pyarrow raises several types for a damaged file
        yield Skip(source, rel, f"corrupt_file: {type(e).__name__}")
        return
    if field not in table.column_names:
        yield Skip(source, rel, "missing_field")
        return
    for row, text in enumerate(table.column(field).to_pylist()):
        id = f"{rel}:{row}"
        yield (
            _document(text, source, id, "text", max_bytes)
            if isinstance(text, str)
            else Skip(source, id, "missing_field")
        )


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
