"""File-to-file conversions: transformers folders and llama.cpp GGUF files to and from checkpoint folders.

The in-memory conversions live one layer down (interop/hf.py, interop/gguf.py) so that checkpoint.py
can load a foreign file directly; this module adds reading and writing the folders.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptstack.checkpoint import check_config_memory, check_destination, load_model, resolve_tokenizer, save_checkpoint
from gptstack.interop.gguf import GGUFError, write_gguf
from gptstack.interop.hf import InteropError, _transformers, from_hf_config, from_hf_model, to_hf_model
from gptstack.tokenizer import BaseTokenizer, tokenizer_from_hf


def hf_import(src: str | Path, dst: str | Path, tokenizer: str | None = None) -> Path:
    """HF folder → gptstack checkpoint folder, with the folder's own tokenizer and chat template (its
    tokenizer.json and tokenizer_config.json), or `tokenizer` (a name or folder) instead."""
    transformers = _transformers()

    if not (Path(src) / "config.json").is_file():
        raise InteropError(f"{src} is not a transformers model folder (no config.json)")
    check_destination(dst)  # before any work: never over a folder that is not ours
    cfg = from_hf_config(transformers.AutoConfig.from_pretrained(src))
    tok = import_tokenizer(src, tokenizer)
    if tok is not None and tok.n_vocab > cfg.vocab_size:
        raise InteropError(f"{src}: tokenizer {tok.name} has {tok.n_vocab} tokens, the model only {cfg.vocab_size}")
    check_config_memory(cfg, where=Path(src) / "config.json", copies=2)  # theirs and ours, before either exists
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    return save_checkpoint(from_hf_model(hf), dst, tokenizer=tok, train_config={"imported_from": str(src)})


def import_tokenizer(src: str | Path, spec: str | None) -> BaseTokenizer | None:
    """`spec` when given (a name, folder, checkpoint or GGUF file, checked now: an unknown one is a
    TokenizerError), else the HF folder's own tokenizer, or None when it has no tokenizer.json."""
    if spec is not None:
        return resolve_tokenizer(spec)
    return tokenizer_from_hf(src) if (Path(src) / "tokenizer.json").is_file() else None


def hf_export(src: str | Path, dst: str | Path) -> Path:
    """gptstack checkpoint → a folder `AutoModelForCausalLM.from_pretrained` loads. The folder must be new
    or empty: transformers' save_pretrained overwrites and deletes files of the names it writes."""
    if Path(dst).exists() and (not Path(dst).is_dir() or any(Path(dst).iterdir())):
        raise InteropError(f"{dst} exists and is not an empty folder; choose a new output folder")
    to_hf_model(load_model(src)).save_pretrained(dst)
    return Path(dst)


def gguf_import(src: str | Path, dst: str | Path, keep_quantized: bool = False) -> Path:
    """GGUF file → gptstack checkpoint folder, with the file's tokenizer and chat template. `keep_quantized`:
    store Q4_0/Q4_1/Q8_0 tensors as their codes (config.json's "quantization" lists each module)."""
    if not Path(src).is_file():
        raise GGUFError(f"{src}: no such GGUF file")
    check_destination(dst)  # before any work: never over a folder that is not ours
    model = load_model(src, keep_quantized=keep_quantized)
    return save_checkpoint(model, dst, tokenizer=model.tokenizer, train_config={"imported_from": str(src)})


def gguf_export(src: str | Path, dst: str | Path, type: str = "f16") -> Path:
    """gptstack checkpoint (llama, qwen2 or gpt2 family) → a GGUF file llama.cpp loads; `type`: f32, f16, q8_0, q4_0.
    An existing file is never overwritten."""
    if Path(dst).exists():
        raise InteropError(f"{dst} already exists; choose a new output file")
    model = load_model(src)
    return write_gguf(model, model.tokenizer, dst, type)
