"""Weight-only quantization of the linear layers: int8 per output channel, int4 in groups.

- int8: w ≈ q · s with q = round(w / s) ∈ [-127, 127] and one scale s = max|w_row| / 127 per output
  channel (row of the (out, in) weight).
- int4: along the input dimension, each group of `group_size` (32, 64 or 128) weights of an output
  channel gets a scale and a minimum: w ≈ code · scale + min with code = round((w - min) / scale) ∈
  [0, 15], scale = (max - min) / 15 (asymmetric, as GPTQ/AWQ's default "zero point" variants).

Activations stay in floating point (weight-only). `quantize(model, "int8" | "int4", group_size)`
swaps every nn.Linear for a QuantizedLinear. The output head is quantized too, untied from the
embedding (which stays in floating point for lookups); under int4 it takes int8, as llama.cpp's
4-bit mixes keep their output tensor at higher precision: the head holds a third of a small
model's weights and its errors reach every logit directly. Then `save_checkpoint` then writes the codes, scales and
minimums, and `load_model` rebuilds the quantized structure from config.json's "quantization"
entry. A single row on CPU runs through the C kernels of transforms/kernels.py, which dequantize in
registers, and so do up to `kernels.SMALL_M` rows (a decode batch) through the tiled kernels; prefill
dequantizes the weight and uses F.linear.

A third layout, `int8g` (int8 codes with one scale per group of inputs, GGUF's Q8_0), is never chosen by
`quantize`: it holds codes loaded from a file as they were stored (interop/gguf.py, `--keep-quantized`),
and so does a `QuantizedEmbedding` (a Q8_0 token table: a lookup dequantizes only the rows it reads,
and a tied `TiedHead` multiplies by the same codes). Such a model's spec lists its modules one by one:
{"modules": {"transformer.h.0.attn.c_attn": {"method": "int4", "group_size": 32}, "transformer.wte":
{"method": "int8g", "group_size": 32}, ...}}; modules it does not name stay in floating point.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptstack.model import GPT
from gptstack.transforms import kernels
from gptstack.transforms.decode import replace_linears

METHODS = ("int8", "int4")  # what quantize() applies
LAYOUTS = (*METHODS, "int8g")  # what a QuantizedLinear holds; int8g only as loaded from a file
GROUP_SIZES = (32, 64, 128)
# int4 weights per scale and minimum: the one default of every entry point. 32, by measurement on real models
# (benchmarks/bench_quant_real.py, docs/BENCHMARKS.md): groups of 64 raised SmolLM2-135M's perplexity by ~28%
GROUP_SIZE = 32


class QuantizedLinear(nn.Module):
    """A frozen linear layer holding int8 or int4 codes. Buffers (saved in the state dict):
    int8: qweight (out, in) int8, scales (out,); int4: qweight (in/2, out) uint8 (two codes per
    byte, see kernels.py), scales and mins (in/group, out); int8g: qweight (out, in) int8, scales
    (out, in/group)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, method: str, group_size: int = GROUP_SIZE):
        super().__init__()
        if method not in LAYOUTS:
            raise ValueError(f"unknown quantization {method!r}; choose from {', '.join(LAYOUTS)}")
        if method != "int8" and (group_size not in GROUP_SIZES or in_features % group_size):
            raise ValueError(f"{method} group size must be one of {GROUP_SIZES} and divide {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        if method == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.zeros(out_features))
        elif method == "int8g":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.zeros(out_features, in_features // group_size))
        else:
            G = in_features // group_size
            self.register_buffer("qweight", torch.zeros(in_features // 2, out_features, dtype=torch.uint8))
            self.register_buffer("scales", torch.zeros(G, out_features))
            self.register_buffer("mins", torch.zeros(G, out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, method: str, group_size: int = GROUP_SIZE) -> QuantizedLinear:
        w = linear.weight.detach().float()  # (out, in)
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, method, group_size)
        q.to(w.device)
        if method == "int8":
            scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,)
            q.qweight.copy_((w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
            q.scales.copy_(scales)
        else:
            wg = w.t().reshape(-1, group_size, w.size(0))  # (G, group, out)
            lo, hi = wg.amin(dim=1), wg.amax(dim=1)  # (G, out)
            scales = ((hi - lo) / 15).clamp(min=1e-12)
            codes = ((wg - lo[:, None]) / scales[:, None]).round().clamp(0, 15).to(torch.uint8)
            codes = codes.reshape(w.size(1), w.size(0))  # (in, out)
            q.qweight.copy_(codes[0::2] | (codes[1::2] << 4))
            q.scales.copy_(scales)
            q.mins.copy_(lo)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) weight the codes stand for."""
        if self.method == "int8":
            return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]
        if self.method == "int8g":
            G = self.in_features // self.group_size
            w = self.qweight.to(dtype).view(self.out_features, G, -1) * self.scales.to(dtype)[..., None]
            return w.view(self.out_features, self.in_features)
        codes = torch.stack([self.qweight & 15, self.qweight >> 4], dim=1).view(self.in_features, -1)  # (in, out)
        G = self.in_features // self.group_size
        w = codes.to(dtype).view(G, self.group_size, -1) * self.scales.to(dtype)[:, None] + self.mins.to(dtype)[:, None]
        return w.view(self.in_features, -1).t()

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        M = x2.size(0)
        if M <= kernels.SMALL_M and x2.device.type == "cpu":  # decode rows: the C kernels, codes read in place
            x2 = x2.contiguous()
            if self.method == "int8g":
                y = kernels.gemm_int8g(x2, self.qweight, self.scales)
            elif self.method == "int8":
                y = (kernels.gemv_int8 if M == 1 else kernels.gemm_int8)(x2, self.qweight, self.scales)
            else:
                y = (kernels.gemv_int4 if M == 1 else kernels.gemm_int4)(x2, self.qweight, self.scales, self.mins)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x2, self.dequantize(x.dtype), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method != "int8" else ""
        return f"{self.in_features}, {self.out_features}, {self.method}{group}"


class QuantizedEmbedding(QuantizedLinear):
    """A token table (vocab, dim) held as int8g codes: qweight (vocab, dim) int8, scales (vocab, dim/group).
    It is the weight of a linear layer dim → vocab, so `project` (the tied head) is QuantizedLinear's forward."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 32):
        super().__init__(embedding_dim, num_embeddings, False, "int8g", group_size)

    @property
    def weight(self) -> Tensor:
        """What callers ask a token table's weight for, its device and the activations' dtype: the fp32 scales
        (the codes are `qweight`)."""
        return self.scales

    def forward(self, idx: Tensor) -> Tensor:
        """idx (...) → (..., dim), dequantizing only the rows looked up."""
        q, s = self.qweight[idx], self.scales[idx]  # (..., dim), (..., G)
        return (q.to(s.dtype).view(*s.shape, -1) * s[..., None]).view(*idx.shape, self.in_features)

    def project(self, x: Tensor) -> Tensor:
        return QuantizedLinear.forward(self, x)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, int8g, group_size={self.group_size}"


class TiedHead(nn.Module):
    """The output head tied to a QuantizedEmbedding: logits = x · tableᵀ from the table's own codes. The
    table is held outside the module tree, so its buffers are saved once, under the embedding's name."""

    def __init__(self, table: QuantizedEmbedding):
        super().__init__()
        object.__setattr__(self, "table", table)  # not a submodule: no second copy in the state dict

    def forward(self, x: Tensor) -> Tensor:
        return self.table.project(x)

    def extra_repr(self) -> str:
        return "tied to the quantized token table"


@contextmanager
def int8_activations(model: GPT) -> Iterator[GPT]:
    """Within: every quantized linear layer of `model` (and a tied quantized head) multiplies
    `kernels.fake_quantize_act(x)` instead of its input x, the values of x's int8 blocks of 32: the PyTorch
    definition of w8a8 decoding (infer/native.py's `act_int8`), which it equals up to float summation order.
    Forward pre-hooks, removed on exit; the weights are untouched."""
    targets = [m for m in model.modules() if isinstance(m, TiedHead | QuantizedLinear)]
    hooks = [m.register_forward_pre_hook(lambda _, args: (kernels.fake_quantize_act(args[0]),))
             for m in targets if not isinstance(m, QuantizedEmbedding)]  # fmt: skip
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def check(method: str, group_size: int) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose from {', '.join(METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    return {"method": method, "group_size": group_size} if method == "int4" else {"method": method}


@torch.no_grad()
def quantize(model: GPT, method: str = "int8", group_size: int = GROUP_SIZE) -> GPT:
    """In place: every nn.Linear becomes a QuantizedLinear; `model.quantization` records how."""
    spec = check(method, group_size)
    model.requires_grad_(False)
    model.lm_head = QuantizedLinear.from_linear(model.lm_head, "int8")
    replace_linears(model, lambda lin: QuantizedLinear.from_linear(lin, method, group_size))
    model.quantization = spec
    return model.eval()


def quantized_structure(model: GPT, spec: dict) -> GPT:
    """In place, on a meta-device model about to be loaded: the QuantizedLinear modules `spec` implies."""
    if "modules" in spec:
        return _module_structure(model, spec)
    check(spec.get("method"), spec.get("group_size", GROUP_SIZE))

    def make(lin: nn.Linear, method: str = spec["method"]) -> QuantizedLinear:
        return QuantizedLinear(
            lin.in_features, lin.out_features, lin.bias is not None, method, spec.get("group_size", GROUP_SIZE)
        )

    model.lm_head = make(model.lm_head, "int8")
    replace_linears(model, make)
    model.quantization = dict(spec)
    return model.requires_grad_(False)


def _module_structure(model: GPT, spec: dict) -> GPT:
    """A per-module spec (codes kept from a file): each named linear layer, or the token table
    `transformer.wte`, becomes the layout it names; a tied head follows a quantized table."""
    modules = spec["modules"]
    if not isinstance(modules, dict):
        raise ValueError("'modules' must map module names to {method, group_size}")
    for name, entry in modules.items():
        method, group = entry["method"], entry.get("group_size", GROUP_SIZE)
        layer = re.match(r"transformer\.h\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= model.config.n_layer:
            continue  # a shorter model of the same config (checkpoint.estimate_memory builds 1 and 2 layers)
        parent, _, child = name.rpartition(".")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module {name}") from None
        if isinstance(old, nn.Embedding):
            if method != "int8g":
                raise ValueError(f"{name}: a token table can only be kept as int8g, not {method}")
            new = QuantizedEmbedding(old.num_embeddings, old.embedding_dim, group)
        elif isinstance(old, nn.Linear):
            new = QuantizedLinear(old.in_features, old.out_features, old.bias is not None, method, group)
        else:
            raise ValueError(f"{name} is neither a linear layer nor the token table")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if isinstance(model.transformer.wte, QuantizedEmbedding) and model.config.tie_embeddings:
        model.lm_head = TiedHead(model.transformer.wte)
    model.quantization = {"modules": {k: dict(v) for k, v in modules.items()}}
    return model.requires_grad_(False)
