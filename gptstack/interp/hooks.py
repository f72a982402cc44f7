"""Named hook points on the one model: capture any activation of a forward pass, or patch it.

TransformerLens-style names, one set per block L (B batch, T tokens, D n_embd, h heads, kv key/value
heads, hd head_dim, F d_ff):

    blocks.L.resid_pre    (B, T, D)      the residual stream entering block L (L = 0: the embeddings)
    blocks.L.attn.q|k|v   (B, T, h|kv, hd) c_attn's projections, before QK-norm and RoPE (TL's hook_q)
    blocks.L.attn.pattern (B, h, T, T)   softmax attention probabilities, fp32; capture only
    blocks.L.attn.z       (B, T, h, hd)  each head's attention-weighted values, the input of c_proj
    blocks.L.attn.out     (B, T, D)      what the attention branch adds to the residual (after a sandwich norm)
    blocks.L.resid_mid    (B, T, D)      the residual between attention and MLP
    blocks.L.mlp.pre      (B, T, F|2F)   c_fc's output (gated MLPs: [gate; up]); dense MLPs only
    blocks.L.mlp.post     (B, T, F)      the nonlinearity's output (GeGLU/SwiGLU: the gated product),
                                         the input of c_proj: the "neurons"; dense MLPs only
    blocks.L.mlp.out      (B, T, D)      what the MLP (or MoE) branch adds to the residual
    blocks.L.resid_post   (B, T, D)      the block's output (= blocks.L+1.resid_pre)

model.py is left untouched: every point is a forward hook or pre-hook on an existing module (the
block, c_attn, c_proj, the sandwich-norm slots, ln_2), registered on entry to `hooked(...)` and removed
on exit, even on error, so a model never keeps a hook. The model computes attention with SDPA, which
never materialises the probabilities; `attention_pattern` recomputes them from the captured q/k with
the layer's own QK-norm, RoPE table, scale, band window and document mask, so the forward's numerics
are unchanged. Patching resid_mid of a pre-norm block rewrites the attention branch to (P - resid_pre)
(exact up to one fp rounding); every other patch replaces the tensor itself.

A patch is `fn(value) -> Tensor | None` (None: keep `value`, possibly edited in place). Names accept
fnmatch wildcards (`blocks.*.resid_post`); a name that matches no hook point is a HookError.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from gptstack.model import GPT, MoE, apply_rope, attention_mask

Patch = Callable[[Tensor], "Tensor | None"]
POINTS = ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.out", "resid_mid",
          "mlp.pre", "mlp.post", "mlp.out", "resid_post")  # fmt: skip


class HookError(ValueError):
    """A hook name that matches nothing, or a point that cannot be patched."""


def hook_names(model: GPT) -> list[str]:
    """Every hook point of `model`, in forward order (MoE blocks have no mlp.pre / mlp.post)."""
    names = []
    for i, block in enumerate(model.transformer.h):
        dense = not isinstance(block.mlp, MoE)
        names += [f"blocks.{i}.{p}" for p in POINTS if dense or p not in ("mlp.pre", "mlp.post")]
    return names


def resolve_names(model: GPT, names: Iterable[str]) -> list[str]:
    """Expand wildcards against hook_names(model); refuse a name that matches none."""
    every, out = hook_names(model), []
    for name in names:
        found = fnmatch.filter(every, name)
        if not found:
            raise HookError(f"no hook point matches {name!r} (e.g. blocks.0.resid_pre, blocks.*.attn.pattern)")
        out += [n for n in found if n not in out]
    return out


def attention_pattern(attn: nn.Module, q: Tensor, k: Tensor, rope: dict | None, docs: Tensor | None) -> Tensor:
    """Softmax probabilities (B, h, T, T) in fp32 that `attend` applies, from c_attn's q (B, T, h, hd) and
    k (B, T, kv, hd): the layer's QK-norm, RoPE, scale (None → 1/√hd), window and document mask, and
    GQA's sharing (query head i reads kv head i // (h / kv), as SDPA's enable_gqa)."""
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        cos, sin = rope[attn.kind]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # (B, h|kv, T, hd)
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, h, T, hd)
    T = q.size(2)
    scale = attn.scale if attn.scale is not None else q.size(-1) ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, h, T, T)
    mask = attention_mask(T, T, 0, attn.window, q.device)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if docs is not None:
        mask = docs & mask  # (B, 1, T, T)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


class _Layer:
    """The hook functions of one block: each captures its points and applies their patches."""

    def __init__(self, owner: Hooks, i: int, block: nn.Module):
        self.owner, self.i, self.block = owner, i, block
        self.resid_pre: Tensor | None = None
        self.attn_args: tuple | None = None  # (rope, kv_cache, docs) of the current call

    def point(self, name: str, value: Tensor) -> Tensor:
        return self.owner.visit(f"blocks.{self.i}.{name}", value)

    def wants(self, *names: str) -> bool:
        return any(f"blocks.{self.i}.{n}" in self.owner.active for n in names)

    def pre_block(self, module, args):
        x = self.point("resid_pre", args[0])
        self.resid_pre = x
        return (x, *args[1:])

    def post_block(self, module, args, output):
        x, aux = output
        return self.point("resid_post", x), aux

    def pre_attn(self, module, args):
        _, rope, kv_cache, *docs = args
        self.attn_args = (rope, kv_cache, docs[0] if docs else None)

    def qkv(self, module, args, output):  # c_attn: (B, T, (h + 2kv)·hd)
        attn = self.block.attn
        B, T, _ = output.shape
        hd, h, kv = attn.head_dim, attn.n_head, attn.n_kv_head
        q, k, v = (t.reshape(B, T, -1, hd) for t in output.split([h * hd, kv * hd, kv * hd], dim=-1))
        q, k, v = self.point("attn.q", q), self.point("attn.k", k), self.point("attn.v", v)
        if self.wants("attn.pattern"):
            rope, kv_cache, docs = self.attn_args
            if kv_cache is not None:
                raise HookError("attention patterns need a forward without a KV cache")
            self.point("attn.pattern", attention_pattern(attn, q, k, rope, docs))
        return torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)

    def z(self, module, args):  # c_proj's input (B, T, h·hd)
        y = args[0]
        return self.point("attn.z", y.view(*y.shape[:2], self.block.attn.n_head, -1)).flatten(2)

    def attn_out(self, module, args, output):  # pre-norm: ln_attn_out's output; post-norm: attn's
        out = self.point("attn.out", output)
        name = f"blocks.{self.i}.resid_mid"
        if self.block.prenorm and name in self.owner.patches:  # resid_mid = resid_pre + out: patch via out
            mid = self.owner.patch(name, self.resid_pre + out)
            out = mid - self.resid_pre
        return out

    def mid_prenorm(self, module, args):  # ln_2's input: the residual between the branches
        self.owner.capture(f"blocks.{self.i}.resid_mid", args[0])

    def mid_postnorm(self, module, args, output):  # GPT-1: ln_1(x + attn(x)) is the residual itself
        return self.point("resid_mid", output)

    def mlp_pre(self, module, args, output):
        return self.point("mlp.pre", output)

    def mlp_post(self, module, args):
        return (self.point("mlp.post", args[0]),)

    def mlp_out(self, module, args, output):  # pre-norm: ln_mlp_out's output; post-norm: mlp's (h, aux)
        if isinstance(output, tuple):
            return self.point("mlp.out", output[0]), output[1]
        return self.point("mlp.out", output)

    def register(self) -> list:
        """Attach this block's hooks; the handles to remove them."""
        b, a = self.block, self.block.attn
        post = [(b, self.post_block), (a.c_attn, self.qkv)]
        pre = [(b, self.pre_block), (a, self.pre_attn), (a.c_proj, self.z)]
        if b.prenorm:
            post += [(b.ln_attn_out, self.attn_out), (b.ln_mlp_out, self.mlp_out)]
            pre += [(b.ln_2, self.mid_prenorm)]
        else:
            post += [(a, self.attn_out), (b.ln_1, self.mid_postnorm), (b.mlp, self.mlp_out)]
        if not isinstance(b.mlp, MoE):
            post += [(b.mlp.c_fc, self.mlp_pre)]
            pre += [(b.mlp.c_proj, self.mlp_post)]
        return [m.register_forward_hook(f) for m, f in post] + [m.register_forward_pre_hook(f) for m, f in pre]


class Hooks:
    """Capture `names` into `.cache` and apply `patches` while the context is open; remove every hook on
    exit. Only the blocks a name or patch touches get hooks."""

    def __init__(self, model: GPT, names: Iterable[str] = (), patches: dict[str, Patch] | None = None, detach=True):
        self.model, self.detach = model, detach
        self.names = set(resolve_names(model, names))
        self.patches = {n: fn for pat, fn in (patches or {}).items() for n in resolve_names(model, [pat])}
        if bad := sorted(n for n in self.patches if n.endswith("attn.pattern")):
            raise HookError(f"{bad[0]} is capture only (SDPA computes it inside): patch attn.q/k/z instead")
        self.active = self.names | set(self.patches)
        self.cache: dict[str, Tensor] = {}
        self.handles: list = []

    def capture(self, name: str, value: Tensor) -> None:
        if name in self.names:
            self.cache[name] = value.detach() if self.detach else value

    def patch(self, name: str, value: Tensor) -> Tensor:
        fn = self.patches.get(name)
        if fn is None:
            return value
        new = fn(value)
        if new is None:
            return value
        if new.shape != value.shape:
            raise HookError(f"patch of {name} returned shape {tuple(new.shape)}, expected {tuple(value.shape)}")
        return new.to(value.dtype)

    def visit(self, name: str, value: Tensor) -> Tensor:
        value = self.patch(name, value)
        self.capture(name, value)
        return value

    def __enter__(self) -> Hooks:
        layers = {int(n.split(".")[1]) for n in self.active}
        try:
            for i in sorted(layers):
                self.handles += _Layer(self, i, self.model.transformer.h[i]).register()
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __exit__(self, *exc) -> None:
        self.remove()


@contextlib.contextmanager
def patched(model: GPT, patches: dict[str, Patch], names: Iterable[str] = ()) -> Iterator[Hooks]:
    """`with patched(model, {"blocks.3.attn.z": fn}):` every forward inside runs with the patches."""
    with Hooks(model, names, patches) as hooks:
        yield hooks


def run_with_cache(
    model: GPT,
    idx: Tensor,
    names: Iterable[str] | None = None,
    patches: dict[str, Patch] | None = None,
    detach: bool = True,
    **forward_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward of `model` on idx (B, T): (logits, {name: activation}); names None → every point."""
    with Hooks(model, hook_names(model) if names is None else names, patches, detach) as hooks:
        logits = model(idx, **forward_kwargs)
    return logits, hooks.cache


def stack(cache: dict[str, Tensor], point: str, n_layer: int) -> Tensor:
    """One point across layers: (n_layer, ...) from blocks.{0..n_layer-1}.{point}."""
    return torch.stack([cache[f"blocks.{i}.{point}"] for i in range(n_layer)])
