"""THE model: one GPT that covers the lineage (GPT-1/2/3, Llama-style, GPT-4-style MoE) and the open
models users bring (SmolLM/Llama, Qwen2, Gemma 3) by config.

Read top to bottom: norms and rotary positions, attention, the dense and MoE feed-forwards, the block,
the GPT. Parameter names follow nanoGPT / HF GPT-2 (`transformer.h.{i}.attn.c_attn`, ...) so that
one conversion table per HF family (interop/hf.py) maps them. Variants are config values:

- positions: learned absolute table (`wpe`) or rotary (RoPE, HF's rotate-half layout, with linear
  position interpolation for context extension); local layers may use a second base
  (`rope_local_theta`, Gemma 3), so the model keeps one cos/sin table per attention kind;
- norms: LayerNorm or RMSNorm (scaled by `norm_offset + w` in fp32, Gemma's (1+w)); pre-LN (GPT-2+)
  or post-LN (GPT-1, no final norm); sandwich norms on the attention and MLP outputs (Gemma 2/3);
- attention: MHA / GQA / MQA through F.scaled_dot_product_attention (flash kernels on GPU); each
  layer dense-causal or locally banded (GPT-3 alternates them; Gemma 3's sliding window);
  q/k/v biases without other biases (Qwen2); per-head QK-norm before RoPE and a softmax scale
  other than 1/√head_dim (Gemma 3);
- feed-forward: GELU MLP, SwiGLU, GeGLU, or a dropless top-k mixture of experts with load-balancing
  and router z-losses added to the LM loss;
- token embeddings optionally × `embed_scale` (Gemma: √n_embd, rounded to the activation dtype).

The KV cache is an object passed to `forward` that owns where keys and values live and how the new
tokens attend to them (infer/kvcache.py: one contiguous cache; infer/engine.py: paged blocks shared
by many sequences). The model only calls `kv_cache.positions(T, device)` (the absolute positions
of the new tokens), `kv_cache.attend(layer, q, k, v, window, scale)` and `kv_cache.advance(T)`; the
cache receives keys already normed and rotated, so it needs to know nothing of either.
Build on the meta device, move with `to_empty`, then call the one `init_weights()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from gptstack.config import ModelConfig


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x · rsqrt(mean(x²) + eps) · (offset + w), computed in fp32 (or fp64 for fp64 x) and
    cast back to x's dtype afterwards (Llama casts before scaling); w starts at 1 - offset, a unit scale."""

    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (self.offset + self.weight.to(h.dtype))).type_as(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over the last `dim` features (default n_embd; QK-norm passes head_dim)."""
    dim = dim or cfg.n_embd
    if cfg.norm == "rmsnorm":  # torch's own RMSNorm (bitwise the fp32 formula above) unless there is an offset
        return OffsetRMSNorm(dim, cfg.norm_eps, cfg.norm_offset) if cfg.norm_offset else nn.RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: ModelConfig, device: torch.device | None = None, local: bool = False) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (block_size, head_dim/2) in fp32: one angle per pair (i, i + head_dim/2) of the
    rotate-half layout (HF Llama's, whose tables repeat these twice). Global (dense) layers: base
    rope_theta, positions divided by the scaling factor; local layers with their own base
    (rope_local_theta): unscaled."""
    theta, scaling = (cfg.rope_local_theta, 1.0) if local else (cfg.rope_theta, cfg.rope_scaling)
    half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim
    inv_freq = 1.0 / (theta**half) / scaling  # (head_dim/2,)
    t = torch.arange(cfg.block_size, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (block_size, head_dim/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, h, hd); cos/sin: (T, hd/2) or (B, T, hd/2), one row per position. Rotates each pair
    (x1, x2) of the two halves of a head; the same arithmetic, element for element, as HF's
    x·cos + rotate_half(x)·sin with its doubled tables."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, h, hd/2) each
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attention_mask(T: int, S: int, pos0: int, window: int | None, device: torch.device) -> Tensor | None:
    """Boolean (T, S) mask: query at absolute position pos0+i may see key j when j <= pos0+i and,
    for a banded layer, pos0+i - j < window. None when plain top-left causal or full attention works."""
    if window is None and (T == 1 or (pos0 == 0 and S == T)):
        return None
    q_pos = torch.arange(pos0, pos0 + T, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    return mask


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float = 0.0, scale: float | None = None
) -> Tensor:
    """q (B, h, T, hd), k/v (B, kv, S, hd), mask broadcastable to (B, h, T, S) or None for plain
    top-left causal (or T == 1). GQA/MQA: kv divides h and each kv head serves h/kv query heads.
    scale: of q·k before the softmax; None → 1/√hd."""
    T = q.size(2)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and T > 1,
        dropout_p=dropout,
        scale=scale,
        enable_gqa=k.size(1) != q.size(1),
    )  # (B, h, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.kind = cfg.attn_kinds[layer_idx]  # picks the layer's RoPE table too
        self.window = cfg.attn_window if self.kind == "local" else None
        self.scale, self.dropout = cfg.attn_scale, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        # QK-norm (Gemma 3): one (head_dim,) weight each, shared by all heads
        self.q_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = make_norm(cfg, cfg.head_dim) if cfg.qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope: dict | None, kv_cache, docs: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.c_attn(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q = q.view(B, T, self.n_head, hd)  # (B, T, h, hd)
        k = k.view(B, T, self.n_kv_head, hd)  # (B, T, kv, hd)
        v = v.view(B, T, self.n_kv_head, hd)
        q, k = self.q_norm(q), self.k_norm(k)  # over hd, per head (identity without QK-norm)
        if rope is not None:
            cos, sin = rope[self.kind]  # (T, hd/2) or (B, T, hd/2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h|kv, T, hd)
        if kv_cache is not None:  # the cache stores k, v and attends over everything cached
            y = kv_cache.attend(self.layer_idx, q, k, v, self.window, self.scale)  # (B, h, T, hd)
        else:
            mask = attention_mask(T, T, 0, self.window, x.device)  # (T, T) or None
            if docs is not None:  # packed documents: (B, 1, T, T), causal and within one document
                mask = docs & (mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril())
            y = attend(q, k, v, mask, self.dropout if self.training else 0.0, self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * hd))


def activate(h: Tensor, kind: str) -> Tensor:
    """GELU (tanh approximation, as GPT-1/2/3) on h, or SwiGLU / GeGLU (tanh GELU) on h = [gate; up]."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if kind == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    return F.gelu(h, approximate="tanh")


def fc_width(cfg: ModelConfig) -> int:
    """Output width of c_fc / w_fc: gated MLPs hold [gate; up] fused, 2·d_ff."""
    return 2 * cfg.d_ff if cfg.mlp in ("swiglu", "geglu") else cfg.d_ff


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.c_fc = nn.Linear(cfg.n_embd, fc_width(cfg), bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.dropout(self.c_proj(activate(self.c_fc(x), self.kind))), None


class MoE(nn.Module):
    """Dropless top-k mixture of experts: every token reaches its k experts, no capacity limit.

    Router: softmax over experts in fp32, top-k, gates renormalised to sum to 1 (Mixtral).
    Aux losses (returned as a (2,) tensor): Switch load balancing n_expert·Σ_e f_e·P_e, with f_e the
    fraction of the N·k assignments routed to expert e and P_e its mean router probability (1.0 when
    balanced); and the ST-MoE router z-loss mean(logsumexp(logits)²).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.n_expert, self.k = cfg.mlp, cfg.n_expert, cfg.n_expert_active
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)
        self.w_fc = nn.Parameter(torch.empty(cfg.n_expert, fc_width(cfg), cfg.n_embd))  # (E, F or 2F, D)
        self.w_proj = nn.Parameter(torch.empty(cfg.n_expert, cfg.n_embd, cfg.d_ff))  # (E, D, F)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, D = x.shape
        xf = x.reshape(-1, D)  # (N, D)
        logits = self.router(xf).float()  # (N, E)
        probs = logits.softmax(dim=-1)
        gates, experts = probs.topk(self.k, dim=-1)  # (N, k)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(xf)
        for e in range(self.n_expert):
            token, slot = torch.where(experts == e)  # the tokens that chose e, and in which top-k slot
            if token.numel() == 0:
                continue
            h = activate(F.linear(xf[token], self.w_fc[e]), self.kind)
            out.index_add_(0, token, F.linear(h, self.w_proj[e]) * gates[token, slot, None].to(x.dtype))
        frac = torch.bincount(experts.flatten(), minlength=self.n_expert).float() / experts.numel()  # (E,)
        balance = self.n_expert * (frac * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return out.view(B, T, D), torch.stack([balance, z])


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        # sandwich norms (Gemma 2/3): each branch's output is normed too, before it joins the residual
        self.ln_attn_out = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.ln_2 = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_expert else MLP(cfg)
        self.ln_mlp_out = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope, kv_cache, docs: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if self.prenorm:  # GPT-2 onwards: x + f(norm(x)), or x + norm(f(norm(x))) with sandwich norms
            x = x + self.resid_drop(self.ln_attn_out(self.attn(self.ln_1(x), rope, kv_cache, docs)))
            h, aux = self.mlp(self.ln_2(x))
            return x + self.ln_mlp_out(h), aux
        x = self.ln_1(x + self.resid_drop(self.attn(x, rope, kv_cache, docs)))  # GPT-1: norm(x + f(x))
        h, aux = self.mlp(x)
        return self.ln_2(x + h), aux


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=make_norm(cfg) if cfg.prenorm else nn.Identity(),
            )
        )
        if cfg.pos == "learned":
            self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing = False  # recompute each block in backward instead of storing it
        for name, table in self.rope_buffers().items():  # derived, not learned: recomputed, never saved
            self.register_buffer(name, table, persistent=False)

    def rope_buffers(self, device: torch.device | None = None) -> dict[str, Tensor]:
        """rope_cos/rope_sin (block_size, head_dim/2), plus rope_local_cos/_sin when local layers have their
        own base; none for learned positions."""
        cfg, out = self.config, {}
        if cfg.pos == "rope":
            out["rope_cos"], out["rope_sin"] = rope_tables(cfg, device)
            if cfg.rope_local_theta is not None:
                out["rope_local_cos"], out["rope_local_sin"] = rope_tables(cfg, device, local=True)
        return out

    def rope_at(self, positions: Tensor) -> dict[str, tuple[Tensor, Tensor]] | None:
        """cos, sin rows at `positions` (T,) or (B, T) for each attention kind ("dense", "local")."""
        if self.config.pos != "rope":
            return None
        dense = (self.rope_cos[positions], self.rope_sin[positions])  # (T, hd/2) or (B, T, hd/2) each
        if self.config.rope_local_theta is None:
            return {"dense": dense, "local": dense}
        return {"dense": dense, "local": (self.rope_local_cos[positions], self.rope_local_sin[positions])}

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and isinstance(self.lm_head, nn.Linear):  # not once quantized
            self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Every init scheme in one place (GPT-2): N(0, 0.02) for linears and embeddings, zero biases,
        unit norm scales (offset + w = 1: w = 0 for Gemma's (1+w)), and residual projections
        (attn/MLP/expert c_proj) at 0.02/√(2·n_layer)."""
        self.tie_weights()  # to_empty() from meta may have untied them
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, resid_std if name.endswith("c_proj") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm, OffsetRMSNorm)):
                module.reset_parameters()
            elif isinstance(module, MoE):
                nn.init.normal_(module.w_fc, 0.0, std)
                nn.init.normal_(module.w_proj, 0.0, resid_std)
        self.init_buffers()

    def init_buffers(self) -> None:
        """Recompute derived, non-persistent buffers (the RoPE tables) on the model's device."""
        for name, table in self.rope_buffers(self.transformer.wte.weight.device).items():
            setattr(self, name, table)

    def features(
        self, idx: Tensor, kv_cache=None, segments: Tensor | None = None, embeds: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """The final normalised hidden states (B, T, D) that the LM head reads (and a reward, value or
        task head), plus the MoE auxiliary losses. Arguments as in forward()."""
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
            raise ValueError(f"idx must be a (B, T) integer tensor, got {tuple(idx.shape)} {idx.dtype}")
        T = idx.size(1)
        if kv_cache is not None:
            positions = kv_cache.positions(T, idx.device)  # (T,) or (B, T), checked by the cache
        elif self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
        else:
            positions = torch.arange(T, device=idx.device)  # (T,)
        docs = None
        if segments is not None:
            if segments.shape != idx.shape or kv_cache is not None:
                raise ValueError(f"segments must be (B, T) like idx {tuple(idx.shape)} and used without a KV cache")
            docs = segments[:, None, :, None] == segments[:, None, None, :]  # (B, 1, T, T)
            starts = torch.ones_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            idx_t = torch.arange(T, device=idx.device).expand_as(segments)
            first = torch.cummax(torch.where(starts, idx_t, 0), dim=1).values  # (B, T) start of each doc
            positions = idx_t - first  # (B, T)
        x = self.transformer.wte(idx)  # (B, T, D)
        if self.config.embed_scale != 1.0:  # the scale rounded to fp32, then to x's dtype, as HF Gemma does
            x = x * torch.tensor(self.config.embed_scale, dtype=torch.float32).to(x.dtype)
        if embeds is not None:  # rows from outside the vocabulary (image features) replace placeholder tokens
            where, rows = embeds  # (B, T) bool, (where.sum(), D)
            if where.shape != idx.shape or rows.shape != (int(where.sum()), x.size(-1)):
                raise ValueError(f"embeds must be ((B, T) mask, (n, {x.size(-1)}) rows) for idx {tuple(idx.shape)}")
            x = x.masked_scatter(where[..., None], rows.to(x.dtype))
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(positions)
        rope = self.rope_at(positions)
        x = self.transformer.drop(x)
        aux = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:
                x, a = torch.utils.checkpoint.checkpoint(block, x, rope, kv_cache, docs, use_reentrant=False)
            else:
                x, a = block(x, rope, kv_cache, docs)
            if a is not None:
                aux.append(a)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x), aux  # (B, T, D)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache=None,
        logits_at: Tensor | None = None,
        segments: Tensor | None = None,
        embeds: tuple[Tensor, Tensor] | None = None,
    ):
        """idx: (B, T) token ids. Returns logits (B, T, V), or (logits, loss) when targets (B, T) are
        given (targets of -1 are ignored; MoE auxiliary losses are added with their coefficients).
        `logits_at` (n,) or (B, n): compute the logits only at these positions of T (the same for every
        row, or per row), giving (B, n, V); an engine that needs one next-token distribution per
        sequence, or a scorer that needs only the continuation's, skips the rest of the head.
        `segments` (B, T): document index of each token when several documents are packed in a row;
        a token attends only within its document and positions restart at each document's start.
        `embeds` (where (B, T) bool, rows (n, D)): input rows that replace the (scaled) token embeddings at
        the True positions, in row-major order; how image features enter the sequence (gptstack.vision)."""
        x, aux = self.features(idx, kv_cache, segments, embeds)
        if logits_at is not None:
            x = (
                x[:, logits_at]
                if logits_at.dim() == 1
                else x.gather(1, logits_at[..., None].expand(-1, -1, x.size(-1)))
            )
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if aux:
            balance, z = torch.stack(aux).mean(dim=0)  # averaged over layers
            loss = loss + self.config.moe_aux_loss_coef * balance + self.config.moe_z_loss_coef * z
        return logits, loss


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None) -> GPT:
    """Construct on the meta device (no memory touched), materialise on `device`, initialise once."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from a meta-device model (exact, free even for 175B):
    total, active per token (MoE: only k of n experts), and the matmul parameters N used for FLOPs
    (total minus the position table, minus the token table when untied, since a lookup is no matmul)."""
    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    if cfg.n_expert:
        per_expert = sum(p[0].numel() for m in model.modules() if isinstance(m, MoE) for p in (m.w_fc, m.w_proj))
        inactive = per_expert * (cfg.n_expert - cfg.n_expert_active)
    wpe = cfg.block_size * cfg.n_embd if cfg.pos == "learned" else 0
    lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd
    return {"total": total, "active": total - inactive, "matmul": total - inactive - wpe - lookup}


def flops_per_token(cfg: ModelConfig, context: int | None = None) -> dict[str, float]:
    """Training FLOPs per token = 6·N + 12·Σ_layers(T_eff·h·hd) (PaLM appendix B), N the active matmul
    parameters, T_eff the attended context (the band width on local layers); forward alone is a third."""
    T = context or cfg.block_size
    n = count_params(cfg)["matmul"]
    attn = sum(min(T, cfg.attn_window) if kind == "local" else T for kind in cfg.attn_kinds)
    train = 6 * n + 12 * attn * cfg.n_head * cfg.head_dim
    return {"train": float(train), "forward": train / 3.0}


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """K and V for every layer: 2 · n_layer · n_kv_head · head_dim · bytes."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * bytes_per_element
