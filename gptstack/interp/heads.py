"""Attention heads: their patterns, induction scores, and ablation.

An induction head (Olsson et al. 2022, "In-context learning and induction heads") completes
[A][B] … [A] → [B]: at a token it attends to the token *after* that token's previous occurrence. On
a sequence of random tokens repeated twice, r₁…r_n r₁…r_n, a query at the second copy's position
n+i sees key i+1 exactly when the head does this; the induction score is the mean attention on that
key over the second copy. The same sequences show the behaviour the heads buy: the loss on the
second copy (predictable only by copying) against the first (unpredictable: about ln V).

Ablation zeroes chosen heads' outputs (blocks.L.attn.z, the input of c_proj) in every forward inside
the context, cached decoding included, so any evaluation (eval.tasks.run_task) runs on the ablated
model unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from gptstack.interp.hooks import Hooks, run_with_cache, stack
from gptstack.model import GPT


def head_patterns(model: GPT, idx: Tensor) -> Tensor:
    """Attention probabilities of every head: (n_layer, B, h, T, T) fp32."""
    with torch.no_grad():
        _, cache = run_with_cache(model, idx, ["blocks.*.attn.pattern"])
    return stack(cache, "attn.pattern", model.config.n_layer)


def repeated_tokens(model: GPT, n: int, batch: int, seed: int = 0, pool: Tensor | None = None) -> Tensor:
    """(batch, len(bos) + 2n): the tokenizer's BOS prefix (if it uses one), then n random ordinary tokens
    twice, drawn from `pool` (ids) if given, else from the whole vocabulary. Special tokens are never drawn."""
    tok = model.tokenizer
    vocab = tok.n_vocab if tok is not None else model.config.vocab_size
    special = sorted(tok.special_ids) if tok is not None else []
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[pool if pool is not None else slice(None)] = True
    allowed[[s for s in special if s < vocab]] = False
    ids = allowed.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    r = ids[torch.randint(len(ids), (batch, n), generator=gen)]
    bos = torch.tensor(tok.bos_prefix if tok is not None else [], dtype=torch.long).expand(batch, -1)
    return torch.cat([bos, r, r], dim=1)


def induction_scores(model: GPT, n: int = 50, batch: int = 4, seed: int = 0, pool: Tensor | None = None) -> dict:
    """Per head (n_layer, h) on repeated random tokens: the induction score (attention from each
    second-copy token to the token after its first occurrence) and the previous-token score (attention
    to the key just before); the mean loss on the first and the second copy. n is capped so that both
    copies fit the context; `pool`: draw the tokens from these ids (e.g. those a small model was trained on)."""
    bos = len(model.tokenizer.bos_prefix) if model.tokenizer is not None else 0
    n = min(n, (model.config.block_size - bos) // 2)  # both copies fit the context
    idx = repeated_tokens(model, n, batch, seed, pool).to(model.lm_head.weight.device)
    off = idx.size(1) - 2 * n  # the BOS prefix
    with torch.no_grad():
        logits, cache = run_with_cache(model, idx, ["blocks.*.attn.pattern"])
    pat = stack(cache, "attn.pattern", model.config.n_layer)  # (L, B, h, T, T)
    q = torch.arange(off + n, off + 2 * n)  # the second copy's positions
    induction = pat[..., q, q - n + 1].mean(dim=(1, 3))  # (L, h)
    previous = pat[..., q, q - 1].mean(dim=(1, 3))
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten(), reduction="none")
    loss = loss.view(batch, -1)  # loss[:, t] predicts token t+1
    first = loss[:, off : off + n - 1].mean()  # predicting r₂…r_n of the first copy
    second = loss[:, off + n : off + 2 * n - 1].mean()  # r₂…r_n of the second copy
    return {"n": n, "batch": batch, "seed": seed, "induction": induction.tolist(), "previous_token": previous.tolist(),
            "loss_first_copy": float(first), "loss_second_copy": float(second)}  # fmt: skip


def top_heads(scores: list[list[float]], k: int) -> list[tuple[int, int, float]]:
    """The k highest (layer, head, score) of a (n_layer, h) score table."""
    flat = [(L, h, s) for L, row in enumerate(scores) for h, s in enumerate(row)]
    return sorted(flat, key=lambda t: -t[2])[:k]


@contextlib.contextmanager
def ablate_heads(model: GPT, heads: Iterable[tuple[int, int]]) -> Iterator[Hooks]:
    """Zero the outputs of `heads` ((layer, head) pairs) in every forward inside the context."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < model.config.n_layer and 0 <= head < model.config.n_head):
            raise ValueError(
                f"no head {head} in layer {layer} (n_layer {model.config.n_layer}, n_head {model.config.n_head})"
            )
        by_layer.setdefault(layer, []).append(head)

    def zero(hs: list[int]):
        def fn(z: Tensor) -> Tensor:  # (B, T, h, hd)
            z = z.clone()
            z[:, :, hs] = 0
            return z

        return fn

    with Hooks(model, patches={f"blocks.{L}.attn.z": zero(hs) for L, hs in by_layer.items()}) as hooks:
        yield hooks
