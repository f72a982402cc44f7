"""The HF `tokenizers` backend: SentencePiece-style vocabularies (Gemma, Llama 2: BPE with byte fallback),
and any BPE tokenizer.json that tiktoken cannot reproduce exactly.

The `tokenizers.Tokenizer` is the model's own (loaded from its tokenizer.json, or built from a GGUF's
tokens as transformers builds it: gguf.py); this class adds the shared interface. `encode` never adds
BOS (callers prepend `bos_prefix`) and keeps special-token text ordinary unless `allow_special`
(tokenizers' `encode_special_tokens`); added tokens that are not special (Gemma's newline and space
runs) are matched whole in any text, as the model's tokenizer does.
"""

from __future__ import annotations

import re
import threading
from functools import cached_property
from pathlib import Path

import tokenizers

from gptstack.tokenizer.base import BaseTokenizer, ModelTokens, TokenizerError, info_from_meta, read_meta, write_meta
from gptstack.tokenizer.bpe import UNICODE_TO_BYTE


class HFTokenizer(BaseTokenizer):
    """A `tokenizers.Tokenizer` behind the shared interface (its special tokens: its special added ones)."""

    def __init__(self, name: str, hf: tokenizers.Tokenizer, info: ModelTokens):
        self.hf = hf
        self._lock = threading.Lock()  # encode_special_tokens is a setting of the one shared Rust object
        special = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        super().__init__(name, special, info)

    @property
    def n_vocab(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def _token_ids(self) -> list[int]:
        return list(self.hf.get_vocab(with_added_tokens=True).values())

    def _encode(self, encode, texts, allow_special: bool = False):
        with self._lock:
            self.hf.encode_special_tokens = not allow_special
            return encode(texts, add_special_tokens=False)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self._encode(self.hf.encode, text, allow_special).ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """Ordinary encoding of many texts (tokenizers' own thread pool; `num_threads` is not used)."""
        return [e.ids for e in self._encode(self.hf.encode_batch, texts)]

    def _encode_spans(self, text: str) -> tuple[list[int], list[int]]:
        enc = self._encode(self.hf.encode, text)
        return enc.ids, [a for a, _ in enc.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    @cached_property
    def _bytes(self) -> dict[int, bytes]:
        """Each id's bytes: a byte-fallback token <0xNN> is its byte, ▁ a space (SentencePiece); a
        byte-level vocabulary is spelled in GPT-2's alphabet; an added token is its text."""
        byte_level = self.hf.decoder is not None and b'"ByteLevel"' in self.hf.decoder.__getstate__()
        out = {}
        for token, i in self.hf.get_vocab(with_added_tokens=False).items():
            if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token):
                out[i] = bytes([int(m.group(1), 16)])
            elif byte_level and all(c in UNICODE_TO_BYTE for c in token):
                out[i] = bytes(UNICODE_TO_BYTE[c] for c in token)
            else:
                out[i] = token.replace("\u2581", " ").encode()
        out.update({i: t.content.encode() for i, t in self.hf.get_added_tokens_decoder().items()})
        return out

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The ids' bytes, token by token (what streaming needs; a decoder's Strip of the first space,
        as Llama 2's, is `decode`'s alone)."""
        return b"".join(self._bytes[i] for i in ids)

    @cached_property
    def ranks(self) -> dict[bytes, int]:
        """{token bytes: id} of the ordinary tokens (byte counts per token; ids sharing bytes keep one)."""
        return {b: i for i, b in self._bytes.items() if i not in self.special_ids}

    def save(self, folder: str | Path) -> Path:
        """HF's own tokenizer.json, gptstack-tokenizer.json and (a model's own template) chat_template.jinja."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(folder / "tokenizer.json"))
        write_meta(folder, self._meta("hf"), self.info)
        return folder

    @classmethod
    def from_dir(cls, folder: str | Path) -> HFTokenizer:
        """A folder `save` wrote."""
        folder = Path(folder)
        meta = read_meta(folder, "hf")
        info = info_from_meta(folder, meta)
        try:
            hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
            raise TokenizerError(f"{folder / 'tokenizer.json'}: unreadable ({str(e)[:200]})") from None
        return cls(str(meta.get("name")), hf, info)
