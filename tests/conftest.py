"""Shared test helpers: small configurations of every architecture variant, and weight scrambling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptstack.config import ModelConfig

# ../shared/data beside the repository (real public data; read it, never copy it in)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SMALL = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)

# Every architecture variant the model file supports, in laptop size.
VARIANTS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(**SMALL),
    "gpt1-postln": ModelConfig(**SMALL, prenorm=False),
    "odd-heads": ModelConfig(**{**SMALL, "n_embd": 60, "n_head": 5}),
    "head-dim-override": ModelConfig(**{**SMALL, "n_embd": 40, "n_head": 3, "head_dim": 16}),
    "llama-gqa": ModelConfig(**SMALL, **LLAMA, n_kv_head=2),
    "mqa": ModelConfig(**SMALL, **LLAMA, n_kv_head=1),
    "rope-scaled": ModelConfig(**SMALL, **LLAMA, rope_theta=500.0, rope_scaling=2.0),
    "gpt3-banded": ModelConfig(**SMALL, attn_pattern="dense,local", attn_window=5),
    "all-local-gqa": ModelConfig(**SMALL, **LLAMA, n_kv_head=2, attn_pattern="local", attn_window=3),
    "moe-swiglu": ModelConfig(**SMALL, **LLAMA, n_kv_head=2, n_expert=4, n_expert_active=2, d_ff=48),
    "moe-gelu-top1": ModelConfig(**SMALL, n_expert=3, n_expert_active=1),
}


@torch.no_grad()
def scramble(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Replace every parameter with seeded noise large enough that logits differ clearly between
    tokens (a fresh 0.02-std init is nearly flat and makes greedy decoding trivially repetitive).
    Norm weights stay near 1 so activations keep their scale."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        is_norm_weight = p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight")
        p.copy_(1.0 + 0.1 * noise if is_norm_weight else std * noise)
    return model


@pytest.fixture(params=sorted(VARIANTS), ids=sorted(VARIANTS))
def variant(request) -> ModelConfig:
    return VARIANTS[request.param]
