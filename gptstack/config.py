"""ModelConfig: the one typed description of a GPT, plus named presets that cite their source.

Every architectural variant of the lineage is a field here, never a subclass: learned or rotary
positions (one RoPE base, or a second one for local layers), pre- or post-LN, LayerNorm or RMSNorm
(optionally scaling by offset + w, Gemma's (1+w)), sandwich norms, QK-norm, GELU, SwiGLU or GeGLU,
MHA/GQA/MQA, dense or locally banded (sliding-window) attention per layer, dense or mixture-of-experts
FFN, biases everywhere, nowhere or only on q/k/v (Qwen2), a token-embedding scale, a softmax scale,
tied or untied embeddings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptstack.files import read_json


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model; the message says which field."""


MLP_KINDS = ("gelu", "swiglu", "geglu")  # gelu = tanh-approximated GELU, as GPT-1/2/3 use it; geglu gates with it
NORM_KINDS = ("layernorm", "rmsnorm")
POS_KINDS = ("learned", "rope")
ATTN_KINDS = ("dense", "local")


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # context length in tokens
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None → n_head (MHA); 1 → MQA; between → GQA
    head_dim: int | None = None  # None → n_embd // n_head
    d_ff: int | None = None  # MLP hidden width (per expert for MoE); None → 4 * n_embd
    mlp: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = True  # False: post-LN blocks and no final norm (GPT-1)
    pos: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation: positions are divided by this factor
    bias: bool = True  # biases in the linear layers and norms
    qkv_bias: bool | None = None  # biases on the q/k/v projection; None → same as bias (Qwen2: only these)
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head, before RoPE (Gemma 3)
    sandwich_norm: bool = False  # also norm the attention and MLP outputs before each residual add (Gemma 2/3)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight), in fp32 (Gemma: 1.0)
    embed_scale: float = 1.0  # token embeddings × this (Gemma: √n_embd, rounded to the activation dtype)
    rope_local_theta: float | None = None  # RoPE base of "local" layers; None → rope_theta (Gemma 3: 1e4)
    attn_scale: float | None = None  # softmax scale of q·k; None → 1/√head_dim (Gemma 3: query_pre_attn_scalar^-½)
    tie_embeddings: bool = True
    attn_pattern: str = "dense"  # comma list cycled over layers, e.g. "dense,local" (GPT-3)
    attn_window: int = 256  # band width of "local" layers: a query sees itself and window-1 keys before it
    n_expert: int = 0  # 0 → dense FFN; otherwise a mixture of experts in every layer
    n_expert_active: int = 2  # top-k experts per token
    moe_aux_loss_coef: float = 0.01  # Switch Transformer load-balancing loss weight
    moe_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (0 = off)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head > 0 and self.n_embd % self.n_head:
                raise ConfigError(f"n_head={self.n_head} does not divide n_embd={self.n_embd} (set head_dim)")
            self.head_dim = self.n_embd // max(self.n_head, 1)
        if self.d_ff is None:
            self.d_ff = 4 * self.n_embd
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "head_dim", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, allowed in (("mlp", MLP_KINDS), ("norm", NORM_KINDS), ("pos", POS_KINDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.rope_scaling < 1.0 or self.rope_theta <= 0:
            raise ConfigError("rope_scaling must be >= 1 and rope_theta > 0")
        bad = [k for k in self.attn_kinds if k not in ATTN_KINDS]
        if bad:
            raise ConfigError(f"attn_pattern {self.attn_pattern!r}: unknown kind {bad[0]!r} (use dense, local)")
        if self.attn_window <= 0:
            raise ConfigError(f"attn_window must be positive, got {self.attn_window}")
        if self.n_expert < 0 or (self.n_expert and not 1 <= self.n_expert_active <= self.n_expert):
            raise ConfigError(f"n_expert_active={self.n_expert_active} must be in [1, n_expert={self.n_expert}]")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        self.validate_variants()

    def validate_variants(self) -> None:
        """The Gemma / Qwen-era fields: norms, scales and the second RoPE base."""
        for name in ("bias", "qkv_bias", "qk_norm", "sandwich_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.norm != "rmsnorm" and (self.qk_norm or self.norm_offset):
            raise ConfigError("qk_norm and norm_offset need norm='rmsnorm'")
        if self.sandwich_norm and not self.prenorm:
            raise ConfigError("sandwich_norm needs prenorm blocks (post-LN already norms each residual sum)")
        if not math.isfinite(self.norm_offset):
            raise ConfigError(f"norm_offset must be a finite number, got {self.norm_offset}")
        for name in ("embed_scale", "attn_scale", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.rope_local_theta is not None and self.pos != "rope":
            raise ConfigError("rope_local_theta needs pos='rope'")

    @property
    def attn_kinds(self) -> list[str]:
        """The attention kind of every layer: the comma pattern cycled over n_layer."""
        pattern = [p.strip() for p in self.attn_pattern.split(",") if p.strip()] or ["dense"]
        return [pattern[i % len(pattern)] for i in range(self.n_layer)]

    # --- JSON round-trip ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        check_fields(cls, d)
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **overrides})


# --- presets ---------------------------------------------------------------------------------
# Each preset cites the table it comes from. Values not given by the source are marked "ours".

_GPT2 = dict(vocab_size=50257, block_size=1024)  # Radford et al. 2019, Table 2 (+ released code)
_GPT3 = dict(vocab_size=50257, block_size=2048, attn_pattern="dense,local", attn_window=256)
# GPT-3 (Brown et al. 2020, Table 2.1): "alternating dense and locally banded sparse attention
# patterns ... similar to the Sparse Transformer". The band width is not published: 256 is ours.
_LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
# Gemma 3 (Gemma Team 2025, technical report §2): 5 local sliding-window layers per global one, RoPE base
# 10k on local and 1M on global layers, QK-norm, pre- and post-norms (sandwich) with (1+w) RMSNorm, GeGLU,
# embeddings × √d, tied embeddings, no biases; eps and the rest from the released config.json files.
_GEMMA3 = dict(
    pos="rope", norm="rmsnorm", norm_offset=1.0, norm_eps=1e-6, mlp="geglu", bias=False, tie_embeddings=True,
    qk_norm=True, sandwich_norm=True, rope_theta=1e6, rope_local_theta=1e4,
    attn_pattern="local,local,local,local,local,dense",
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-1 (Radford et al. 2018, §4.1): 12 layers, 768 wide, 12 heads, 3072 FFN, 512 context,
    # 40,478 BPE vocabulary, GELU, learned positions, post-LN (norm after each residual add).
    "gpt1": dict(vocab_size=40478, block_size=512, n_layer=12, n_head=12, n_embd=768, prenorm=False),
    # GPT-2 (Radford et al. 2019, Table 2): 124M / 355M / 774M / 1558M as counted from the release.
    "gpt2-small": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # GPT-3 family (Brown et al. 2020, Table 2.1): n_layer, d_model, n_heads, d_head.
    "gpt3-small": dict(_GPT3, n_layer=12, n_embd=768, n_head=12),  # 125M
    "gpt3-medium": dict(_GPT3, n_layer=24, n_embd=1024, n_head=16),  # 350M
    "gpt3-large": dict(_GPT3, n_layer=24, n_embd=1536, n_head=16),  # 760M
    # Table 2.1 prints 24 heads of d_head 128 for XL, which cannot tile d_model=2048 and would give
    # 1.5B parameters; 16×128 = 2048 reproduces the published 1.3B.
    "gpt3-xl": dict(_GPT3, n_layer=24, n_embd=2048, n_head=16),  # 1.3B
    "gpt3-2.7b": dict(_GPT3, n_layer=32, n_embd=2560, n_head=32),
    "gpt3-6.7b": dict(_GPT3, n_layer=32, n_embd=4096, n_head=32),
    # Table 2.1 prints d_model=5140, which 40 heads of 128 cannot tile: 5120 = 40×128 is used.
    "gpt3-13b": dict(_GPT3, n_layer=40, n_embd=5120, n_head=40),
    "gpt3-175b": dict(_GPT3, n_layer=96, n_embd=12288, n_head=96),
    # Llama-style (Llama 3 8B, Grattafiori et al. 2024, Table 3): RMSNorm, RoPE θ=500k, SwiGLU,
    # GQA 32 query / 8 KV heads, no biases, untied embeddings, 128,256 vocabulary.
    "llama3-8b": dict(
        _LLAMA,
        vocab_size=128256,
        block_size=8192,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        n_embd=4096,
        d_ff=14336,
        rope_theta=500000.0,
        norm_eps=1e-5,
    ),
    # GPT-4-style sparse MoE: 8 experts, top-2 routing, as reported for GPT-4 and published for
    # Mixtral 8x7B (Jiang et al. 2024, Table 1), whose shape this preset takes.
    "moe-8x7b": dict(
        _LLAMA,
        vocab_size=32000,
        block_size=32768,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        n_embd=4096,
        d_ff=14336,
        rope_theta=1e6,
        norm_eps=1e-5,
        n_expert=8,
        n_expert_active=2,
        moe_aux_loss_coef=0.02,
    ),
    # Gemma 3 270M (google/gemma-3-270m config.json): 18 layers × 640, 4 heads of 256 and 1 KV head,
    # d_ff 2048, 262,144 vocabulary, 32k context, sliding window 512, query_pre_attn_scalar 256.
    "gemma3-270m": dict(
        _GEMMA3,
        vocab_size=262144,
        block_size=32768,
        n_layer=18,
        n_head=4,
        n_kv_head=1,
        n_embd=640,
        head_dim=256,
        d_ff=2048,
        attn_window=512,
        embed_scale=math.sqrt(640),
        attn_scale=256**-0.5,
    ),
    # Qwen2-0.5B (Yang et al. 2024, Qwen2 technical report, Table 1): 24 layers × 896, 14 query / 2 KV heads
    # of 64, d_ff 4864, 32k context, q/k/v biases only; RoPE θ 1e6, eps 1e-6, tied embeddings and the padded
    # 151,936-id vocabulary from the released config.json.
    "qwen2-0.5b": dict(
        _LLAMA,
        vocab_size=151936,
        block_size=32768,
        n_layer=24,
        n_head=14,
        n_kv_head=2,
        n_embd=896,
        d_ff=4864,
        qkv_bias=True,
        rope_theta=1e6,
        norm_eps=1e-6,
        tie_embeddings=True,
    ),
    # Tiny CPU presets (ours): same families, laptop-sized.
    "tiny": dict(_GPT2, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "tiny-gpt1": dict(vocab_size=40478, block_size=256, n_layer=4, n_head=4, n_embd=128, prenorm=False),
    "tiny-gpt3": dict(_GPT3, block_size=256, n_layer=4, n_head=4, n_embd=128, attn_window=64),
    "tiny-llama": dict(
        _LLAMA, vocab_size=50257, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, d_ff=344
    ),
    "tiny-moe": dict(
        _LLAMA,
        vocab_size=50257,
        block_size=256,
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        n_embd=128,
        d_ff=256,
        n_expert=4,
        n_expert_active=2,
    ),
    "tiny-gemma": dict(
        _GEMMA3,
        vocab_size=50257,
        block_size=256,
        n_layer=6,
        n_head=4,
        n_kv_head=1,
        n_embd=128,
        head_dim=32,
        d_ff=512,
        attn_window=64,
        embed_scale=math.sqrt(128),
        attn_scale=32**-0.5,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset as a ModelConfig, with optional field overrides."""
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=3)
        raise ConfigError(
            f"unknown preset {name!r}"
            + (f"; did you mean {', '.join(hint)}?" if hint else "")
            + f" (known: {', '.join(PRESETS)})"
        )
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


def load_config(spec: str | Path, **overrides: Any) -> ModelConfig:
    """A preset name, or a path to a JSON file holding a ModelConfig (or a checkpoint's config.json)."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        d = read_json(path, ConfigError, "config file")
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of ModelConfig fields, got {type(d).__name__}")
        d = d.get("model", d)  # a checkpoint's config.json nests the model config
        return ModelConfig.from_dict({**d, **overrides})
    return get_preset(str(spec), **overrides)


def check_fields(cls: type, d: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key of `d` that is not a field of the dataclass `cls`."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"unknown config field {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def parse_overrides(items: list[str], cls: type = ModelConfig) -> dict[str, Any]:
    """`key=value` strings (from the CLI) to overrides typed by the fields of the dataclass `cls`."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        check_fields(cls, {key: None})
        out[key] = coerce(key, types[key], raw)
    return out


def coerce(key: str, typ: str, raw: str) -> Any:
    if raw.lower() == "none" and "None" in typ:
        return None
    try:
        if typ.startswith("bool"):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if typ.startswith("int"):
            return int(raw)
        if typ.startswith("float"):
            return float(raw)
        if typ.startswith(("list", "dict")):
            return json.loads(raw)
    except ValueError:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{key}={raw!r} is not a valid {typ.split()[0]}") from None
    return raw


__all__ = [
    "PRESETS",
    "ConfigError",
    "ModelConfig",
    "check_fields",
    "coerce",
    "get_preset",
    "load_config",
    "parse_overrides",
]
