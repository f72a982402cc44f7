"""Read and write llama.cpp GGUF files: llama (SmolLM2, Llama 2/3, Mistral), qwen2, gemma3 and gpt2.

A GGUF file is metadata (key → value: the architecture's hyper-parameters, the tokenizer, the chat
template) plus named tensors, each stored as plain floats or in one of ggml's block formats. gguf_file.py
parses the file (GGUFReader's results, in a fraction of its time); the `gguf` package (the llama.cpp
project's own) dequantizes every block format and writes files; this module adds what is specific to us,
once per architecture (`ARCHS`):

- `keys`: GGUF metadata key → ModelConfig field, read on import and written on export;
- `fixed`: the ModelConfig values the architecture implies (RoPE, RMSNorm, SwiGLU, Gemma's norms ...);
- `rules`: the conversion table, our parameter ← GGUF tensors (several GGUF tensors concatenate along
  the output rows into one of ours: q/k/v → c_attn, gate/up → c_fc), read by import, export and tests;
- the converter's own transforms, undone on import and redone on export: llama.cpp's convert_hf_to_gguf
  interleaves the two rotary halves of every q/k head for `llama` (not for qwen2 or gemma3), and adds 1
  to Gemma's norm weights (the file holds 1 + w; we hold w and scale by norm_offset + w, as HF does).

GGUF rows are our rows: a tensor of ggml shape [ne0, ne1] is (ne1, ne0) = (out, in), nn.Linear's layout.
`keep_quantized`: a linear layer stored as Q4_0 or Q4_1 (all of its GGUF tensors alike) becomes our int4
layout with groups of 32 (scale = d, min = m, or -8·d for Q4_0: the same fp32 weights, exactly), and Q8_0
becomes int8g (transforms/quantize.py), the token table included; every other tensor is dequantized.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, quants
from gguf.constants import GGML_QUANT_SIZES, GGML_QUANT_VERSION
from torch import Tensor, nn

from gptstack.config import ConfigError, ModelConfig
from gptstack.interop.gguf_file import GGUFError, GGUFTensor, read_gguf_file
from gptstack.interop.hf import Rule, _gate_up, _qkv
from gptstack.model import GPT
from gptstack.tokenizer import tokenizer_from_gguf, tokenizer_to_gguf
from gptstack.transforms.quantize import quantized_structure

Q = GGMLQuantizationType
DEQUANTIZED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
KEPT = {Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q8_0: "int8g"}  # block formats our kernels hold exactly
BLOCK = 32  # weights per block of Q4_0, Q4_1 and Q8_0: our group size for them
EXPORT_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
}  # fmt: skip
# config fields that change no computation at inference, so a file need not carry them
NOT_IN_FILE = ("dropout", "moe_aux_loss_coef", "moe_z_loss_coef", "n_expert_active")


# --- the architectures: metadata keys, implied config, conversion tables ------------------------------


def llama_rules(c: ModelConfig) -> list[Rule]:
    """llama, qwen2 (q/k/v biases) and the shared part of gemma3."""
    h, b = "transformer.h.{i}.", "blk.{i}."
    qkv = tuple(b + f"attn_{p}" for p in "qkv")
    rules = [
        Rule("transformer.wte.weight", ("token_embd.weight",)),
        Rule(h + "ln_1.weight", (b + "attn_norm.weight",)),
        Rule(h + "attn.c_attn.weight", tuple(t + ".weight" for t in qkv), split=_qkv),
        Rule(h + "attn.c_proj.weight", (b + "attn_output.weight",)),
        Rule(h + "ln_2.weight", (b + "ffn_norm.weight",)),
        Rule(h + "mlp.c_fc.weight", (b + "ffn_gate.weight", b + "ffn_up.weight"), split=_gate_up),
        Rule(h + "mlp.c_proj.weight", (b + "ffn_down.weight",)),
        Rule("transformer.ln_f.weight", ("output_norm.weight",)),
    ]
    if c.qkv_bias:
        rules.append(Rule(h + "attn.c_attn.bias", tuple(t + ".bias" for t in qkv), split=_qkv))
    if c.bias:
        rules += [
            Rule(h + "attn.c_proj.bias", (b + "attn_output.bias",)),
            Rule(h + "mlp.c_fc.bias", (b + "ffn_gate.bias", b + "ffn_up.bias"), split=_gate_up),
            Rule(h + "mlp.c_proj.bias", (b + "ffn_down.bias",)),
        ]
    return rules


def gemma3_rules(c: ModelConfig) -> list[Rule]:
    h, b = "transformer.h.{i}.", "blk.{i}."
    return [
        *llama_rules(c),
        Rule(h + "attn.q_norm.weight", (b + "attn_q_norm.weight",)),
        Rule(h + "attn.k_norm.weight", (b + "attn_k_norm.weight",)),
        Rule(h + "ln_attn_out.weight", (b + "post_attention_norm.weight",)),
        Rule(h + "ln_mlp_out.weight", (b + "post_ffw_norm.weight",)),
    ]


def gpt2_rules(c: ModelConfig) -> list[Rule]:
    h, b = "transformer.h.{i}.", "blk.{i}."
    pairs = [("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
             ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")]  # fmt: skip
    rules = [
        Rule("transformer.wte.weight", ("token_embd.weight",)),
        Rule("transformer.wpe.weight", ("position_embd.weight",)),
    ]
    rules += [Rule(h + f"{ours}.{p}", (b + f"{theirs}.{p}",)) for ours, theirs in pairs for p in ("weight", "bias")]
    return rules + [Rule(f"transformer.ln_f.{p}", (f"output_norm.{p}",)) for p in ("weight", "bias")]


ROPE_KEYS = {
    "context_length": "block_size", "embedding_length": "n_embd", "block_count": "n_layer",
    "feed_forward_length": "d_ff", "attention.head_count": "n_head", "attention.head_count_kv": "n_kv_head",
    "attention.key_length": "head_dim", "attention.layer_norm_rms_epsilon": "norm_eps", "rope.freq_base": "rope_theta",
}  # fmt: skip
GPT2_KEYS = {
    "context_length": "block_size", "embedding_length": "n_embd", "block_count": "n_layer",
    "feed_forward_length": "d_ff", "attention.head_count": "n_head", "attention.layer_norm_epsilon": "norm_eps",
}  # fmt: skip
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
# llama.cpp's gemma3 graph: 5 sliding-window layers per global one, local RoPE base 10k, QK-norm, sandwich
# norms, (1 + w) norms, GeGLU, embeddings × √d; none of these are keys of the file
GEMMA3 = dict(
    pos="rope", norm="rmsnorm", mlp="geglu", bias=False, norm_offset=1.0, qk_norm=True, sandwich_norm=True,
    rope_local_theta=1e4, attn_pattern="local,local,local,local,local,dense",
)  # fmt: skip


def _gemma3(values: dict[str, Any]) -> dict[str, Any]:
    """Values llama.cpp derives: √n_embd; Gemma 3 27B (62 layers) scales attention by (n_embd/n_head)^-½
    (its query_pre_attn_scalar), the smaller ones by head_dim^-½ (our default)."""
    out = {"embed_scale": math.sqrt(values["n_embd"])}
    if values["n_layer"] == 62:
        out["attn_scale"] = (values["n_embd"] / values["n_head"]) ** -0.5
    return out


@dataclass(frozen=True)
class Arch:
    keys: dict[str, str]  # "<arch>.<key>" suffix → ModelConfig field
    fixed: dict[str, Any]  # the ModelConfig values the architecture implies
    rules: Callable[[ModelConfig], list[Rule]]  # ours ← GGUF tensors, {i} = layer
    permute_qk: bool = False  # the converter interleaved each q/k head's rotary halves
    norm_shift: float = 0.0  # the converter added this to every norm weight
    derive: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda values: {})


ARCHS = {
    "llama": Arch(ROPE_KEYS, LLAMA, llama_rules, permute_qk=True),
    "qwen2": Arch(ROPE_KEYS, LLAMA, llama_rules),
    "gemma3": Arch({**ROPE_KEYS, "attention.sliding_window": "attn_window"}, GEMMA3, gemma3_rules, norm_shift=1.0,
                   derive=_gemma3),
    "gpt2": Arch(GPT2_KEYS, dict(pos="learned", norm="layernorm", mlp="gelu", bias=True), gpt2_rules),
}  # fmt: skip


def expand(c: ModelConfig, arch: Arch) -> list[Rule]:
    """The architecture's table over every layer, plus the untied output head."""
    out = []
    for r in arch.rules(c):
        layers = range(c.n_layer) if "{i}" in r.ours else [None]
        out += [Rule(r.ours.format(i=i), tuple(t.format(i=i) for t in r.theirs), split=r.split) for i in layers]
    if not c.tie_embeddings:
        out.append(Rule("lm_head.weight", ("output.weight",)))
    return out


# --- reading --------------------------------------------------------------------------------------------


def open_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(metadata, tensors by name) of a GGUF file; any unreadable file is a GGUFError."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file (a GGUF model is one file)")
    return read_gguf_file(path)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file as a plain Python value (str, int, float, bool or a list)."""
    return open_gguf(path)[0]


def gguf_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str = "") -> ModelConfig:
    """The ModelConfig a GGUF file describes, from its metadata and its tensors' shapes (rows, cols)."""
    name = meta.get("general.architecture")
    if name not in ARCHS:
        raise GGUFError(f"{where}: architecture {name!r} is not supported (supported: {', '.join(ARCHS)})")
    arch = ARCHS[name]
    if meta.get(f"{name}.expert_count"):
        raise GGUFError(f"{where}: mixture-of-experts {name} files are not supported")
    if "token_embd.weight" not in shapes:
        raise GGUFError(f"{where}: no token_embd.weight tensor")
    values = {ours: _plain(meta[f"{name}.{key}"]) for key, ours in arch.keys.items() if f"{name}.{key}" in meta}
    values.update(
        vocab_size=shapes["token_embd.weight"][0],
        tie_embeddings="output.weight" not in shapes,
        **_rope_scaling(meta, name, where),
    )
    if arch.fixed["pos"] == "rope":
        values.update(qkv_bias="blk.0.attn_q.bias" in shapes, bias="blk.0.attn_output.bias" in shapes)
    pattern = meta.get(f"{name}.attention.sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1 and name == "gemma3":
        values["attn_pattern"] = ",".join(["local"] * (pattern - 1) + ["dense"])
    try:
        cfg = ModelConfig(**{**arch.fixed, **values, **arch.derive({**arch.fixed, **values})})
    except (ConfigError, KeyError, TypeError) as e:
        raise GGUFError(f"{where}: metadata does not describe a valid {name} model ({e})") from None
    rot = meta.get(f"{name}.rope.dimension_count")
    if rot is not None and cfg.pos == "rope" and rot != cfg.head_dim:
        raise GGUFError(f"{where}: RoPE over {rot} of {cfg.head_dim} head dimensions is not supported")
    return cfg


def _plain(value: Any) -> Any:
    """A float32 field as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06): the value
    its author wrote, which export writes back as the same float32."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _rope_scaling(meta: dict[str, Any], name: str, where: str) -> dict[str, float]:
    kind, factor = meta.get(f"{name}.rope.scaling.type", "none"), meta.get(f"{name}.rope.scaling.factor")
    if kind == "linear":
        if not isinstance(factor, (int, float)):
            raise GGUFError(f"{where}: linear RoPE scaling without a numeric {name}.rope.scaling.factor")
        return {"rope_scaling": _plain(float(factor))}
    if kind != "none":
        raise GGUFError(f"{where}: RoPE scaling {kind!r} is not supported (none or linear)")
    return {}


def _shape(t: GGUFTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml [ne0, ne1] → (ne1, ne0)


def _rows(t: GGUFTensor, arch: Arch, c: ModelConfig) -> np.ndarray:
    """The tensor's stored rows (raw blocks or floats) in our order: llama's q/k heads un-interleaved."""
    data = np.asarray(t.data)  # a plain view of the memory map: slicing a np.memmap costs per call
    if arch.permute_qk and (".attn_q." in t.name or ".attn_k." in t.name):
        heads = c.n_head if ".attn_q." in t.name else c.n_kv_head
        data = data[qk_order(data.shape[0], heads)]
    return data


def qk_order(rows: int, heads: int) -> np.ndarray:
    """Row i of ours is row order[i] of llama.cpp's: each head's rows stored as (head_dim/2, 2) pairs,
    ours (and HF's) as (2, head_dim/2) halves."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1).argsort()


def dequantize(t: GGUFTensor, arch: Arch, c: ModelConfig) -> Tensor:
    """fp32 (rows, cols) of a tensor of any supported block format, exactly as gguf.quants computes it."""
    a = quants.dequantize(_rows(t, arch, c), t.tensor_type).reshape(_shape(t))
    if arch.norm_shift and t.name.endswith("norm.weight"):
        a = a - np.float32(arch.norm_shift)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def block_codes(t: GGUFTensor, arch: Arch, c: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A Q4_0/Q4_1/Q8_0 tensor's (codes (rows, cols), scales (rows, cols/32), mins (rows, cols/32) or
    None), with w = code·scale + min (Q4_0: min = -8·d; Q8_0: signed codes and no min)."""
    rows = _rows(t, arch, c)
    blocks = np.ascontiguousarray(rows).reshape(rows.shape[0], -1, GGML_QUANT_SIZES[t.tensor_type][1])
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)  # (rows, nb)
    if t.tensor_type == Q.Q8_0:  # [d f16][32 × int8]
        return np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows.shape[0], -1), d, None
    if t.tensor_type == Q.Q4_1:  # [d f16][m f16][16 bytes: weight j in the low nibble, j + 16 in the high]
        m, qs = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32), blocks[..., 4:]
    else:  # Q4_0: [d f16][16 bytes]; w = d·(code - 8) = code·d + (-8·d), exact in fp32 (d has 11 bits)
        m, qs = np.float32(-8) * d, blocks[..., 2:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows.shape[0], -1)  # (rows, cols)
    return codes, d, m


def kept_tensors(module: str, sources: list[GGUFTensor], arch: Arch, c: ModelConfig) -> dict[str, Tensor]:
    """The buffers of QuantizedLinear/QuantizedEmbedding `module` built from the sources' codes, which
    concatenate along the rows (q/k/v, gate/up) as their floats would."""
    codes, scales, mins = zip(*(block_codes(t, arch, c) for t in sources), strict=True)
    codes, scales = np.concatenate(codes), np.concatenate(scales)
    if mins[0] is None:  # int8g: qweight (out, in) int8, scales (out, in/32)
        return {f"{module}.qweight": torch.from_numpy(codes), f"{module}.scales": torch.from_numpy(scales)}
    by_input = codes.T  # (in, out); two consecutive inputs share a byte, as kernels.py packs them
    packed = by_input[0::2] | (by_input[1::2] << 4)
    return {
        f"{module}.qweight": torch.from_numpy(np.ascontiguousarray(packed)),
        f"{module}.scales": torch.from_numpy(np.ascontiguousarray(scales.T)),
        f"{module}.mins": torch.from_numpy(np.ascontiguousarray(np.concatenate(mins).T)),
    }


def _keepable(model: GPT, rule: Rule, sources: list[GGUFTensor]) -> str | None:
    """The layout that holds these sources' codes exactly, or None (then they are dequantized)."""
    kinds = {KEPT.get(t.tensor_type) for t in sources}
    module = rule.ours.removesuffix(".weight")
    if len(kinds) != 1 or None in kinds or not rule.ours.endswith(".weight"):
        return None
    layer = model.get_submodule(module)
    kind = kinds.pop()
    if isinstance(layer, nn.Embedding):
        return kind if kind == "int8g" and module == "transformer.wte" else None
    return kind if isinstance(layer, nn.Linear) else None


def gguf_model(
    meta: dict[str, Any], tensors: dict[str, GGUFTensor], keep_quantized: bool = False, where: str = ""
) -> GPT:
    """Our GPT (fp32 where not kept, eval mode, on CPU, no tokenizer) holding a parsed GGUF file's weights."""
    tensors = _untie(tensors)
    cfg = gguf_config(meta, {n: _shape(t) for n, t in tensors.items()}, where)
    arch = ARCHS[meta["general.architecture"]]
    with torch.device("meta"):
        model = GPT(cfg)
    state, kept, used = {}, {}, set()
    for r in expand(cfg, arch):
        missing = [t for t in r.theirs if t not in tensors]
        if missing:
            raise GGUFError(f"{where}: no tensor {missing[0]} (needed for {r.ours})")
        sources = [tensors[t] for t in r.theirs]
        used.update(r.theirs)
        for t in sources:
            if t.tensor_type not in DEQUANTIZED:
                raise GGUFError(f"{where}: tensor {t.name} has block type {t.tensor_type.name}, which is not "
                                f"supported ({', '.join(q.name for q in DEQUANTIZED)})")  # fmt: skip
        layout = _keepable(model, r, sources) if keep_quantized else None
        try:
            if layout:
                module = r.ours.removesuffix(".weight")
                state.update(kept_tensors(module, sources, arch, cfg))
                kept[module] = {"method": layout, "group_size": BLOCK}
            else:
                parts = [dequantize(t, arch, cfg) for t in sources]
                state[r.ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
        except (ValueError, RuntimeError) as e:  # shapes the config does not fit (reshape, cat)
            raise GGUFError(f"{where}: tensor {r.theirs[0]} does not fit {r.ours} ({str(e)[:200]})") from None
    extra = sorted(set(tensors) - used)
    if extra:
        raise GGUFError(f"{where}: tensor {extra[0]} has no counterpart in gptstack's {meta['general.architecture']}")
    if kept:
        with torch.device("meta"):
            quantized_structure(model, {"modules": kept})
    _check_state(model, state, where)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.init_buffers()
    return model.eval()


def _untie(tensors: dict[str, GGUFTensor]) -> dict[str, GGUFTensor]:
    """Drop output.weight when it is a byte-for-byte copy of token_embd.weight (llama.cpp's GPT-2
    converter writes the tied head twice): the model is then tied."""
    out, emb = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if out is None or emb is None or out.tensor_type != emb.tensor_type or out.data.shape != emb.data.shape:
        return tensors
    if not np.array_equal(out.data, emb.data):
        return tensors
    return {n: t for n, t in tensors.items() if n != "output.weight"}


def _check_state(model: GPT, state: dict[str, Tensor], where: str) -> None:
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for name, ref in expected.items():
        if name not in state:
            raise GGUFError(f"{where}: nothing fills {name}")
        if tuple(state[name].shape) != tuple(ref.shape):
            raise GGUFError(
                f"{where}: {name} has shape {tuple(state[name].shape)}, the config implies {tuple(ref.shape)}"
            )


def load_gguf(
    path: str | Path,
    device: str | torch.device = "cpu",
    keep_quantized: bool = False,
    check: Callable[[ModelConfig], object] | None = None,
) -> GPT:
    """A GGUF file's model in eval mode on `device`, with `.tokenizer` (and its chat template) from the file.
    `keep_quantized`: hold Q4_0/Q4_1/Q8_0 tensors as codes instead of fp32 (see the module docstring).
    `check(config)` runs before anything is allocated (checkpoint.load_model passes its memory check)."""
    meta, tensors = open_gguf(path)
    if check is not None:
        check(gguf_config(meta, {n: _shape(t) for n, t in _untie(tensors).items()}, str(path)))
    model = gguf_model(meta, tensors, keep_quantized, where=str(path))
    model.tokenizer = tokenizer_from_gguf(meta, origin=str(path))
    return model.to(device)


# --- writing --------------------------------------------------------------------------------------------


def write_gguf(model: GPT, tokenizer: Any, path: str | Path, type: str = "f16", arch: str | None = None) -> Path:
    """Write a llama- or gpt2-family model as a GGUF file llama.cpp loads: 2-D weights in `type`
    (f32, f16, q8_0, q4_0; rows not a multiple of 32 fall back to f16 as llama.cpp's converter does),
    norms and biases in f32, tokenizer metadata from `tokenizer`. Written beside `path` and renamed.
    `arch`: the file's architecture (default: gpt2 for learned positions, qwen2 for q/k/v biases alone,
    else llama); whatever it cannot describe is refused."""
    path = Path(path)
    if type not in EXPORT_TYPES:
        raise GGUFError(f"{path}: unknown type {type!r} (choose from {', '.join(EXPORT_TYPES)})")
    if getattr(model, "quantization", None):
        raise GGUFError(f"{path}: the model is quantized; export a floating-point checkpoint")
    if tokenizer is None:
        raise GGUFError(f"{path}: a GGUF file needs the model's tokenizer, and the checkpoint names none")
    if path.is_dir() or (path.exists() and not _is_gguf(path)):
        raise GGUFError(f"{path} exists and is not a GGUF file; refusing to write over it")
    cfg = model.config
    name = arch or ("gpt2" if cfg.pos == "learned" else "qwen2" if cfg.qkv_bias and not cfg.bias else "llama")
    if name not in ARCHS:
        raise GGUFError(f"{path}: architecture {name!r} is not one gptstack writes ({', '.join(ARCHS)})")
    if name != "gpt2" and cfg.bias:
        raise GGUFError(f"{path}: llama-family GGUF files have no MLP or output-projection biases")
    tensors = file_tensors(model, ARCHS[name])
    try:
        vocab = _vocab(tokenizer_to_gguf(tokenizer), cfg.vocab_size)
    except ValueError as e:  # TokenizerError: a vocabulary GGUF cannot describe yet
        raise GGUFError(f"{path}: {e}") from None
    meta = {**arch_metadata(cfg, name), **vocab}
    empty = [k for k, v in meta.items() if isinstance(v, (list, tuple)) and not v]
    if empty:  # e.g. a byte-level vocabulary without merges: llama.cpp needs the key, the writer stores no []
        raise GGUFError(f"{path}: metadata {empty[0]} would be an empty list, which a GGUF file cannot hold")
    _check_representable(cfg, meta, {n: a.shape for n, a in tensors.items()}, path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write(tmp, name, meta, tensors, type)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def file_tensors(model: GPT, arch: Arch) -> dict[str, np.ndarray]:
    """GGUF tensor name → fp32 array (rows, cols), in the file's conventions (q/k interleaved, norm shift)."""
    cfg, ours = model.config, model.state_dict()
    out = {}
    for r in expand(cfg, arch):
        t = ours[r.ours].detach().float().cpu()
        for name, part in zip(r.theirs, t.split(r.split(cfg)) if r.split else (t,), strict=True):
            a = part.numpy()
            if arch.permute_qk and (".attn_q." in name or ".attn_k." in name):
                a = a[np.argsort(qk_order(a.shape[0], cfg.n_head if ".attn_q." in name else cfg.n_kv_head))]
            if arch.norm_shift and name.endswith("norm.weight"):
                a = a + np.float32(arch.norm_shift)
            out[name] = np.ascontiguousarray(a)
    return out


def arch_metadata(c: ModelConfig, name: str) -> dict[str, Any]:
    """The architecture keys of a GGUF file describing `c` (the ARCHS table read backwards)."""
    meta: dict[str, Any] = {"general.architecture": name, "general.name": f"gptstack {name}"}
    for key, ours in ARCHS[name].keys.items():
        if key == "attention.key_length" and c.head_dim == c.n_embd // c.n_head:
            continue  # llama.cpp derives it; its converter writes it only when it differs
        meta[f"{name}.{key}"] = getattr(c, ours)
    meta[f"{name}.vocab_size"] = c.vocab_size
    if c.pos == "rope":
        meta[f"{name}.rope.dimension_count"] = c.head_dim
    if c.rope_scaling != 1.0:
        meta[f"{name}.rope.scaling.type"] = "linear"
        meta[f"{name}.rope.scaling.factor"] = c.rope_scaling
    return meta


def _vocab(meta: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Tokenizer metadata padded to the model's vocabulary (llama.cpp wants one token per embedding row):
    unused ids become `[PADi]` of type UNUSED (5), as llama.cpp's converter pads."""
    tokens = list(meta.get("tokenizer.ggml.tokens", []))
    pad = vocab_size - len(tokens)
    if pad < 0:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, more than the model's {vocab_size} embeddings")
    if pad == 0:
        return meta
    meta = dict(meta)
    meta["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    if "tokenizer.ggml.token_type" in meta:
        meta["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"]) + [5] * pad
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] = list(meta["tokenizer.ggml.scores"]) + [-1e4] * pad
    return meta


def _check_representable(c: ModelConfig, meta: dict[str, Any], shapes: dict[str, tuple], path: Path) -> None:
    """Read the file we are about to write back into a config: any field that comes back different is
    something the format cannot say (a banded layer, QK-norm in a llama file, ...), so refuse."""
    try:
        back = gguf_config(meta, shapes, str(path))
    except GGUFError as e:
        raise GGUFError(f"{path}: this model cannot be written as GGUF ({str(e).split(': ', 1)[-1]})") from None
    ours, theirs = c.to_dict(), back.to_dict()
    if not any(k != "dense" for k in c.attn_kinds):
        ours.pop("attn_window"), theirs.pop("attn_window")
    diff = [k for k in ours if k not in NOT_IN_FILE and ours[k] != theirs.get(k)]
    if diff:
        raise GGUFError(
            f"{path}: {diff[0]}={ours[diff[0]]!r} cannot be written in a GGUF {meta['general.architecture']} file "
            f"(it would read back as {theirs[diff[0]]!r})"
        )


def _write(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, np.ndarray], type: str) -> None:
    writer = GGUFWriter(path, arch)
    for key, value in meta.items():
        if key != "general.architecture":  # the writer adds it
            _add_value(writer, key, value)
    writer.add_file_type(FILE_TYPES[type])
    if EXPORT_TYPES[type] not in (Q.F32, Q.F16):
        writer.add_quantization_version(GGML_QUANT_VERSION)
    for name, a in tensors.items():
        qtype = Q.F32 if a.ndim == 1 else EXPORT_TYPES[type]
        if qtype in KEPT and a.shape[-1] % BLOCK:
            qtype = Q.F16
        writer.add_tensor(name, quants.quantize(a, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    """Plain values as llama.cpp reads them: ints uint32 (ids and sizes), floats float32; lists take their
    first element's type (strings, int32 token types, float32 scores)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int) and 0 <= value < 2**32:
        writer.add_uint32(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise GGUFError(f"metadata {key} has a value of type {type(value).__name__}, which GGUF cannot hold")
