"""Import and export `transformers` checkpoints: GPT-2, Llama, Mixtral, Qwen2 and Gemma 3 (text) families.

One conversion table per family maps our parameter names to theirs; import, export and the parity
tests all read it. A rule is (ours, theirs…, transpose): several HF tensors concatenate along dim 0
into one of ours (q/k/v → c_attn; gate/up → c_fc) and split back on export; GPT-2's Conv1D
weights are stored (in, out) and are transposed. Llama, Mixtral, Qwen2 and Gemma 3 share one decoder
table whose rows follow the config (biases, QK-norm, sandwich norms).

Configs go through two tables per family: FIELDS (our field → their attribute, one to one) and FIXED
(what the family fixes about a ModelConfig, e.g. Gemma 3's (1+w) norms and GeGLU); both directions
read them. What is neither (RoPE dicts, layer types, activations, the softmax scale) is converted
beside them, and what a family cannot represent (other RoPE types, logit soft-capping, ...) is an
InteropError that names it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gptstack.config import ModelConfig
from gptstack.model import GPT


class InteropError(ValueError):
    """A model that cannot be converted between gptstack and transformers, and why."""


@dataclass(frozen=True)
class Rule:
    ours: str  # may contain {i}, the layer index
    theirs: tuple[str, ...]
    transpose: bool = False
    split: Callable[[ModelConfig], list[int]] | None = None  # sizes along dim 0 when theirs has >1 names


def _qkv(c: ModelConfig) -> list[int]:
    return [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]


def _gate_up(c: ModelConfig) -> list[int]:
    return [c.d_ff, c.d_ff]


def gpt2_rules(c: ModelConfig) -> list[Rule]:
    h = "transformer.h.{i}."
    rules = [
        Rule("transformer.wte.weight", ("transformer.wte.weight",)),
        Rule("transformer.wpe.weight", ("transformer.wpe.weight",)),
    ]
    for name in ("ln_1", "ln_2"):
        rules += [Rule(h + f"{name}.{p}", (h + f"{name}.{p}",)) for p in ("weight", "bias")]
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        rules += [
            Rule(h + f"{name}.weight", (h + f"{name}.weight",), transpose=True),
            Rule(h + f"{name}.bias", (h + f"{name}.bias",)),
        ]
    rules += [Rule(f"transformer.ln_f.{p}", (f"transformer.ln_f.{p}",)) for p in ("weight", "bias")]
    return rules


def decoder_rules(c: ModelConfig) -> list[Rule]:
    """Llama, Mixtral, Qwen2 and Gemma 3: `model.layers.{i}` decoders, rows chosen by the config."""
    h, m = "transformer.h.{i}.", "model.layers.{i}."
    attn = [m + f"self_attn.{p}_proj" for p in "qkv"]
    # Gemma's post_attention_layernorm norms the attention output; Llama's is the pre-MLP norm
    pre_mlp = "pre_feedforward_layernorm" if c.sandwich_norm else "post_attention_layernorm"
    rules = [
        Rule("transformer.wte.weight", ("model.embed_tokens.weight",)),
        Rule(h + "ln_1.weight", (m + "input_layernorm.weight",)),
        Rule(h + "attn.c_attn.weight", tuple(a + ".weight" for a in attn), split=_qkv),
        Rule(h + "attn.c_proj.weight", (m + "self_attn.o_proj.weight",)),
        Rule(h + "ln_2.weight", (m + pre_mlp + ".weight",)),
        Rule("transformer.ln_f.weight", ("model.norm.weight",)),
    ]
    if c.qkv_bias:  # Qwen2's q/k/v biases, or Llama's attention_bias
        rules.append(Rule(h + "attn.c_attn.bias", tuple(a + ".bias" for a in attn), split=_qkv))
    if c.bias:  # Llama's attention_bias / mlp_bias options
        rules.append(Rule(h + "attn.c_proj.bias", (m + "self_attn.o_proj.bias",)))
    if c.qk_norm:
        rules += [Rule(h + f"attn.{n}.weight", (m + f"self_attn.{n}.weight",)) for n in ("q_norm", "k_norm")]
    if c.sandwich_norm:
        rules += [
            Rule(h + "ln_attn_out.weight", (m + "post_attention_layernorm.weight",)),
            Rule(h + "ln_mlp_out.weight", (m + "post_feedforward_layernorm.weight",)),
        ]
    if c.n_expert:  # Mixtral: router + experts stacked as (E, 2F, D) and (E, D, F), as we store them
        rules += [
            Rule(h + "mlp.router.weight", (m + "mlp.gate.weight",)),
            Rule(h + "mlp.w_fc", (m + "mlp.experts.gate_up_proj",)),
            Rule(h + "mlp.w_proj", (m + "mlp.experts.down_proj",)),
        ]
        return rules
    mlp = (m + "mlp.gate_proj", m + "mlp.up_proj")
    rules += [
        Rule(h + "mlp.c_fc.weight", tuple(p + ".weight" for p in mlp), split=_gate_up),
        Rule(h + "mlp.c_proj.weight", (m + "mlp.down_proj.weight",)),
    ]
    if c.bias:
        rules += [
            Rule(h + "mlp.c_fc.bias", tuple(p + ".bias" for p in mlp), split=_gate_up),
            Rule(h + "mlp.c_proj.bias", (m + "mlp.down_proj.bias",)),
        ]
    return rules


def rules_for(c: ModelConfig, family: str) -> list[Rule]:
    """The family's table expanded over layers, plus the untied output head."""
    table = gpt2_rules(c) if family == "gpt2" else decoder_rules(c)
    out = []
    for r in table:
        if "{i}" in r.ours:
            out += [
                Rule(r.ours.format(i=i), tuple(t.format(i=i) for t in r.theirs), r.transpose, r.split)
                for i in range(c.n_layer)
            ]
        else:
            out.append(r)
    if not c.tie_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return out


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("HF interop needs transformers: pip install 'gptstack[hf]'") from None
    return transformers


# --- configs ---------------------------------------------------------------------------------

# Our ModelConfig field → the HF config attribute, per family. Both directions read these tables;
# what has no one-to-one field (activation, RoPE dict, layer types, biases, dropout) is handled beside them.
GPT2_FIELDS = {
    "vocab_size": "vocab_size", "block_size": "n_positions", "n_embd": "n_embd", "n_layer": "n_layer",
    "n_head": "n_head", "d_ff": "n_inner", "norm_eps": "layer_norm_epsilon", "tie_embeddings": "tie_word_embeddings",
}  # fmt: skip
LLAMA_FIELDS = {
    "vocab_size": "vocab_size", "block_size": "max_position_embeddings", "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
    "head_dim": "head_dim", "d_ff": "intermediate_size", "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}  # fmt: skip
MIXTRAL_FIELDS = {
    **LLAMA_FIELDS, "n_expert": "num_local_experts", "n_expert_active": "num_experts_per_tok",
    "moe_aux_loss_coef": "router_aux_loss_coef",
}  # fmt: skip
QWEN2_FIELDS = {k: v for k, v in LLAMA_FIELDS.items() if k != "head_dim"}  # Qwen2's head_dim is n_embd // n_head
FIELDS = {"gpt2": GPT2_FIELDS, "llama": LLAMA_FIELDS, "mixtral": MIXTRAL_FIELDS, "qwen2": QWEN2_FIELDS,
          "gemma3": LLAMA_FIELDS}  # fmt: skip
MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mixtral": "mixtral", "qwen2": "qwen2", "gemma3_text": "gemma3"}

# What each family fixes about a ModelConfig: import sets these, export requires them. Order matters
# where two fit: the first family without a misfit wins (Qwen2 before Llama: q/k/v biases alone are Qwen2).
_PLAIN = dict(norm_offset=0.0, qk_norm=False, sandwich_norm=False, embed_scale=1.0, attn_scale=None,
              rope_local_theta=None)  # fmt: skip
_DECODER = dict(_PLAIN, pos="rope", norm="rmsnorm", mlp="swiglu")
FIXED = {
    "gpt2": dict(_PLAIN, pos="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=True),
    "qwen2": dict(_DECODER, bias=False, qkv_bias=True),
    "llama": _DECODER,  # attention_bias and mlp_bias: bias == qkv_bias, either way
    "mixtral": dict(_DECODER, bias=False, qkv_bias=False),
    "gemma3": dict(pos="rope", norm="rmsnorm", mlp="geglu", norm_offset=1.0, qk_norm=True, sandwich_norm=True,
                   bias=False, qkv_bias=False),
}  # fmt: skip
LAYER_TYPES = {"full_attention": "dense", "sliding_attention": "local"}  # HF layer_types → our attn kinds


def family_of(c: ModelConfig) -> str:
    """The HF family that represents `c` exactly, or an InteropError saying what does not fit."""
    if not c.prenorm:
        raise InteropError("post-LN (GPT-1) blocks have no HF family equivalent")
    misfits = {
        family: [k for k, v in fixed.items() if getattr(c, k) != v]
        for family, fixed in FIXED.items()
        if (family == "mixtral") == bool(c.n_expert)
    }
    family = min(misfits, key=lambda f: len(misfits[f]))  # the nearest; the first on ties
    if misfits[family]:
        need = ", ".join(f"{k}={FIXED[family][k]!r}" for k in misfits[family])
        raise InteropError(f"no HF family represents this model; the nearest, {family}, needs {need}")
    _check_family(c, family)
    return family


def _check_family(c: ModelConfig, family: str) -> None:
    """What a family needs beyond its FIXED values."""
    if "local" in c.attn_kinds and family not in ("qwen2", "gemma3"):
        raise InteropError(f"locally banded attention layers have no {family} equivalent (gemma3 and qwen2 have them)")
    if family == "gpt2" and (c.n_kv_head != c.n_head or c.head_dim * c.n_head != c.n_embd):
        raise InteropError("GPT-2 needs n_kv_head == n_head and head_dim·n_head == n_embd")
    if family == "llama" and c.qkv_bias != c.bias:
        raise InteropError("Llama's attention_bias covers q/k/v and the output projection: qkv_bias must equal bias")
    if family == "qwen2" and c.head_dim * c.n_head != c.n_embd:
        raise InteropError("Qwen2 needs head_dim·n_head == n_embd")
    if family == "gemma3" and not math.isclose(c.embed_scale, math.sqrt(c.n_embd), rel_tol=1e-7):
        raise InteropError(f"Gemma 3 scales embeddings by √n_embd = {math.sqrt(c.n_embd):.7g}, not {c.embed_scale}")
    if family == "gemma3" and c.attn_scale is not None and abs(c.attn_scale**-2 - round(c.attn_scale**-2)) > 1e-6:
        raise InteropError(f"Gemma 3's attention scale is an integer query_pre_attn_scalar^-½, not {c.attn_scale}")


def _rope_dict(theta: float, factor: float) -> dict:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "rope_theta": theta, "factor": factor}


def _rope_of(params: dict | None, where: str = "") -> tuple[float, float]:
    """(theta, linear factor) of one HF rope_parameters dict; other RoPE types are refused."""
    params = params or {"rope_type": "default", "rope_theta": 10000.0}
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise InteropError(f"RoPE type {kind!r}{where} is not supported (default or linear)")
    return float(params["rope_theta"]), float(params.get("factor", 1.0))


def _layers_of(h) -> dict:
    """HF layer_types (+ sliding_window) → attn_pattern, the shortest comma list cycling into them."""
    types = getattr(h, "layer_types", None) or ["full_attention"] * h.num_hidden_layers
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise InteropError(f"layer type {unknown[0]!r} is not supported (full_attention, sliding_attention)")
    kinds = [LAYER_TYPES[t] for t in types]
    period = next(p for p in range(1, len(kinds) + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds)))
    out = dict(attn_pattern=",".join(kinds[:period]))
    if "local" in kinds:
        if not getattr(h, "sliding_window", None):
            raise InteropError("sliding_attention layers without a sliding_window")
        out["attn_window"] = int(h.sliding_window)
    return out


def _layer_types(c: ModelConfig) -> list[str]:
    return ["sliding_attention" if kind == "local" else "full_attention" for kind in c.attn_kinds]


def _gemma3_from_hf(h) -> dict:
    """Gemma 3's fields beyond FIELDS and FIXED: two RoPE tables, the scales; soft-capping is refused."""
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(h, name, None) is not None:
            raise InteropError(f"Gemma {name}={getattr(h, name)} is not supported (Gemma 3 sets neither)")
    if getattr(h, "use_bidirectional_attention", False) or getattr(h, "attention_bias", False):
        raise InteropError("Gemma 3 with bidirectional attention or attention biases is not supported")
    if h.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new"):
        raise InteropError(f"Gemma activation {h.hidden_activation!r} is not supported (need tanh GELU)")
    theta, factor = _rope_of(h.rope_parameters["full_attention"], " on full-attention layers")
    local_theta, local_factor = _rope_of(h.rope_parameters["sliding_attention"], " on sliding layers")
    if local_factor != 1.0 and (local_theta, local_factor) != (theta, factor):
        raise InteropError("scaled RoPE on sliding-window layers is not supported unless it equals the global one")
    return dict(
        rope_theta=theta, rope_scaling=factor, rope_local_theta=local_theta if local_factor == 1.0 else None,
        attn_scale=float(h.query_pre_attn_scalar) ** -0.5, embed_scale=math.sqrt(h.hidden_size), **_layers_of(h),
    )  # fmt: skip


def _gemma3_to_hf(c: ModelConfig, mapped: dict):
    full = _rope_dict(c.rope_theta, c.rope_scaling)
    local = full if c.rope_local_theta is None else _rope_dict(c.rope_local_theta, 1.0)
    return _transformers().Gemma3TextConfig(
        **mapped, rope_parameters={"full_attention": full, "sliding_attention": local},
        layer_types=_layer_types(c), sliding_window=c.attn_window, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=round(c.attn_scale**-2) if c.attn_scale else c.head_dim, attention_bias=False,
        attention_dropout=c.dropout, final_logit_softcapping=None, attn_logit_softcapping=None,
    )  # fmt: skip


def to_hf_config(c: ModelConfig):
    transformers = _transformers()

    family = family_of(c)
    mapped = {theirs: getattr(c, ours) for ours, theirs in FIELDS[family].items()}
    if family == "gpt2":
        drop = dict(resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout)
        return transformers.GPT2Config(**mapped, **drop, activation_function="gelu_new")
    if family == "gemma3":
        return _gemma3_to_hf(c, mapped)
    extra = dict(rope_parameters=_rope_dict(c.rope_theta, c.rope_scaling), attention_dropout=c.dropout)
    if family == "mixtral":
        return transformers.MixtralConfig(**mapped, **extra, sliding_window=None)
    if family == "qwen2":
        local = "local" in c.attn_kinds
        window = dict(use_sliding_window=local, sliding_window=c.attn_window if local else None)
        return transformers.Qwen2Config(**mapped, **extra, **window, layer_types=_layer_types(c))
    return transformers.LlamaConfig(**mapped, **extra, attention_bias=c.bias, mlp_bias=c.bias)


def from_hf_config(h) -> ModelConfig:
    family = MODEL_TYPES.get(h.model_type)
    if family is None:
        hint = " (of Gemma 3 only the text model, gemma3_text, is)" if h.model_type == "gemma3" else ""
        raise InteropError(f"unsupported HF model_type {h.model_type!r}{hint} (supported: {', '.join(MODEL_TYPES)})")
    mapped = {ours: getattr(h, theirs, None) for ours, theirs in FIELDS[family].items()}
    mapped = {k: v for k, v in mapped.items() if v is not None}  # e.g. n_inner=None → our 4·n_embd default
    mapped.update(FIXED[family])
    if family == "gpt2":
        if h.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise InteropError(f"GPT-2 activation {h.activation_function!r} is not supported (need tanh GELU)")
        if getattr(h, "scale_attn_by_inverse_layer_idx", False) or not getattr(h, "scale_attn_weights", True):
            raise InteropError("GPT-2 attention scaling variants are not supported")
        return ModelConfig(**mapped)
    if family == "gemma3":
        return ModelConfig(**mapped, **_gemma3_from_hf(h))
    if getattr(h, "hidden_act", "silu") != "silu":
        raise InteropError(f"activation {h.hidden_act!r} is not supported (need silu for SwiGLU)")
    theta, factor = _rope_of(h.rope_parameters)
    mapped.update(rope_theta=theta, rope_scaling=factor)
    if family == "qwen2":
        return ModelConfig(**mapped, **_layers_of(h))
    if getattr(h, "sliding_window", None):
        raise InteropError(f"sliding-window attention {family} checkpoints are not supported")
    bias = bool(getattr(h, "attention_bias", False))
    if bias != bool(getattr(h, "mlp_bias", False)):
        raise InteropError("attention_bias and mlp_bias must agree")
    return ModelConfig(**mapped, bias=bias, qkv_bias=bias) if family == "llama" else ModelConfig(**mapped)


# --- weights ---------------------------------------------------------------------------------


def from_hf_model(hf_model: nn.Module) -> GPT:
    """Our GPT (fp32, eval mode) holding the weights of a transformers causal LM."""
    cfg = from_hf_config(hf_model.config)
    theirs = {k: v.detach().float() for k, v in hf_model.named_parameters()}  # tied weights appear once
    state = {}
    for r in rules_for(cfg, family_of(cfg)):
        missing = [t for t in r.theirs if t not in theirs]
        if missing:
            raise InteropError(f"HF checkpoint lacks {missing[0]} (needed for {r.ours})")
        tensor = torch.cat([theirs.pop(t) for t in r.theirs], dim=0)
        state[r.ours] = tensor.t() if r.transpose else tensor
    if theirs:
        raise InteropError(f"HF checkpoint has parameters we cannot map, e.g. {next(iter(theirs))}")
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.init_buffers()
    return model.eval()


def to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    cfg = model.config
    ours = model.state_dict()
    out = {}
    for r in rules_for(cfg, family_of(cfg)):
        tensor = ours[r.ours].t() if r.transpose else ours[r.ours]
        parts = tensor.split(r.split(cfg), dim=0) if r.split else (tensor,)
        out.update({name: part.contiguous().clone() for name, part in zip(r.theirs, parts, strict=True)})
    return out


def to_hf_model(model: GPT):
    """A transformers causal LM (fp32, eval mode) with our weights."""
    transformers = _transformers()

    hf = transformers.AutoModelForCausalLM.from_config(to_hf_config(model.config), dtype=torch.float32)
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    unfilled = [k for k in result.missing_keys if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if unfilled or result.unexpected_keys:
        raise InteropError(f"export left HF tensors unfilled {unfilled[:3]} / unexpected {result.unexpected_keys[:3]}")
    hf.tie_weights()
    return hf.eval()
