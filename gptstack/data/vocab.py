"""Training, measuring and using a tokenizer (`gptstack tokenizer train|eval|encode`).

The corpus is read like the data pipeline reads it (data/sources.py: files, folders, JSONL,
Parquet, HTML extracted; default the Python standard library), split into a training part and a
held-out part by a hash of each document's name, so `eval` scores text the tokenizer never saw.
`encode` (and `eval`) take any tokenizer a user holds: a stock name, a tokenizer or HF folder, a
checkpoint, or a GGUF file (its tokenizer.ggml.* metadata): checkpoint.resolve_tokenizer, which every
`--tokenizer` option uses.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

from gptstack.checkpoint import resolve_tokenizer
from gptstack.data.sources import corpus_texts
from gptstack.tokenizer import Tokenizer, bytes_per_token, train_bpe, train_chars


@dataclass
class TokenizerTrainConfig:
    out: str  # tokenizer folder to write
    input: list[str] = field(default_factory=list)  # files or folders (default: the Python standard library)
    vocab_size: int = 8192  # ids in all, special tokens included
    pattern: str = "cl100k"  # pre-tokenization regex: gpt2 | cl100k | o200k | REGEX
    trainer: Literal["rustbpe", "hf", "chars"] = "rustbpe"  # rustbpe (faster) | hf | chars (one id per character)
    max_bytes: int | None = None  # train on at most this much text
    heldout: float = 0.1  # fraction of documents kept out for `tokenizer eval`


@dataclass
class TokenizerEvalConfig:
    input: list[str] = field(default_factory=list)  # files or folders (default: the Python standard library)
    tokenizers: str = "cl100k_base,o200k_base"  # comma-separated names, folders, checkpoints or GGUF files
    max_bytes: int | None = None  # score at most this much text
    heldout: float = 0.1  # must match the value used to train


@dataclass
class EncodeConfig:
    tokenizer: str  # cl100k_base | o200k_base | bytes | a tokenizer folder | an HF folder | a checkpoint | FILE.gguf
    text: str | None = None  # the text (default: standard input)
    allow_special: bool = False  # parse special-token text (<|im_start|>, <bos>, …) as special tokens
    show: bool = False  # also print each token's bytes on stderr
    decode: bool = False  # the input is ids (a JSON list, or separated by spaces or commas): print their text


def encode_text(cfg: EncodeConfig, text: str) -> tuple[str, str | None]:
    """The ids of `text` as a JSON list (or, with cfg.decode, the text of the ids in `text`), and with
    cfg.show each token's bytes joined by ' | ' (else None)."""
    tok = resolve_tokenizer(cfg.tokenizer)
    if cfg.decode:
        return tok.decode(parse_ids(text)), None
    ids = tok.encode(text, allow_special=cfg.allow_special)
    pieces = " | ".join(repr(tok.decode_bytes([i]))[2:-1] for i in ids) if cfg.show else None
    return json.dumps(ids), pieces


def parse_ids(text: str) -> list[int]:
    """Token ids from a JSON list or from numbers separated by spaces or commas."""
    try:
        return [int(x) for x in text.replace("[", " ").replace("]", " ").replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--decode needs token ids (a JSON list or numbers), got {text.strip()[:60]!r}") from None


def train_tokenizer(cfg: TokenizerTrainConfig) -> tuple[Tokenizer, dict]:
    """Train on the corpus's training part and save to cfg.out; returns the tokenizer and
    {"megabytes", "seconds"}."""
    texts = corpus_texts(cfg.input, "train", cfg.heldout, cfg.max_bytes)
    t0 = time.perf_counter()
    name = cfg.out.rstrip("/").split("/")[-1]
    if cfg.trainer == "chars":
        tok = train_chars(texts, name=name)
    else:
        tok = train_bpe(texts, cfg.vocab_size, cfg.pattern, cfg.trainer, name=name)
    seconds = time.perf_counter() - t0
    tok.save(cfg.out)
    return tok, {"megabytes": sum(len(t.encode()) for t in texts) / 1e6, "seconds": seconds}


def eval_tokenizers(cfg: TokenizerEvalConfig) -> list[dict]:
    """Bytes per token of each tokenizer on the held-out part (see tokenizer.bytes_per_token)."""
    texts = corpus_texts(cfg.input, "heldout", cfg.heldout, cfg.max_bytes)
    return bytes_per_token([resolve_tokenizer(t) for t in cfg.tokenizers.split(",")], texts)
