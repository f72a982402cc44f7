"""Direct logit attribution: how much each component writes the target's logit straight into the
final residual stream.

The final residual is a sum: embeddings (blocks.0.resid_pre) + Σ_L (attn.out_L + mlp.out_L). The
final norm is linear in its input once its statistics (the RMS, and the mean for LayerNorm) are
frozen at the real final residual's values, so each part c maps to the logit as
`norm_frozen(c) · W_U[target]`, and the parts plus the norm's bias term add up to the logit
(tested to 1e-4 in fp32). Attention splits further by head: attn.out_L = Σ_h z_h W_O,hᵀ + b_O, and a
Gemma-style sandwich norm on the branch is frozen the same way. Post-LN models (GPT-1) have no
final residual to decompose and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptstack.interp.hooks import run_with_cache
from gptstack.model import GPT, OffsetRMSNorm


class AttributionError(ValueError):
    """A model or target that direct logit attribution cannot decompose."""


def frozen_norm(norm: nn.Module, x: Tensor) -> tuple[callable, Tensor | None]:
    """`norm` at input x as (a linear map of x's parts, its additive bias or None), in fp32:
    norm(x) = map(x) + bias, and map(a + b) = map(a) + map(b)."""
    x = x.float()
    if isinstance(norm, nn.Identity):
        return (lambda c: c.float()), None
    if isinstance(norm, (nn.RMSNorm, OffsetRMSNorm)):
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        w = norm.weight.float() + (norm.offset if isinstance(norm, OffsetRMSNorm) else 0.0)
        s = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (lambda c: c.float() * s * w), None
    if isinstance(norm, nn.LayerNorm):
        s = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
        w = norm.weight.float() if norm.weight is not None else 1.0
        bias = norm.bias.float() if norm.bias is not None else None
        return (lambda c: (c.float() - c.float().mean(-1, keepdim=True)) * s * w), bias
    raise AttributionError(f"cannot freeze a {type(norm).__name__}")


@dataclass
class Attribution:
    """Logit contributions at one position, each (B,): embed; per layer attn (n_layer, B), its heads
    (n_layer, h, B) and c_proj bias (n_layer, B); mlp (n_layer, B); the final norm's bias; the logit."""

    embed: Tensor
    attn: Tensor
    heads: Tensor
    attn_bias: Tensor
    mlp: Tensor
    bias: Tensor
    logit: Tensor

    def total(self) -> Tensor:
        return self.embed + self.attn.sum(0) + self.mlp.sum(0) + self.bias


def head_outputs(block: nn.Module, z: Tensor) -> tuple[Tensor, Tensor]:
    """Each head's write into c_proj's output (B, h, D) from z (B, h, hd) at one position, and c_proj's bias."""
    proj = block.attn.c_proj
    w = proj.weight.view(proj.weight.size(0), z.size(1), -1)  # (D, h, hd)
    per_head = torch.einsum("bhk,dhk->bhd", z.float(), w.float())
    bias = proj.bias.float() if proj.bias is not None else torch.zeros(proj.weight.size(0))
    return per_head, bias.expand(z.size(0), -1)


def direct_attribution(model: GPT, idx: Tensor, target: int, at: int = -1, against: int | None = None) -> Attribution:
    """Direct logit attribution of logit[target] (minus logit[against] if given) at position `at`."""
    if not model.config.prenorm:
        raise AttributionError("direct logit attribution needs a pre-norm model (post-LN has no final residual)")
    n = model.config.n_layer
    names = ["blocks.0.resid_pre", f"blocks.{n - 1}.resid_post", "blocks.*.attn.out", "blocks.*.mlp.out"]
    with torch.no_grad():
        logits, cache = run_with_cache(model, idx, [*names, "blocks.*.attn.z"])
        u = model.lm_head.weight[target].float()  # (D,) the target's unembedding direction
        if against is not None:
            u = u - model.lm_head.weight[against].float()
        final, bias = frozen_norm(model.transformer.ln_f, cache[f"blocks.{n - 1}.resid_post"][:, at])
        read = lambda c: final(c) @ u  # noqa: E731  (…, D) → (…,)
        attn, heads, attn_bias, mlp = [], [], [], []
        for i, block in enumerate(model.transformer.h):
            attn.append(read(cache[f"blocks.{i}.attn.out"][:, at]))
            mlp.append(read(cache[f"blocks.{i}.mlp.out"][:, at]))
            z = cache[f"blocks.{i}.attn.z"][:, at]  # (B, h, hd)
            per_head, b = head_outputs(block, z)
            y = F.linear(z.flatten(1), block.attn.c_proj.weight, block.attn.c_proj.bias)  # c_proj's output (B, D)
            sandwich, _ = frozen_norm(block.ln_attn_out, y)  # identity without sandwich norms
            heads.append(read(sandwich(per_head.transpose(0, 1))))  # (h, B)
            attn_bias.append(read(sandwich(b)))
        logit = logits[:, at, target].float()
        if against is not None:
            logit = logit - logits[:, at, against].float()
        return Attribution(
            embed=read(cache["blocks.0.resid_pre"][:, at]), attn=torch.stack(attn), heads=torch.stack(heads),
            attn_bias=torch.stack(attn_bias), mlp=torch.stack(mlp),
            bias=(bias @ u).expand_as(logit) if bias is not None else torch.zeros_like(logit), logit=logit,
        )  # fmt: skip
