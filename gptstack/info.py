"""`gptstack info`: what a model is, in one table: its shape and block layout, parameters (total and
active per token), training and forward FLOPs per token, and KV-cache bytes per token, for a preset,
a ModelConfig JSON file, or a checkpoint folder."""

from __future__ import annotations

from pathlib import Path

from gptstack import checkpoint
from gptstack.config import ModelConfig, load_config
from gptstack.model import count_params, flops_per_token, kv_cache_bytes_per_token


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
        ("blocks", f"{'pre' if cfg.prenorm else 'post'}-LN {cfg.norm}, {cfg.pos} positions, {ffn}, attention {attn}"),
        ("parameters", f"{params['total']:,} ({_human(params['total'])})"),
        ("active per token", f"{params['active']:,} ({_human(params['active'])})"),
        (
            "FLOPs per token",
            f"train {_human(flops['train'])} (6N + attention at context {context or cfg.block_size}), "
            f"forward {_human(flops['forward'])}",
        ),
        ("KV cache per token", f"{kv:,} bytes in bf16/fp16 ({_human(kv, 'B')}), {2 * kv:,} in fp32"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
