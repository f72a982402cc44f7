"""LoRA (Hu et al. 2021): y = x Wᵀ + b + (α/r) · dropout(x) Aᵀ Bᵀ, with W frozen, A (r, in) random
and B (out, r) zero, so training starts from the base model exactly.

A transform applied from outside the model (the model file knows nothing of it): `apply_lora`
swaps the targeted nn.Linear modules for LoRALinear in place, keeping their parameter names
(`….c_attn.weight`), so the base state dict still loads and a merged model saves in the standard
format. Adapters save alone (`adapter.safetensors` + `adapter_config.json`, kilobytes).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")  # module names (last path component)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias parameters) plus the low-rank update."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=dev, dtype=dt))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=dev, dtype=dt))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = cfg.alpha / cfg.rank
        self.lora_dropout = nn.Dropout(cfg.dropout)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta()
            self.merged = False


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter, wrap the target linears, and return their names. Only the adapters
    train afterwards. Tied or shared linears (the LM head tied to the embedding) are left alone."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in cfg.targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, cfg))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"LoRA targets {list(cfg.targets)} match no nn.Linear module of the model")
    model.lora_config = cfg
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights with the adapters folded in, under the base model's names. The model is left
    untouched: merging in place and back would round the frozen base weights (W + d − d ≠ W in floats),
    and a run that saves mid-training would then no longer match one resumed from that save."""
    tensors = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    for n, m in lora_modules(model).items():
        if not m.merged:
            tensors[f"{n}.weight"] = (m.weight + m.delta()).cpu()
    return tensors


ADAPTER_FILES = ("adapter.safetensors", "adapter_config.json")  # what save_adapter writes


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), folder / ADAPTER_FILES[0])
    (folder / ADAPTER_FILES[1]).write_text(json.dumps(asdict(model.lora_config), indent=2))
    return folder


def remove_adapter(folder: str | Path) -> None:
    """Delete a saved adapter: the files save_adapter writes, then the folder if nothing else is in it
    (a file someone else put there stays)."""
    folder = Path(folder)
    for name in ADAPTER_FILES:
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # missing, or not empty
        folder.rmdir()


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Apply the saved adapter's LoRA config to `model` and load its weights (names and shapes checked)."""
    folder = Path(folder)
    try:
        cfg = LoRAConfig(**json.loads((folder / "adapter_config.json").read_text()))
        tensors = load_file(folder / "adapter.safetensors")
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: not a LoRA adapter folder ({e})") from None
    wrapped = apply_lora(model, cfg)
    expected = adapter_state_dict(model)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in tensors):
        raise ValueError(f"{folder}: adapter does not fit this model (names or shapes differ)")
    model.load_state_dict(tensors, strict=False)
    return wrapped
