"""Token shards: `{split}-{index:06d}.bin` files of raw little-endian uint16/uint32 ids, each document
followed by <|endoftext|>, plus `manifest.json` (tokenizer, dtype, counts, per-shard SHA-256, source
mixture, filter and dedup tables). Files are written to a temporary name and renamed, so a shard on
disk is always whole; the manifest is written last and names every shard of a finished run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "gptstack-shards/1"


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Appends token arrays and cuts a shard every `shard_tokens` tokens (documents may straddle).
    `on_write(name)` is called before each shard file is written (data prepare records it in its ledger)."""

    def __init__(
        self,
        out: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        eot: int,
        on_write: Callable[[str], None] | None = None,
    ):
        self.out, self.split, self.dtype, self.shard_tokens, self.eot = out, split, dtype, shard_tokens, eot
        self.on_write = on_write
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens.astype(self.dtype, copy=False))
        self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.buffer)
            self._flush(flat[: self.shard_tokens])
            self.buffer, self.buffered = [flat[self.shard_tokens :]], len(flat) - self.shard_tokens

    def _flush(self, tokens: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):06d}.bin"
        data = tokens.astype("<" + self.dtype.str[1:], copy=False).tobytes()
        if self.on_write is not None:
            self.on_write(name)
        atomic_write(self.out / name, data)
        ends = int((tokens == self.eot).sum())  # documents that end in this shard
        self.shards.append(
            {"file": name, "tokens": len(tokens), "documents": ends, "sha256": hashlib.sha256(data).hexdigest()}
        )

    def close(self) -> dict:
        if self.buffered or not self.shards:
            self._flush(np.concatenate(self.buffer) if self.buffer else np.zeros(0, self.dtype))
        tokens = sum(s["tokens"] for s in self.shards)
        return {"tokens": tokens, "documents": sum(s["documents"] for s in self.shards), "shards": self.shards}


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a shard folder (no {MANIFEST}; run `gptstack data prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    return manifest


def open_shards(folder: str | Path, split: str, verify: bool = False) -> list[np.memmap]:
    """Memory maps of a split's shards, in order; checks sizes (and SHA-256 when `verify`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if split not in manifest["splits"]:
        raise ValueError(f"{folder} has no {split!r} split (it has {', '.join(manifest['splits'])})")
    dtype = np.dtype(manifest["dtype"])
    maps = []
    for shard in manifest["splits"][split]["shards"]:
        path = folder / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
            raise ValueError(f"shard {path} is missing or has the wrong size; prepare the data again")
        if verify and hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
            raise ValueError(f"shard {path} does not match its checksum in the manifest")
        if shard["tokens"]:
            maps.append(np.memmap(path, dtype=dtype, mode="r"))
    return maps


def tokenizer_entry(tokenizer, out: Path, spec: str) -> dict:
    """Save the tokenizer inside the shard folder and return the manifest's `tokenizer` record."""
    tokenizer.save(out / "tokenizer")
    return {"spec": spec, "name": tokenizer.name, "n_vocab": tokenizer.n_vocab, "eot_id": tokenizer.eot_id,
            "folder": "tokenizer"}  # fmt: skip


def write_token_arrays(out: str | Path, tokenizer, splits: dict[str, np.ndarray], shard_tokens: int = 2**24) -> dict:
    """A shard folder from token streams tokenized elsewhere, e.g. a corpus split by position as nanoGPT
    splits Shakespeare (first 90% train, last 10% val). The manifest is written last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.n_vocab)
    info = {}
    for split, tokens in splits.items():
        writer = ShardWriter(out, split, dtype, shard_tokens, tokenizer.eot_id)
        writer.add(np.asarray(tokens))
        info[split] = writer.close()
    manifest = {"format": FORMAT, "tokenizer": tokenizer_entry(tokenizer, out, tokenizer.name), "dtype": dtype.name,
                "splits": info}  # fmt: skip
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def write_texts(out: str | Path, tokenizer, texts: list[str], val_fraction: float = 0.05) -> dict:
    """A shard folder from in-memory documents (each followed by end-of-text); the last `val_fraction`
    of the documents is the val split."""
    n_val = max(1, round(len(texts) * val_fraction)) if len(texts) > 1 else 0
    ids = tokenizer.encode_batch(texts)

    def stream(docs: list[list[int]]) -> np.ndarray:
        return np.fromiter((t for d in docs for t in (*d, tokenizer.eot_id)), dtype=np.int64)

    splits = {"train": stream(ids[: len(ids) - n_val])}
    if n_val:
        splits["val"] = stream(ids[len(ids) - n_val :])
    return write_token_arrays(out, tokenizer, splits)
