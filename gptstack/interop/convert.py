"""File-to-file conversions: transformers folders and (later) GGUF files to and from checkpoint folders.

The in-memory conversions live one layer down (interop/hf.py, interop/gguf.py) so that checkpoint.py
can load a foreign file directly; this module adds reading and writing the folders.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptstack.checkpoint import check_config_memory, check_destination, load_model, save_checkpoint
from gptstack.interop.hf import InteropError, _transformers, from_hf_config, from_hf_model, to_hf_model


def hf_import(src: str | Path, dst: str | Path, tokenizer=None) -> Path:
    """HF folder → gptstack checkpoint folder."""
    transformers = _transformers()

    if not (Path(src) / "config.json").is_file():
        raise InteropError(f"{src} is not a transformers model folder (no config.json)")
    check_destination(dst)  # before any work: never over a folder that is not ours
    cfg = from_hf_config(transformers.AutoConfig.from_pretrained(src))
    check_config_memory(cfg, where=Path(src) / "config.json", copies=2)  # theirs and ours, before either exists
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    return save_checkpoint(from_hf_model(hf), dst, tokenizer=tokenizer, train_config={"imported_from": str(src)})


def hf_export(src: str | Path, dst: str | Path) -> Path:
    """gptstack checkpoint → a folder `AutoModelForCausalLM.from_pretrained` loads."""
    to_hf_model(load_model(src)).save_pretrained(dst)
    return Path(dst)
