"""The documents `gptstack rag index SRC` reads: a folder (or one file) of .txt/.md/.py/.html, each
possibly compressed (.gz .bz2 .xz .zst), read by data/sources.py with its limits and HTML reduced to its
main text by data/extract.py; or a JSONL file of {"id", "text"} rows.

Each document is (id, source, text): in a folder the id is the path relative to it and the source the
path as given under SRC; in JSONL the id is the row's "id" (its file and line when it has none) and the
source `FILE:LINE`. Two documents with one id are refused, as a citation must name one document.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from gptstack.data.extract import extract_html
from gptstack.data.sources import Skip, iter_documents
from gptstack.files import iter_jsonl
from gptstack.rag.index import RagError

Document = tuple[str, str, str]  # (id, source, text)


def _jsonl(path: Path, text_field: str) -> Iterator[Document]:
    for where, row in iter_jsonl(path, RagError):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise RagError(f"{where}: no string field {text_field!r}")
        doc = row.get("id", where.rsplit("/", 1)[-1])
        if not isinstance(doc, str | int) or isinstance(doc, bool):
            raise RagError(f'{where}: "id" must be a string or an integer')
        yield str(doc), where, text


def _folder(root: Path, skipped: Counter) -> Iterator[Document]:
    for d in iter_documents([root]):
        if isinstance(d, Skip):
            skipped[d.reason.split(":")[0]] += 1
            continue
        text = extract_html(d.text) if d.kind == "html" else d.text
        if not text.strip():
            skipped["no_text"] += 1
            continue
        yield d.id, (root / d.id).as_posix() if root.is_dir() else root.as_posix(), text


def read_corpus(src: str | Path, text_field: str = "text", skipped: Counter | None = None) -> Iterator[Document]:
    """The documents of `src` in a stable order; files that cannot be read are counted in `skipped`
    (by reason) and left out. A missing `src` or a repeated id raises RagError."""
    src = Path(src)
    if not src.exists():
        raise RagError(f"corpus {src} does not exist")
    jsonl = src.is_file() and src.suffix.lower() == ".jsonl"
    seen: set[str] = set()
    for doc in _jsonl(src, text_field) if jsonl else _folder(src, skipped if skipped is not None else Counter()):
        if doc[0] in seen:
            raise RagError(f"{doc[1]}: document id {doc[0]!r} appears twice in {src}")
        seen.add(doc[0])
        yield doc
