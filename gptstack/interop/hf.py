"""Import and export `transformers` checkpoints: GPT-2, Llama and Mixtral families.

One conversion table per family maps our parameter names to theirs; import, export and the parity
tests all read it. A rule is (ours, theirs…, transpose): several HF tensors concatenate along dim 0
into one of ours (q/k/v → c_attn; gate/up → c_fc) and split back on export; GPT-2's Conv1D
weights are stored (in, out) and are transposed.
"""

from __future__ import annotations

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


def llama_rules(c: ModelConfig) -> list[Rule]:
    h, m = "transformer.h.{i}.", "model.layers.{i}."
    attn = [m + f"self_attn.{p}_proj" for p in "qkv"]
    rules = [
        Rule("transformer.wte.weight", ("model.embed_tokens.weight",)),
        Rule(h + "ln_1.weight", (m + "input_layernorm.weight",)),
        Rule(h + "attn.c_attn.weight", tuple(a + ".weight" for a in attn), split=_qkv),
        Rule(h + "attn.c_proj.weight", (m + "self_attn.o_proj.weight",)),
        Rule(h + "ln_2.weight", (m + "post_attention_layernorm.weight",)),
        Rule("transformer.ln_f.weight", ("model.norm.weight",)),
    ]
    if c.bias:  # Llama's attention_bias / mlp_bias options
        rules += [
            Rule(h + "attn.c_attn.bias", tuple(a + ".bias" for a in attn), split=_qkv),
            Rule(h + "attn.c_proj.bias", (m + "self_attn.o_proj.bias",)),
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
    table = gpt2_rules(c) if family == "gpt2" else llama_rules(c)
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


def family_of(c: ModelConfig) -> str:
    """The HF family that represents `c` exactly, or an InteropError saying what does not fit."""
    if any(k != "dense" for k in c.attn_kinds):
        raise InteropError("locally banded attention layers have no GPT-2/Llama/Mixtral equivalent")
    if not c.prenorm:
        raise InteropError("post-LN (GPT-1) blocks have no GPT-2/Llama/Mixtral equivalent")
    if (c.pos, c.norm, c.mlp) == ("learned", "layernorm", "gelu") and not c.n_expert:
        if c.n_kv_head != c.n_head or c.head_dim * c.n_head != c.n_embd or not c.bias:
            raise InteropError("GPT-2 needs n_kv_head == n_head, head_dim·n_head == n_embd and biases")
        return "gpt2"
    if (c.pos, c.norm, c.mlp) == ("rope", "rmsnorm", "swiglu"):
        if c.n_expert and c.bias:
            raise InteropError("Mixtral has no linear-layer biases")
        return "mixtral" if c.n_expert else "llama"
    raise InteropError(f"no HF family for pos={c.pos}, norm={c.norm}, mlp={c.mlp}")


# Our ModelConfig field → the HF config attribute, per family. Both directions read these tables;
# what has no one-to-one field (activation, RoPE dict, biases, dropout) is handled beside them.
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
FIELDS = {"gpt2": GPT2_FIELDS, "llama": LLAMA_FIELDS, "mixtral": MIXTRAL_FIELDS}


def to_hf_config(c: ModelConfig):
    transformers = _transformers()

    family = family_of(c)
    mapped = {theirs: getattr(c, ours) for ours, theirs in FIELDS[family].items()}
    if family == "gpt2":
        drop = dict(resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout)
        return transformers.GPT2Config(**mapped, **drop, activation_function="gelu_new")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling != 1.0:
        rope = {"rope_type": "linear", "rope_theta": c.rope_theta, "factor": c.rope_scaling}
    extra = dict(rope_parameters=rope, attention_dropout=c.dropout)
    if family == "mixtral":
        return transformers.MixtralConfig(**mapped, **extra, sliding_window=None)
    return transformers.LlamaConfig(**mapped, **extra, attention_bias=c.bias, mlp_bias=c.bias)


def from_hf_config(h) -> ModelConfig:
    kind = h.model_type
    if kind not in FIELDS:
        raise InteropError(f"unsupported HF model_type {kind!r} (supported: {', '.join(FIELDS)})")
    mapped = {ours: getattr(h, theirs, None) for ours, theirs in FIELDS[kind].items()}
    mapped = {k: v for k, v in mapped.items() if v is not None}  # e.g. n_inner=None → our 4·n_embd default
    if kind == "gpt2":
        if h.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise InteropError(f"GPT-2 activation {h.activation_function!r} is not supported (need tanh GELU)")
        if getattr(h, "scale_attn_by_inverse_layer_idx", False) or not getattr(h, "scale_attn_weights", True):
            raise InteropError("GPT-2 attention scaling variants are not supported")
        return ModelConfig(**mapped)
    if getattr(h, "hidden_act", "silu") != "silu":
        raise InteropError(f"activation {h.hidden_act!r} is not supported (need silu for SwiGLU)")
    rope = h.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise InteropError(f"RoPE type {rope['rope_type']!r} is not supported (default or linear)")
    if getattr(h, "sliding_window", None):
        raise InteropError("sliding-window attention checkpoints are not supported")
    bias = bool(getattr(h, "attention_bias", False))
    if bias != bool(getattr(h, "mlp_bias", False)):
        raise InteropError("attention_bias and mlp_bias must agree")
    return ModelConfig(
        **mapped, mlp="swiglu", norm="rmsnorm", pos="rope", rope_theta=float(rope["rope_theta"]),
        rope_scaling=float(rope.get("factor", 1.0)), bias=bias,
    )  # fmt: skip


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
