"""Tokenizers: ours (tiktoken byte-level BPE, stock encodings offline) and real models' own, with chat templates.

Every tokenizer has one interface (base.BaseTokenizer): encode/decode, special tokens, BOS/EOS/PAD/UNK,
`bos_prefix`, the chat template (`apply_chat_template`, `encode_chat`, injection-safe) and the ids that
end a reply (`end_of_turn_id`, `stop_ids`). Two backends:
- bpe.Tokenizer: byte-level BPE in tiktoken. Ours (trained, cl100k_base/o200k_base, bytes: the four
  chat role tokens and the built-in <|user|>…<|end|> template) and imported byte-level vocabularies
  (GPT-2, SmolLM2, Llama 3, Qwen2), kept exactly as the model has them.
- hf.HFTokenizer: HF `tokenizers`, for SentencePiece-style vocabularies with scores and byte fallback
  (Gemma, Llama 2), built from GGUF metadata as transformers builds it, or from a tokenizer.json.
load.py finds the right one: `get_tokenizer(name | folder)`, `tokenizer_from_hf(folder)`,
`tokenizer_from_gguf(metadata)`, and `tokenizer_to_gguf(tok)` for export.

A tokenizer folder holds plain files: gptstack-tokenizer.json (backend, name, split regex, special
tokens, BOS/EOS/PAD/UNK, whether BOS is prepended, the chat template's file or "builtin"), the
vocabulary (ranks.tiktoken in tiktoken's base64-rank format, or HF's own tokenizer.json) and
chat_template.jinja. Folders of the first layout (ranks.tiktoken + a tokenizer.json holding "name")
still load, and an HF model folder loads as it is.
"""

from gptstack.tokenizer.base import (
    BUILTIN,
    CHAT_TOKENS,
    EOT,
    BaseTokenizer,
    ModelTokens,
    StreamDecoder,
    TokenizerError,
    check_messages,
)
from gptstack.tokenizer.bpe import (
    CL100K_PATTERN,
    GPT2_PATTERN,
    O200K_PATTERN,
    PATTERNS,
    STOCK,
    Tokenizer,
    byte_to_unicode,
    byte_tokenizer,
    bytes_per_token,
    read_ranks,
    stock_tokenizer,
    train_bpe,
    train_chars,
    with_chat_tokens,
    write_ranks,
)
from gptstack.tokenizer.hf import HFTokenizer
from gptstack.tokenizer.load import (
    DIGITS_GPT2_PATTERN,
    GGUF_PRE,
    QWEN2_PATTERN,
    get_tokenizer,
    load_tokenizer_folder,
    tokenizer_from_gguf,
    tokenizer_from_hf,
    tokenizer_to_gguf,
)

__all__ = [
    "BUILTIN", "CHAT_TOKENS", "CL100K_PATTERN", "DIGITS_GPT2_PATTERN", "EOT", "GGUF_PRE", "GPT2_PATTERN",
    "O200K_PATTERN", "PATTERNS", "QWEN2_PATTERN", "STOCK", "BaseTokenizer", "HFTokenizer", "ModelTokens",
    "StreamDecoder", "Tokenizer", "TokenizerError", "byte_to_unicode", "byte_tokenizer", "bytes_per_token",
    "check_messages", "get_tokenizer", "load_tokenizer_folder", "read_ranks", "stock_tokenizer",
    "tokenizer_from_gguf", "tokenizer_from_hf", "tokenizer_to_gguf", "train_bpe", "train_chars",
    "with_chat_tokens", "write_ranks",
]  # fmt: skip
