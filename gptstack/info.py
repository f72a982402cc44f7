"""`gptstack info`: what a model is, in one table: its shape and block layout, parameters (total and
active per token), training and forward FLOPs per token, and KV-cache bytes per token, for a preset,
a ModelConfig JSON file, or a checkpoint folder (with a vision tower: its encoder, image tokens per image
and parameters)."""

from __future__ import annotations

from pathlib import Path

import torch

from gptstack import checkpoint
from gptstack.config import ModelConfig, load_config
from gptstack.files import read_json
from gptstack.model import count_params, flops_per_token, kv_cache_bytes_per_token
from gptstack.vision import VisionConfig, VisionTower


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def model_config_of(spec: str) -> ModelConfig:
    """A preset, a config JSON, or a checkpoint folder's config."""
    path = Path(spec)
    if path.is_dir() or path.name == "latest":
        return checkpoint.load_config(path)
    return load_config(spec)


def _norms(cfg: ModelConfig) -> str:
    """e.g. "pre-LN rmsnorm (1+w), sandwich"."""
    offset = f" ({cfg.norm_offset:g}+w)" if cfg.norm_offset else ""
    return f"{'pre' if cfg.prenorm else 'post'}-LN {cfg.norm}{offset}" + (", sandwich" if cfg.sandwich_norm else "")


def _positions(cfg: ModelConfig) -> str:
    if cfg.pos != "rope":
        return f"{cfg.pos} positions"
    local = f", local θ {cfg.rope_local_theta:g}" if cfg.rope_local_theta is not None else ""
    scaled = f", ×{cfg.rope_scaling:g} interpolation" if cfg.rope_scaling != 1.0 else ""
    return f"rope positions (θ {cfg.rope_theta:g}{local}{scaled})"


def _attention_extras(cfg: ModelConfig) -> str:
    """QK-norm, a softmax scale, q/k/v-only biases and an embedding scale, where set."""
    extras = ["QK-norm"] if cfg.qk_norm else []
    if cfg.attn_scale is not None:
        extras.append(f"scale {cfg.attn_scale:.4g}")
    if cfg.qkv_bias and not cfg.bias:
        extras.append("q/k/v biases only")
    if cfg.embed_scale != 1.0:
        extras.append(f"embeddings × {cfg.embed_scale:.4g}")
    return "".join(f", {e}" for e in extras)


def vision_rows(spec: str) -> list[tuple[str, str]]:
    """The vision tower's rows for a checkpoint folder holding vision.json ([] otherwise)."""
    path = Path(spec)
    if not (path.is_dir() or path.name == "latest"):
        return []
    folder = checkpoint.resolve(path)
    if not (folder / checkpoint.VISION_CONFIG).is_file():
        return []
    cfg = VisionConfig.from_dict(read_json(folder / checkpoint.VISION_CONFIG, checkpoint.CheckpointError))
    with torch.device("meta"):
        n = VisionTower(cfg, pretrained=False).num_params()
    enc = f"{cfg.encoder} {cfg.depth}×{cfg.width}, patch {cfg.patch_size}" if cfg.encoder == "vit" else cfg.encoder
    return [
        ("vision", f"{enc} at {cfg.image_size}×{cfg.image_size} px → {cfg.projector} projector"),
        ("image tokens", f"{cfg.n_image_tokens} per image ({cfg.image_token} → id {cfg.image_token_id})"),
        (
            "vision parameters",
            f"{sum(n.values()):,} ({_human(n['encoder'])} encoder + {_human(n['projector'])} projector)",
        ),
    ]


def describe_model(spec: str, context: int | None = None) -> str:
    """The table `gptstack info` prints: shape, block layout, parameters, FLOPs and KV cache per token."""
    cfg = model_config_of(spec)
    params = count_params(cfg)
    flops = flops_per_token(cfg, context)
    kv = kv_cache_bytes_per_token(cfg, 2)
    kinds = cfg.attn_kinds
    attn = (
        "dense"
        if set(kinds) == {"dense"}
        else f"{kinds.count('local')}/{len(kinds)} layers local (band {cfg.attn_window})"
    )
    heads = f"{cfg.n_head} heads × {cfg.head_dim}" + (
        f", {cfg.n_kv_head} KV heads" if cfg.n_kv_head != cfg.n_head else ""
    )
    ffn = f"{cfg.mlp} d_ff={cfg.d_ff}" + (f", {cfg.n_expert} experts top-{cfg.n_expert_active}" if cfg.n_expert else "")
    rows = [
        ("model", spec),
        (
            "shape",
            f"{cfg.n_layer} layers × {cfg.n_embd} wide, {heads}, context {cfg.block_size}, vocab {cfg.vocab_size}",
        ),
        ("blocks", f"{_norms(cfg)}, {_positions(cfg)}, {ffn}, attention {attn}{_attention_extras(cfg)}"),
        ("parameters", f"{params['total']:,} ({_human(params['total'])})"),
        ("active per token", f"{params['active']:,} ({_human(params['active'])})"),
        (
            "FLOPs per token",
            f"train {_human(flops['train'])} (6N + attention at context {context or cfg.block_size}), "
            f"forward {_human(flops['forward'])}",
        ),
        ("KV cache per token", f"{kv:,} bytes in bf16/fp16 ({_human(kv, 'B')}), {2 * kv:,} in fp32"),
        *vision_rows(spec),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
