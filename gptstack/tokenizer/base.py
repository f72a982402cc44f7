"""The interface every tokenizer has, and what is the same for all of them: special ids, the chat template.

A backend (tiktoken in bpe.py, HF tokenizers in hf.py) provides encode/decode and `_encode_spans`; this
module gives it BOS/EOS/PAD/UNK, `bos_prefix` (and `encode_prompt`, which prepends it to a text),
`end_of_turn_id`, `stop_ids`, streaming decode and `apply_chat_template` / `encode_chat`.

`encode_chat` is injection-safe: only the template's own text can produce special tokens. The
conversation is rendered twice, once as is and once with a placeholder for each message's content;
the placeholder rendering says where template text ends and content begins (a content may come back
trimmed, as Gemma's and Llama 3's templates trim it). Special tokens are cut out of the template text
only, and everything between two of them (template text and content together) is encoded as one
ordinary run, so the ids equal transformers' for ordinary content. A template that rewrites contents
beyond trimming falls back to encoding the rendered text whole, refused when a content holds
special-token text.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch

from gptstack.files import read_json
from gptstack.template import BUILTIN_TEMPLATE, ChatTemplate, TemplateError

EOT = "<|endoftext|>"
# Chat role tokens of our own models. A conversation renders as <|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>
# (template.BUILTIN_TEMPLATE); <|end|> closes every turn, so a model trained on the template learns to stop.
CHAT_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
BUILTIN = "builtin"  # ModelTokens.chat_template for our own format
META = "gptstack-tokenizer.json"  # our file in a tokenizer folder (HF's tokenizer.json may sit beside it)


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or loaded as asked; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelTokens:
    """What a tokenizer says besides its vocabulary: the named ids, whether a sequence starts with BOS,
    and its chat format (Jinja source, BUILTIN, or None for none)."""

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    template_origin: str = "chat template"  # where the template came from, for error messages
    extra_stop_ids: tuple[int, ...] = ()  # generation_config.json's further eos ids (Llama 3's <|eot_id|>)
    user_tokens: dict[str, int] = field(default_factory=dict)  # added tokens matched whole in any text


class BaseTokenizer:
    """The tokenizer interface. Subclasses set `n_vocab` and implement encode, encode_batch, decode,
    decode_bytes, save, `_encode_spans` and `_token_ids`."""

    n_vocab: int

    def __init__(self, name: str, special_tokens: dict[str, int], info: ModelTokens):
        self.name, self.special_tokens, self.info = name, dict(special_tokens), info
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = info.bos_id, info.eos_id, info.pad_id, info.unk_id
        self.special_ids = frozenset(self.special_tokens.values())
        self.template = self._compile_template()  # a malicious template is refused here, before any use

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode_bytes(self, ids: list[int]) -> bytes:
        raise NotImplementedError

    def _encode_spans(self, text: str) -> tuple[list[int], list[int]]:
        """Ordinary encoding of `text`, with the character index each token starts at."""
        raise NotImplementedError

    def _token_ids(self) -> list[int]:
        """Every id this tokenizer can decode."""
        raise NotImplementedError

    # ---- ids with a meaning ---------------------------------------------------------------------------
    @property
    def eot_id(self) -> int:
        """End of text: the document separator in token shards (ours: <|endoftext|>; a model's: its EOS)."""
        if self.eos_id is None:
            raise TokenizerError(f"tokenizer {self.name!r} has no end-of-text (EOS) token")
        return self.eos_id

    @property
    def bos_prefix(self) -> list[int]:
        """[bos_id] when the model's tokenizer starts every sequence with BOS (Gemma, Llama), else []."""
        return [self.bos_id] if self.info.add_bos and self.bos_id is not None else []

    def encode_prompt(self, text: str, allow_special: bool = False) -> list[int]:
        """`text` as a sequence the model reads from its start: `bos_prefix` + its ids, what transformers'
        `tokenizer(text).input_ids` gives (generate, /v1/completions, eval contexts). A BOS that
        special-token text already opens with is not doubled."""
        ids = self.encode(text, allow_special)
        return ids if ids[:1] == self.bos_prefix else [*self.bos_prefix, *ids]

    @cached_property
    def end_of_turn_id(self) -> int:
        """The token that closes a chat turn (what a reply ends with): the first special token after the
        assistant's content when the template renders a probe conversation, else EOS."""
        probe = "gptstack end-of-turn probe"
        for head in ([], [{"role": "system", "content": "s"}]):
            try:
                text = self._chat().render([*head, {"role": "user", "content": "u"},
                                            {"role": "assistant", "content": probe}])  # fmt: skip
            except TemplateError:
                continue
            found = self._specials_in(text[text.find(probe) + len(probe) :]) if probe in text else []
            if found:
                return found[0][2]
        return self.eot_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generated reply: end of turn, EOS, and generation_config's other eos ids.
        The engine, chat, serve, SFT and PPO use these."""
        return frozenset(i for i in (self.end_of_turn_id, self.eos_id, *self.info.extra_stop_ids) if i is not None)

    def decodable_mask(self, vocab_size: int) -> torch.Tensor:
        """Boolean (vocab_size,): the ids this tokenizer can decode. A model's vocabulary may be
        larger (padding) and stock encodings have unassigned ids; generation never samples those."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        ids = torch.tensor(self._token_ids(), dtype=torch.long)
        mask[ids[ids < vocab_size]] = True
        return mask

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n_vocab={self.n_vocab})"

    # ---- the chat template ---------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The chat template's Jinja source (None when the tokenizer has none)."""
        return self.template.source if self.template is not None else None

    def _compile_template(self) -> ChatTemplate | None:
        source = self.info.chat_template
        if source is None:
            return None
        if source == BUILTIN:
            missing = [t for t in CHAT_TOKENS.values() if t not in self.special_tokens]
            if missing:
                raise TokenizerError(f"tokenizer {self.name!r} lacks the built-in template's chat tokens {missing}")
            return ChatTemplate(BUILTIN_TEMPLATE, origin="the built-in chat template")
        texts = {v: k for k, v in {**self.info.user_tokens, **self.special_tokens}.items()}
        named = (self.bos_id, self.eos_id, self.pad_id, self.unk_id)  # an ordinary token's text when not special
        bos, eos, pad, unk = (texts.get(i) or (self.decode([i]) if i is not None else None) for i in named)
        return ChatTemplate(source, bos, eos, pad_token=pad, unk_token=unk, origin=self.info.template_origin)

    def _chat(self) -> ChatTemplate:
        if self.template is None:
            raise TemplateError(f"tokenizer {self.name!r} has no chat template (its model files ship none)")
        return self.template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation rendered by the chat template: what transformers'
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=…)` returns."""
        check_messages(messages)
        return self._chat().render(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """The rendered conversation's ids, and a mask True on the tokens an assistant wrote (its content
        and the end-of-turn token closing it), which SFT trains on. Special-token text inside a content
        stays ordinary text (see the module docstring)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        pieces = content_layout(self._chat(), messages, add_generation_prompt, text)
        if pieces is None:
            return self._encode_rewritten(messages, text)
        present = [t for t in self.special_tokens if t in text]  # looked up once: Gemma has 6,249 of them
        ids, mask, ends, run = [], [], [], []  # run: (text, is_assistant) pieces since the last special token
        for piece, kind in pieces:
            if kind != "template":
                run.append((piece, kind == "assistant"))
                continue
            at = 0
            for a, b, i in self._specials_in(piece, present):
                run.append((piece[at:a], False))
                self._encode_run(run, ids, mask, ends)
                ids.append(i)
                mask.append(False)
                at = b
            run.append((piece[at:], False))
        self._encode_run(run, ids, mask, ends)
        for k in ends:  # the stop token right after an assistant's content closes its turn
            if k < len(ids) and ids[k] in self.stop_ids:
                mask[k] = True
        return ids, mask

    def _encode_run(self, run: list[tuple[str, bool]], ids: list[int], mask: list[bool], ends: list[int]) -> None:
        """Append the pieces of `run` encoded as one ordinary text (tokens merge across piece boundaries
        as in the whole string), masked where an assistant wrote them; `ends` gets the index of the token
        after each assistant piece. Empties `run`."""
        parts = [self.encode(t) if t else [] for t, _ in run]
        whole = self.encode("".join(t for t, _ in run))
        if [i for p in parts for i in p] != whole:  # a token spans a boundary: place tokens by their offsets
            parts = self._split_at_pieces(run)
        for p, (_, assistant) in zip(parts, run, strict=True):
            ids += p
            mask += [assistant] * len(p)
            if assistant:
                ends.append(len(ids))
        run.clear()

    def _split_at_pieces(self, run: list[tuple[str, bool]]) -> list[list[int]]:
        """The run's ids shared out to its pieces: a token goes to an assistant piece it overlaps, else to
        the piece it starts in."""
        ids, starts = self._encode_spans("".join(t for t, _ in run))
        stops = [*starts[1:], sum(len(t) for t, _ in run)]
        bounds, at = [], 0
        for t, _ in run:
            bounds.append((at, at + len(t)))
            at += len(t)
        parts = [[] for _ in run]
        for i, s, e in zip(ids, starts, stops, strict=True):
            owner = next((k for k, (a, b) in enumerate(bounds) if run[k][1] and s < b and e > a), None)
            owner = (
                owner if owner is not None else next(k for k, (a, b) in enumerate(bounds) if s < b or k == len(run) - 1)
            )
            parts[owner].append(i)
        return parts

    def _encode_rewritten(self, messages: list[dict], text: str) -> tuple[list[int], list[bool]]:
        """For a template that rewrites contents beyond trimming (cuts a reasoning block, say): the text
        with all its special tokens, refused when a content holds special-token text. Assistant turns
        are told apart by rendering each prefix of the conversation; the mask runs to the turn's first
        stop token."""
        for n, m in enumerate(messages):
            if found := self._specials_in(m["content"]):
                a, b, _ = found[0]
                raise TemplateError(
                    f"{self.template.origin}: message {n} holds the special token {m['content'][a:b]!r}, and this "
                    "template rewrites message contents, so it cannot be kept as text; remove it"
                )
        ids, starts, at = [], [], 0  # ordinary runs between the text's special tokens, with start offsets
        for a, b, i in [*self._specials_in(text), (len(text), len(text), None)]:
            run, run_starts = self._encode_spans(text[at:a]) if a > at else ([], [])
            ids += run if i is None else [*run, i]
            starts += [at + s for s in run_starts] + ([] if i is None else [a])
            at = b
        mask = [False] * len(ids)
        for n, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self.template.render(messages[:n], True), self.template.render(messages[: n + 1])
            if not (text.startswith(upto) and upto.startswith(before)):
                raise TemplateError(f"{self.template.origin}: cannot tell which tokens assistant message {n} wrote")
            for k in (k for k, s in enumerate(starts) if len(before) <= s < len(upto)):
                mask[k] = True
                if ids[k] in self.stop_ids:
                    break
        return ids, mask

    def _specials_in(self, text: str, present: list[str] | None = None) -> list[tuple[int, int, int]]:
        """(start, end, id) of each special token's text in `text`, leftmost and longest first (among
        `present`, when the caller has narrowed the candidates down)."""
        found = tuple(t for t in (self.special_tokens if present is None else present) if t in text)
        if not found:
            return []
        return [(m.start(), m.end(), self.special_tokens[m.group()]) for m in _alternation(found).finditer(text)]

    # ---- folders -----------------------------------------------------------------------------------------
    def _meta(self, backend: str) -> dict:
        """gptstack-tokenizer.json: what a folder needs besides the vocabulary file."""
        info = self.info
        chat = info.chat_template if info.chat_template in (None, BUILTIN) else "chat_template.jinja"
        return {"format": "gptstack-tokenizer", "version": 2, "backend": backend, "name": self.name,
                "special_tokens": self.special_tokens, "user_tokens": info.user_tokens,
                "bos_id": info.bos_id, "eos_id": info.eos_id, "pad_id": info.pad_id, "unk_id": info.unk_id,
                "add_bos": info.add_bos, "extra_stop_ids": list(info.extra_stop_ids),
                "chat_template": chat}  # fmt: skip


def write_meta(folder: Path, meta: dict, info: ModelTokens) -> None:
    """A folder's gptstack-tokenizer.json, and chat_template.jinja for a model's own template."""
    if meta["chat_template"] == "chat_template.jinja":
        (folder / "chat_template.jinja").write_text(info.chat_template, encoding="utf-8")
    (folder / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def read_meta(folder: Path, backend: str) -> dict:
    """A folder's gptstack-tokenizer.json, checked to be for `backend`."""
    meta = read_json(folder / META, TokenizerError)
    if not isinstance(meta, dict) or meta.get("backend") != backend:
        raise TokenizerError(f"{folder / META}: not a {backend} tokenizer's metadata")
    return meta


def info_from_meta(folder: Path, meta: dict) -> ModelTokens:
    """The ModelTokens a gptstack-tokenizer.json records (its template read from chat_template.jinja)."""
    try:
        template = meta["chat_template"]
        if template == "chat_template.jinja":
            template = (folder / template).read_text(encoding="utf-8")
        ids = (meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["unk_id"])
        origin, stops = str(folder / "chat_template.jinja"), tuple(meta["extra_stop_ids"])
        return ModelTokens(*ids, meta["add_bos"], template, origin, stops, meta["user_tokens"])
    except (KeyError, TypeError) as e:
        raise TokenizerError(f"{folder / META}: missing or bad entry {e}") from None
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer folder {folder}: chat_template.jinja is missing") from None


def check_messages(messages: Any) -> None:
    """[{"role": str, "content": str}, …], or a ValueError naming the first bad message."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i}: need a role and a string content, got {m!r}")


@lru_cache(maxsize=256)
def _alternation(tokens: tuple[str, ...]) -> re.Pattern:
    """A regex matching any of `tokens`, the longest first where one is a prefix of another."""
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


_MARK = "\ue000{}\ue001"  # private-use characters no template trims or writes: "content i goes here"


def content_layout(
    template: ChatTemplate, messages: list[dict], add_generation_prompt: bool, text: str
) -> list[tuple[str, str]] | None:
    """`text` (the rendered conversation) cut into (piece, kind) pieces, kind "template", "content" or
    "assistant" (an assistant's content), found by rendering placeholders instead of the contents. None
    when `text` is not that rendering with each content, or its trimmed form, put back: the template
    rewrites contents."""
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    try:
        skeleton = re.split("\ue000(\\d+)\ue001", template.render(marked, add_generation_prompt))
    except TemplateError:
        return None
    pieces, at = [], 0
    for k, part in enumerate(skeleton):
        if k % 2 == 0:  # template text
            if not text.startswith(part, at):
                return None
            pieces.append((part, "template"))
        else:  # message int(part)'s content, as the template left it
            m, follow = messages[int(part)], skeleton[k + 1]
            s = m["content"]
            part = next((c for c in (s, s.strip(), s.lstrip(), s.rstrip()) if text.startswith(c + follow, at)), None)
            if part is None:
                return None
            pieces.append((part, "assistant" if m["role"] == "assistant" else "content"))
        at += len(part)
    return pieces if at == len(text) else None


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: BaseTokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.utf8.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)
