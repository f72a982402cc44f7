"""Exact and fuzzy (MinHash-LSH) deduplication, vectorised with numpy.

Text is normalised (lower case, words = runs of `\\w`, punctuation and spacing dropped) and cut into
word 5-gram shingles. Each shingle gets a 64-bit hash; the MinHash signature of a document is, for
each of `bands × rows` hash functions h_i(x) = (a_i·x + b_i mod 2^64) >> 32, the minimum over its
shingles. LSH puts two documents in the same bucket when all `rows` values of a band agree, so a pair
with Jaccard similarity s becomes a candidate with probability

    P(s) = 1 - (1 - s^rows)^bands     (the S-curve; 14 × 8: 50% at s ≈ 0.685, 90% at s ≈ 0.80)

Candidates are joined by union-find and each cluster keeps its first document.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

WORD = re.compile(r"\w+")
MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def normalize(text: str) -> list[str]:
    return WORD.findall(text.lower())


def exact_key(text: str) -> bytes:
    """16-byte hash of the normalised text: documents equal up to case, spacing and punctuation match."""
    return hashlib.blake2b(" ".join(normalize(text)).encode(), digest_size=16).digest()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective 64-bit mix (numpy uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def word_hashes(words: list[str]) -> np.ndarray:
    """(n_words,) uint64: crc32 of each word's UTF-8, spread to 64 bits. Deterministic across processes."""
    crc = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    return _mix(crc)


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """(max(len-n+1, 1),) uint64 hashes of each run of n consecutive word hashes (a shorter text is one
    shingle); the order of words matters."""
    if len(h) == 0:
        return h
    n = min(n, len(h))
    out = np.zeros(len(h) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            out = _mix(out ^ h[j : len(h) - n + 1 + j])
    return out


def shingles(words: list[str], n: int = 5) -> np.ndarray:
    return np.unique(ngram_hashes(word_hashes(words), n))


class MinHasher:
    def __init__(self, bands: int = 14, rows: int = 8, ngram: int = 5, seed: int = 1):
        self.bands, self.rows, self.ngram = bands, rows, ngram
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=bands * rows, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, size=bands * rows, dtype=np.uint64)

    @property
    def threshold(self) -> float:
        """The similarity at which the S-curve crosses 1/2: (1 - 0.5^(1/b))^(1/r)."""
        return (1 - 0.5 ** (1 / self.bands)) ** (1 / self.rows)

    def probability(self, s: float | np.ndarray) -> float | np.ndarray:
        return 1 - (1 - np.asarray(s) ** self.rows) ** self.bands

    def features(self, texts: list[str]) -> tuple[list[bytes], np.ndarray]:
        """Exact keys and MinHash signatures, normalising each text once."""
        words = [normalize(t) for t in texts]
        keys = [hashlib.blake2b(" ".join(w).encode(), digest_size=16).digest() for w in words]
        return keys, self.signatures(words)

    def signatures(self, words: list[list[str]]) -> np.ndarray:
        """(len(words), bands*rows) uint32 from normalised word lists. A document with no words gets
        all-ones and is never a candidate."""
        texts = words
        sets = [shingles(w, self.ngram) for w in words]
        lengths = np.array([len(s) for s in sets])
        sig = np.full((len(texts), len(self.a)), 0xFFFFFFFF, dtype=np.uint32)
        has = lengths > 0
        if not has.any():
            return sig
        flat = np.concatenate([s for s in sets if len(s)])
        starts = np.concatenate([[0], np.cumsum(lengths[has])[:-1]])
        with np.errstate(over="ignore"):
            for i in range(len(self.a)):  # one hash function over every shingle of the batch at a time
                hashed = ((self.a[i] * flat + self.b[i]) >> np.uint64(32)).astype(np.uint32)
                sig[has, i] = np.minimum.reduceat(hashed, starts)
        return sig

    def candidate_pairs(self, sig: np.ndarray) -> np.ndarray:
        """(P, 2) int64 index pairs (i < j) that share a band bucket, linking each bucket as a chain."""
        valid = ~(sig == 0xFFFFFFFF).all(axis=1)
        index = np.flatnonzero(valid)
        pairs = []
        with np.errstate(over="ignore"):
            for b in range(self.bands):
                band = sig[index, b * self.rows : (b + 1) * self.rows].astype(np.uint64)
                key = np.zeros(len(index), dtype=np.uint64)
                for j in range(self.rows):
                    key = _mix(key ^ band[:, j])
                order = np.argsort(key, kind="stable")
                same = key[order][1:] == key[order][:-1]
                pairs.append(np.stack([index[order][:-1][same], index[order][1:][same]], axis=1))
        return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find over `pairs`: (n,) root of each item, the smallest index of its cluster."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def dedup_keep(exact_keys: list[bytes], sig: np.ndarray, hasher: MinHasher, fuzzy: bool = True) -> np.ndarray:
    """(n,) int8 per document: 0 kept, 1 exact duplicate of an earlier one, 2 near duplicate."""
    status = np.zeros(len(exact_keys), dtype=np.int8)
    first: dict[bytes, int] = {}
    for i, k in enumerate(exact_keys):
        if first.setdefault(k, i) != i:
            status[i] = 1
    if fuzzy:
        unique = np.flatnonzero(status == 0)
        roots = clusters(len(unique), hasher.candidate_pairs(sig[unique]))
        status[unique[roots != np.arange(len(unique))]] = 2
    return status
