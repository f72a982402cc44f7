"""The retrieval index: a corpus's chunks with a BM25 index (bm25s) and, optionally, their MiniLM
embeddings, saved as a folder of plain files that loads without executing anything.

    INDEX/
      index.json        {"format", "version", "chunk_size", "overlap", "documents", "chunks",
                         "dense": {"model", "dim"} | null, "files": {name: sha256}}
      chunks.jsonl      one chunk per line: {"doc", "source", "start", "end", "text"} (chunk.py)
      bm25/             bm25s's own save: CSC score arrays (.npy) and the vocabulary (JSON)
      embeddings.npy    (chunks, 384) float32 unit rows, row i embeds line i of chunks.jsonl

Every .npy is read with `allow_pickle=False` and every file's SHA-256 is checked against index.json
before use, so a truncated or edited index is refused with an error naming the file, never half used.
The folder is written under a temporary name beside its destination and renamed into place; an
existing destination is replaced only when it is an index itself (a user's other folder never is).

Scores: `bm25(query)` is bm25s's Lucene BM25 (k1 1.5, b 0.75) over lowercased word tokens without
English stop words, one score per chunk; `dense(query_vector)` the cosine of each chunk's embedding.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gptstack.files import iter_jsonl, read_json, sha256
from gptstack.rag.chunk import Chunk
from gptstack.rag.embed import DIM, NAME

FORMAT = "gptstack-rag-index"
VERSION = 1
STOPWORDS = "en"


class RagError(ValueError):
    """A corpus, index or query that cannot be used as asked; the message names the file and the problem."""


def tokenize(texts: list[str]) -> list[list[str]]:
    """BM25's terms of each text: lowercased words of 2+ characters, English stop words dropped."""
    import bm25s

    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


class Index:
    """Chunks plus their BM25 index and (when built with them) embeddings; see the module docstring."""

    def __init__(self, chunks: list[Chunk], bm25, vectors: np.ndarray | None, meta: dict):
        self.chunks, self.bm25, self.vectors, self.meta = chunks, bm25, vectors, meta

    @classmethod
    def build(cls, chunks: list[Chunk], vectors: np.ndarray | None, meta: dict) -> Index:
        import bm25s

        if not chunks:
            raise RagError("no text to index: the corpus has no non-blank document")
        bm25 = bm25s.BM25()
        terms = bm25s.tokenize([c.text for c in chunks], stopwords=STOPWORDS, show_progress=False)
        bm25.index(terms, show_progress=False)
        return cls(chunks, bm25, vectors, meta)

    def bm25_scores(self, query: str) -> np.ndarray:
        """(chunks,) float32 BM25 scores of `query` (terms the corpus lacks score nothing)."""
        terms = [t for t in tokenize([query])[0] if t in self.bm25.vocab_dict]
        if not terms:
            return np.zeros(len(self.chunks), dtype=np.float32)
        return np.asarray(self.bm25.get_scores(terms), dtype=np.float32)

    def need_vectors(self) -> np.ndarray:
        """The (chunks, DIM) embeddings; RagError for an index built without them."""
        if self.vectors is None:
            raise RagError("this index has no embeddings (built with --no-dense): use --method bm25")
        return self.vectors

    def dense_scores(self, query_vector: np.ndarray) -> np.ndarray:
        """(chunks,) cosine similarities with a unit (DIM,) query vector."""
        return self.need_vectors() @ query_vector

    # ---- the folder ------------------------------------------------------------------------------------

    def save(self, out: str | Path) -> Path:
        """Write the index folder at `out` (atomically; see the module docstring)."""
        out = Path(out)
        _check_destination(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in self.chunks)
            self.bm25.save(str(tmp / "bm25"), show_progress=False)
            if self.vectors is not None:
                np.save(tmp / "embeddings.npy", self.vectors.astype(np.float32), allow_pickle=False)
            files = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            meta = {"format": FORMAT, "version": VERSION, **self.meta, "chunks": len(self.chunks), "files": files}
            (tmp / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @classmethod
    def load(cls, folder: str | Path) -> Index:
        """An index folder, every file checked against index.json first (RagError naming what is wrong)."""
        import bm25s

        folder = Path(folder)
        meta = _read_meta(folder)
        chunks = _read_chunks(folder / "chunks.jsonl", meta["chunks"])
        try:
            bm25 = bm25s.BM25.load(str(folder / "bm25"), allow_pickle=False, show_progress=False, verbosity=0)
        except (OSError, ValueError, KeyError) as e:
            raise RagError(f"{folder / 'bm25'}: not a readable BM25 index ({e})") from None
        vectors = None
        if meta.get("dense"):
            vectors = _read_vectors(folder / "embeddings.npy", len(chunks))
        return cls(chunks, bm25, vectors, meta)


def _read_meta(folder: Path) -> dict:
    if not folder.is_dir():
        raise RagError(f"index {folder} does not exist (build one with: gptstack rag index SRC --out {folder})")
    meta = read_json(folder / "index.json", RagError, "index file")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RagError(f"{folder / 'index.json'}: not a gptstack retrieval index")
    if meta.get("version") != VERSION:
        raise RagError(f"{folder / 'index.json'}: index version {meta.get('version')!r}, this gptstack reads {VERSION}")
    files = meta.get("files")
    if not isinstance(files, dict) or "chunks.jsonl" not in files or not isinstance(meta.get("chunks"), int):
        raise RagError(f"{folder / 'index.json'}: no file list or chunk count")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise RagError(f"{path}: missing from the index")
        if sha256(path) != digest:
            raise RagError(f"{path}: checksum differs from index.json (a corrupt or edited index)")
    return meta


def _read_chunks(path: Path, expected: int) -> list[Chunk]:
    chunks = []
    for where, row in iter_jsonl(path, RagError):
        try:
            chunk = Chunk(**row)
        except TypeError:
            raise RagError(f"{where}: not a chunk row") from None
        if not isinstance(chunk.text, str) or len(chunk.text) != chunk.end - chunk.start:
            raise RagError(f"{where}: the span [{chunk.start}, {chunk.end}) does not match its text")
        chunks.append(chunk)
    if len(chunks) != expected:
        raise RagError(f"{path}: {len(chunks)} chunks, index.json says {expected}")
    return chunks


def _read_vectors(path: Path, rows: int) -> np.ndarray:
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RagError(f"{path}: not a readable .npy array ({e})") from None
    if vectors.dtype != np.float32 or vectors.shape != (rows, DIM):
        raise RagError(f"{path}: expected ({rows}, {DIM}) float32, got {vectors.shape} {vectors.dtype}")
    return vectors


def _check_destination(out: Path) -> None:
    """Refuse to write over anything but an empty folder or an earlier index."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.json").is_file())):
        raise RagError(f"{out} exists and is not an index folder: choose a new --out (nothing was written)")
    if (out / "index.json").is_file():
        meta = read_json(out / "index.json", RagError, "index file")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RagError(f"{out} holds an index.json that is not ours: choose a new --out (nothing was written)")


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp → out; an earlier index at out is moved aside first and deleted after."""
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}" if out.exists() else None
    if old is not None:
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old)


DENSE_META = {"model": NAME, "dim": DIM}
