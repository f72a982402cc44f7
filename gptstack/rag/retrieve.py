"""Build an index from a corpus and search it: BM25, dense (MiniLM cosine) or hybrid.

    build_index(RagIndexConfig(src="docs/", out="idx"))          # gptstack rag index docs/ --out idx
    Retriever.load("idx").search("what does X do?", k=5)        # [Hit(rank, score, chunk), …]

Hybrid search is reciprocal rank fusion (Cormack et al. 2009): each chunk scores Σ 1 / (60 + rank) over
the BM25 ranking and the dense ranking (ranks from 1, the top `DEPTH` of each), so neither method's
score scale matters; ties go to the earlier chunk. BM25 and dense rankings also break ties by chunk
order, so every search is deterministic.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from gptstack.rag.chunk import Chunk, chunk_document
from gptstack.rag.corpus import read_corpus
from gptstack.rag.embed import Embedder, embed_batched
from gptstack.rag.index import DENSE_META, Index, RagError

Method = Literal["bm25", "dense", "hybrid"]
METHODS = ("bm25", "dense", "hybrid")
RRF_K = 60  # the fusion constant of Cormack et al.
DEPTH = 100  # how deep each ranking is read for the fusion


@dataclass
class RagIndexConfig:
    src: str  # a folder of .txt/.md/.html(.gz) files, or a JSONL file of {"id", "text"} rows
    out: str  # the index folder to write
    chunk_size: int = 800  # the most characters in a chunk
    overlap: int = 100  # characters a chunk repeats of the one before it
    dense: bool = True  # embed the chunks with MiniLM (needed by --method dense and hybrid)
    text_field: str = "text"  # JSONL: the field holding a document's text
    progress: bool = True  # progress bars on stderr


@dataclass
class RagQueryConfig:
    index: str  # the index folder (gptstack rag index)
    text: str  # the query
    k: int = 5  # chunks to return
    method: Method = "hybrid"  # bm25, dense, or hybrid (reciprocal rank fusion of the two)
    json: bool = False  # print the ranked chunks as JSON


@dataclass(frozen=True)
class Hit:
    rank: int  # 1 for the best
    score: float  # the method's score (hybrid: the fused reciprocal-rank score)
    chunk: Chunk

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), **asdict(self.chunk)}


def build_index(cfg: RagIndexConfig, embedder: Embedder | None = None) -> dict:
    """Read, chunk, index (and embed) cfg.src; write cfg.out. Returns counts and timings."""
    t0, skipped, chunks, n_docs = time.perf_counter(), Counter(), [], 0
    docs = read_corpus(cfg.src, cfg.text_field, skipped)
    for doc, source, text in tqdm(docs, desc="chunking", unit="doc", disable=not cfg.progress):
        try:
            chunks += chunk_document(doc, source, text, cfg.chunk_size, cfg.overlap)
        except ValueError as e:
            raise RagError(str(e)) from None
        n_docs += 1
    vectors = None
    if cfg.dense and chunks:
        bar = tqdm(total=len(chunks), desc="embedding", unit="chunk", disable=not cfg.progress)
        vectors = embed_batched(embedder or Embedder(), [c.text for c in chunks], progress=bar.update)
        bar.close()
    meta = {"chunk_size": cfg.chunk_size, "overlap": cfg.overlap, "documents": n_docs}
    index = Index.build(chunks, vectors, {**meta, "dense": DENSE_META if cfg.dense else None})
    index.save(cfg.out)
    seconds = round(time.perf_counter() - t0, 2)
    return {"out": cfg.out, "documents": n_docs, "chunks": len(chunks), "skipped": dict(skipped), "seconds": seconds}


def ranking(scores: np.ndarray, depth: int) -> np.ndarray:
    """The indices of the `depth` highest scores, best first, ties by index."""
    order = np.lexsort((np.arange(len(scores)), -scores))  # last key first: score down, then index up
    return order[:depth]


def fuse(rankings: list[np.ndarray], n: int) -> np.ndarray:
    """(n,) reciprocal rank fusion scores of best-first rankings."""
    fused = np.zeros(n, dtype=np.float64)
    for order in rankings:
        fused[order] += 1.0 / (RRF_K + np.arange(1, len(order) + 1))
    return fused


class Retriever:
    """An index and the embedder its queries need (loaded on the first dense query)."""

    def __init__(self, index: Index, embedder: Embedder | None = None):
        self.index = index
        self.embedder = embedder or Embedder()

    @classmethod
    def load(cls, folder: str, embedder: Embedder | None = None) -> Retriever:
        return cls(Index.load(folder), embedder)

    def scores(self, query: str, method: Method) -> np.ndarray:
        """(chunks,) scores of every chunk; ranking these best-first is the search."""
        if method not in METHODS:
            raise RagError(f"unknown retrieval method {method!r}: choose one of {', '.join(METHODS)}")
        if method == "bm25":
            return self.index.bm25_scores(query).astype(np.float64)
        self.index.need_vectors()  # before loading a model only to fail
        dense = self.index.dense_scores(self.embedder([query])[0]).astype(np.float64)
        if method == "dense":
            return dense
        bm25 = self.index.bm25_scores(query).astype(np.float64)
        rankings = [ranking(bm25, DEPTH)[: np.count_nonzero(bm25 > 0)], ranking(dense, DEPTH)]
        return fuse(rankings, len(self.index.chunks))

    def search(self, query: str, k: int = 5, method: Method = "hybrid") -> list[Hit]:
        """The k best chunks for `query`, best first."""
        if k < 1:
            raise RagError(f"k must be >= 1, got {k}")
        if not query.strip():
            raise RagError("the query is empty")
        scores = self.scores(query, method)
        if method == "bm25":  # a chunk sharing no term with the query is not a match
            k = min(k, int(np.count_nonzero(scores > 0)))
        chunks = self.index.chunks
        return [Hit(r + 1, float(scores[i]), chunks[i]) for r, i in enumerate(ranking(scores, k))]


def query_index(cfg: RagQueryConfig, retriever: Retriever | None = None) -> list[Hit]:
    """`gptstack rag query`: the cfg.k best chunks of cfg.index for cfg.text."""
    retriever = retriever or Retriever.load(cfg.index)
    return retriever.search(cfg.text, cfg.k, cfg.method)


def format_hits(hits: list[Hit], width: int = 100) -> str:
    """A ranked list as text: rank, score, document, span, and the chunk's start."""
    lines = []
    for h in hits:
        c = h.chunk
        preview = " ".join(c.text.split())
        preview = preview if len(preview) <= width else preview[: width - 1] + "…"
        lines.append(f"{h.rank:>2}. {h.score:.4f}  {c.doc} [{c.start}:{c.end}]  {c.source}\n    {preview}")
    return "\n".join(lines) if lines else "no chunk matches"
