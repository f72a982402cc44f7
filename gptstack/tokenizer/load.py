"""Every way to get a tokenizer: by name, from a tokenizer folder, from an HF folder, from GGUF metadata;
and the GGUF keys that write one.

A real model's vocabulary is kept exactly as the model has it. Byte-level BPE (GPT-2, SmolLM2,
Llama 3, Qwen2; GGUF `tokenizer.ggml.model = gpt2`) goes to tiktoken: its tokens, written in GPT-2's
byte-to-unicode alphabet, become ranks equal to their ids, which is the merge order exactly when the
ids follow the merges (checked; otherwise HF tokenizers takes it). tiktoken looks a whole pre-token up
before merging (HF's `ignore_merges`), which agrees with HF's BPE for vocabularies whose every token is
reachable through its merges (tests/test_real_tokenizers.py checks SmolLM2's). The split regex comes
from tokenizer.json's `pre_tokenizer` or from llama.cpp's name for it (GGUF_PRE). SentencePiece-style
vocabularies (`tokenizer.ggml.model = llama`: Gemma, Llama 2) go to HF tokenizers, built from the GGUF
tokens, scores and types exactly as transformers' GGUF converter builds them
(integrations/gguf/gguf_tokenizer_mapping.py). CONTROL tokens become special tokens, USER_DEFINED ones
tokens matched whole in any text; BOS/EOS/PAD/UNK, whether BOS is prepended and the chat template come
from the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

from gptstack.files import read_json
from gptstack.tokenizer.base import META, BaseTokenizer, ModelTokens, TokenizerError
from gptstack.tokenizer.bpe import (
    CL100K_PATTERN,
    GPT2_PATTERN,
    O200K_PATTERN,
    STOCK,
    UNICODE_TO_BYTE,
    Tokenizer,
    byte_to_unicode,
    byte_tokenizer,
    stock_tokenizer,
)
from gptstack.tokenizer.hf import HFTokenizer

# Digits one by one, then GPT-2's regex on what lies between them (HF: Digits(individual_digits) then
# ByteLevel; llama.cpp's "smollm"/"starcoder" split \p{N} first): whitespace before a digit ends its
# piece as it would at the end of the text.
DIGITS_GPT2_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?=\p{N})|\s+(?!\S)|\s"""
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# llama.cpp's `tokenizer.ggml.pre` names (src/llama-vocab.cpp) whose split is one of these regexes.
# "default" is read as GPT-2's: llama.cpp's own fallback for files converted without a name.
GGUF_PRE = {
    **dict.fromkeys(["gpt-2", "gpt2", "default", "mpt", "olmo", "phi-2", "jais", "exaone4", "trillion"], GPT2_PATTERN),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
                    DIGITS_GPT2_PATTERN),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral", "chatglm-bpe"],
                    CL100K_PATTERN),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], QWEN2_PATTERN),
    **dict.fromkeys(["gpt-4o", "llama4"], O200K_PATTERN),
}  # fmt: skip
GGUF_PRE_OF = {GPT2_PATTERN: "gpt-2", DIGITS_GPT2_PATTERN: "smollm", CL100K_PATTERN: "llama-bpe",
               QWEN2_PATTERN: "qwen2", O200K_PATTERN: "gpt-4o"}  # fmt: skip
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF tokenizer.ggml.token_type
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")  # SentencePiece with transformers' Gemma spelling rules


def get_tokenizer(spec: str | Path | BaseTokenizer) -> BaseTokenizer:
    """'cl100k_base' | 'o200k_base' | 'bytes' | a tokenizer folder | an HF tokenizer or model folder
    (a tokenizer is returned as it is)."""
    if isinstance(spec, BaseTokenizer):
        return spec
    spec = str(spec)
    if spec in STOCK:
        return stock_tokenizer(spec)
    if spec == "bytes":
        return byte_tokenizer()
    if Path(spec).is_dir():
        return load_tokenizer_folder(spec)
    if spec.endswith(".gguf"):
        raise TokenizerError(f"{spec}: a GGUF file's tokenizer comes with its model (pass the file as the checkpoint)")
    raise TokenizerError(
        f"unknown tokenizer {spec!r}: use cl100k_base, o200k_base, bytes, a tokenizer folder or an HF model folder"
    )


def load_tokenizer_folder(folder: str | Path) -> BaseTokenizer:
    """A folder `save` wrote (this layout, or the first one: ranks.tiktoken + a tokenizer.json holding
    "name"), or an HF folder with a tokenizer.json."""
    folder = Path(folder)
    if (folder / META).is_file():
        meta = read_json(folder / META, TokenizerError)
        backend = meta.get("backend") if isinstance(meta, dict) else None
        if backend not in BACKENDS:
            raise TokenizerError(f"{folder / META}: unknown backend {backend!r}")
        return BACKENDS[backend].from_dir(folder)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"{folder} is no tokenizer folder: it has neither {META} nor tokenizer.json")
    data = read_json(file, TokenizerError)
    if isinstance(data, dict) and "name" in data and "model" not in data:  # our first layout
        return Tokenizer.from_dir(folder)
    return tokenizer_from_hf(folder)


BACKENDS = {"tiktoken": Tokenizer, "hf": HFTokenizer}


# ---- byte-level BPE on tiktoken, or on tokenizers when tiktoken cannot be exact --------------------------------


def byte_level(name: str, vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str,
               special: dict[str, int], info: ModelTokens, backend: str | None, origin: str,
               normalize: str | None = None) -> BaseTokenizer:  # fmt: skip
    """A byte-level BPE (`vocab`: its ordinary tokens, spelled in GPT-2's alphabet; `merges` in order):
    tiktoken when ranking tokens by id is ranking them by merge, else HF tokenizers. `backend` forces one."""
    if backend != "hf" and ids_follow_merges(vocab, merges):
        ranks = {bytes(UNICODE_TO_BYTE[c] for c in t): i for t, i in vocab.items()}
        return Tokenizer(name, ranks, pattern, special, info, unknown_bytes="drop", normalize=normalize)
    if backend == "tiktoken":
        raise TokenizerError(f"{origin}: its ids do not follow its merges, so tiktoken cannot encode it exactly")
    hf = tokenizers.Tokenizer(models.BPE(vocab={**vocab, **special, **info.user_tokens}, merges=merges))
    if normalize == "NFC":
        hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    hf.decoder = decoders.ByteLevel()
    add_tokens(hf, special, info.user_tokens)
    return HFTokenizer(name, hf, info)


def ids_follow_merges(vocab: dict[str, int], merges: list[tuple[str, str]]) -> bool:
    """Whether ranking each token by its id is ranking it by the merge that makes it: all tokens spelled
    in GPT-2's alphabet, every merge yields a new token with a larger id, and every longer token comes
    from a merge."""
    if not all(c in UNICODE_TO_BYTE for t in vocab for c in t):
        return False
    made, last = set(), -1
    for a, b in merges:
        i = vocab.get(a + b)
        if i is None or i <= last or a + b in made:
            return False
        made.add(a + b)
        last = i
    return all(len(t) == 1 or t in made for t in vocab)


def add_tokens(hf: tokenizers.Tokenizer, special: dict[str, int], user: dict[str, int]) -> None:
    """Mark vocabulary tokens as added: special ones (CONTROL) and ordinary ones that are matched whole in
    any text (USER_DEFINED), in id order, as transformers' GGUF converter does."""
    if special:
        hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in sorted(special, key=special.get)])
    if user:
        hf.add_tokens([AddedToken(t, normalized=False, special=False) for t in sorted(user, key=user.get)])


# ---- an HF folder -----------------------------------------------------------------------------------------------


def tokenizer_from_hf(folder: str | Path, backend: str | None = None) -> BaseTokenizer:
    """The tokenizer of an HF tokenizer or model folder: tokenizer.json, with tokenizer_config.json,
    special_tokens_map.json, chat_template.jinja and generation_config.json when present. A byte-level BPE
    whose pre-tokenizer is one regex goes to tiktoken, any other BPE to HF tokenizers; `backend`
    ("tiktoken" | "hf") forces one."""
    folder = Path(folder)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"{folder} has no tokenizer.json (gptstack reads HF fast-tokenizer folders)")
    data = read_json(file, TokenizerError)
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{file}: a {kind or 'unrecognised'} tokenizer is not supported (gptstack reads BPE "
                             "tokenizers: byte-level, or SentencePiece-style with byte fallback)")  # fmt: skip
    added = [t for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    special = {t["content"]: t["id"] for t in added if t.get("special")}
    user = {t["content"]: t["id"] for t in added if not t.get("special")}
    info = hf_info(folder, data, {**model["vocab"], **special, **user}, user)
    pattern = hf_split_pattern(data)
    if pattern is not None and backend != "hf":
        vocab = {t: i for t, i in model["vocab"].items() if t not in special and t not in user}
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        normalize = "NFC" if data.get("normalizer") else None
        return byte_level(folder.name, vocab, merges, pattern, special, info, backend, str(file), normalize)
    if backend == "tiktoken":
        raise TokenizerError(f"{file}: not a byte-level BPE with one split regex, which tiktoken needs")
    return HFTokenizer(folder.name, tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8")), info)


def hf_split_pattern(data: dict) -> str | None:
    """The one regex of a byte-level BPE's pre-tokenizer, or None when tiktoken cannot run it as is:
    GPT-2's ByteLevel, Split(regex) + ByteLevel (Llama 3, Qwen2), Digits + ByteLevel (SmolLM)."""
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    plain = not (
        model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
    )
    byte_decoder = (data.get("decoder") or {}).get("type") == "ByteLevel"
    if not plain or not byte_decoder or data.get("normalizer") not in (None, {"type": "NFC"}):
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    uses_regex, first = steps[-1].get("use_regex", True), (steps[0] if len(steps) == 2 else {})
    if len(steps) == 1 and uses_regex:
        return GPT2_PATTERN
    if first.get("type") == "Digits" and first.get("individual_digits") and uses_regex:
        return DIGITS_GPT2_PATTERN
    split = first.get("pattern", {}).get("Regex") if first.get("type") == "Split" else None
    if split and not uses_regex and first.get("behavior") == "Isolated" and not first.get("invert"):
        return split
    return None


def hf_info(folder: Path, data: dict, vocab: dict[str, int], user: dict[str, int]) -> ModelTokens:
    """BOS/EOS/PAD/UNK, BOS prepending, the chat template and further stop ids from an HF folder's files."""
    cfg = _json_object(folder / "tokenizer_config.json")
    names = {**_json_object(folder / "special_tokens_map.json"), **{k: v for k, v in cfg.items() if v is not None}}

    def token_id(key: str) -> int | None:
        value = names.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return vocab.get(value) if isinstance(value, str) else None

    bos = token_id("bos_token")
    add_bos = cfg["add_bos_token"] if isinstance(cfg.get("add_bos_token"), bool) else _post_processor_adds(data, bos)
    template, origin = cfg.get("chat_template"), str(folder / "tokenizer_config.json")
    if isinstance(template, list):  # named templates: the default one
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if (folder / "chat_template.jinja").is_file():
        template, origin = (
            (folder / "chat_template.jinja").read_text(encoding="utf-8"),
            str(folder / "chat_template.jinja"),
        )
    eos = _json_object(folder / "generation_config.json").get("eos_token_id")
    extra = tuple(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
    return ModelTokens(bos, token_id("eos_token"), token_id("pad_token"), token_id("unk_token"), bool(add_bos),
                       template if isinstance(template, str) else None, origin, extra, user)  # fmt: skip


def _json_object(path: Path) -> dict:
    data = read_json(path, TokenizerError) if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def _post_processor_adds(data: dict, bos: int | None) -> bool:
    """Whether tokenizer.json's post-processor starts every sequence with the BOS token (Llama 3)."""
    post = data.get("post_processor") or {}
    for step in post.get("processors", [post]):
        first = (step.get("single") or [{}])[0] if step.get("type") == "TemplateProcessing" else {}
        name = first.get("SpecialToken", {}).get("id")
        if name is not None:
            return bos is not None and (step.get("special_tokens", {}).get(name, {}).get("ids") or [None])[0] == bos
    return False


# ---- GGUF metadata --------------------------------------------------------------------------------------------


def tokenizer_from_gguf(meta: dict[str, Any], backend: str | None = None, origin: str = "GGUF file") -> BaseTokenizer:
    """The tokenizer a GGUF file describes (`meta`: every key-value field as a plain Python value, as
    interop.gguf.read_gguf_metadata returns it). `origin` names the file in errors."""
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError(f"{origin}: no tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{origin}: {len(types)} token types for {len(tokens)} tokens")
    of = lambda *kinds: {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty in kinds}  # noqa: E731
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown", "eot", "eom")]
    ids = [i if isinstance(i, int) and 0 <= i < len(tokens) else None for i in ids]  # an id out of range: none
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for SentencePiece
    template = meta.get("tokenizer.chat_template")
    stops = tuple(i for i in ids[4:] if i is not None)  # end of turn / of message, where a file names them
    info = ModelTokens(*ids[:4], bool(add_bos), template if isinstance(template, str) else None,
                       f"tokenizer.chat_template of {origin}", stops, of(USER_DEFINED))  # fmt: skip
    name = str(meta.get("general.basename") or meta.get("general.name") or Path(origin).stem)
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE:
            raise TokenizerError(f"{origin}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer gptstack knows "
                                 f"({', '.join(sorted(GGUF_PRE))})")  # fmt: skip
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        special = of(CONTROL, UNKNOWN, UNUSED)
        return byte_level(name, of(NORMAL, BYTE), merges, GGUF_PRE[pre], special, info, backend, origin)
    if kind == "llama":
        if backend == "tiktoken":
            raise TokenizerError(f"{origin}: a SentencePiece vocabulary needs the hf backend")
        return HFTokenizer(name, spm_from_gguf(meta, tokens, types, origin), info)
    raise TokenizerError(f"{origin}: tokenizer.ggml.model {kind!r} is not supported (gpt2: byte-level BPE, "
                         "llama: SentencePiece-style BPE)")  # fmt: skip


def spm_from_gguf(meta: dict, tokens: list[str], types: list[int], origin: str) -> tokenizers.Tokenizer:
    """A SentencePiece vocabulary as transformers' GGUF converter builds it: BPE with byte fallback over
    the file's tokens, merges from the file or rebuilt from the scores (Gemma: from the file order, its
    space-run tokens respelled as ▁ runs), with Gemma's, Phi-3's or Llama's spacing rules."""
    arch = meta.get("general.architecture")
    gemma = arch in GEMMA_ARCHS
    spelled = ["\u2581" * len(t) if gemma and " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not gemma and not (isinstance(scores, list) and len(scores) == len(tokens)):
            raise TokenizerError(f"{origin}: a SentencePiece vocabulary needs tokenizer.ggml.scores or merges")
        merges = merges_from_scores(
            vocab, {t: -i for i, t in enumerate(spelled)} if gemma else dict(zip(spelled, scores, strict=True))
        )
    unk = "<unk>" if gemma and "<unk>" in vocab else None
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if gemma:
        hf.normalizer = normalizers.Replace(" ", "\u2581")
        hf.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    elif arch == "phi3":  # the prefix space comes from a normalizer (transformers' phi3_tokenizer)
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", "first" if prefix else "never", split=False)
        steps += [decoders.Strip(" ", 1, 0)] if prefix else []
    hf.decoder = decoders.Sequence(steps)
    kinds = list(zip(tokens, types, strict=True))
    add_tokens(hf, {t: i for i, (t, ty) in enumerate(kinds) if ty == CONTROL},
               {t: i for i, (t, ty) in enumerate(kinds) if ty == USER_DEFINED and t in vocab})  # fmt: skip
    return hf


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece keeps no merge list: every split of a token into two tokens is a merge, the best
    scored first (transformers' tokenization_utils_base.generate_merges with vocab_scores, same order)."""
    merges = []
    for token, score in scores.items():
        local = [
            (token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += local
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def tokenizer_to_gguf(tok: BaseTokenizer) -> dict[str, Any]:
    """The tokenizer.ggml.* and tokenizer.chat_template keys that describe `tok` to llama.cpp: a byte-level
    BPE whose split regex llama.cpp knows by name, merges recovered from the ranks."""
    if not isinstance(tok, Tokenizer):
        raise TokenizerError(f"tokenizer {tok.name!r}: only byte-level BPE tokenizers can be written to GGUF")
    if tok.pattern not in GGUF_PRE_OF:
        raise TokenizerError(f"tokenizer {tok.name!r}: llama.cpp has no name for its split regex {tok.pattern[:60]!r}")
    spell = byte_to_unicode()
    tokens, types = [f"[PAD{i}]" for i in range(tok.n_vocab)], [UNUSED] * tok.n_vocab
    for piece, i in tok.ranks.items():
        tokens[i], types[i] = "".join(spell[b] for b in piece), NORMAL
    for table, kind in ((tok.special_tokens, CONTROL), (tok.user_tokens, USER_DEFINED)):
        for text, i in table.items():
            tokens[i], types[i] = text, kind
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": GGUF_PRE_OF[tok.pattern],
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges_from_ranks(tok.ranks),
            "tokenizer.ggml.add_bos_token": bool(tok.bos_prefix),
            "tokenizer.ggml.eos_token_id": tok.eot_id}  # fmt: skip
    bos = tok.eot_id if tok.bos_id is None else tok.bos_id  # as GPT-2 (llama.cpp would otherwise assume id 11)
    eot = tok.end_of_turn_id if tok.end_of_turn_id != tok.eot_id else None  # llama.cpp stops there too
    for key, i in (("bos", bos), ("padding", tok.pad_id), ("unknown", tok.unk_id), ("eot", eot)):
        if i is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    if tok.chat_template is not None:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def merges_from_ranks(ranks: dict[bytes, int]) -> list[str]:
    """Each multi-byte token's merge "a b" (GPT-2's alphabet), found by merging its bytes with the ranks
    below its own until two parts are left (llama.cpp's converter does this for tiktoken vocabularies)."""
    spell = byte_to_unicode()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[k : k + 1] for k in range(len(token))]
        while len(parts) > 2:
            best, k = min((ranks.get(parts[k] + parts[k + 1], rank), k) for k in range(len(parts) - 1))
            if best >= rank:
                break
            parts[k : k + 2] = [parts[k] + parts[k + 1]]
        if len(parts) == 2:
            merges.append(" ".join("".join(spell[b] for b in p) for p in parts))
    return merges
