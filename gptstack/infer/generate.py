"""Autoregressive generation with the contiguous KV cache: prefill the prompt once, then one token per step.

The simple loop behind training-time samples and the tests' reference for the engine. It samples
through `Sampler`, the engine's own path (penalties, temperature, filters, the exponential race).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gptstack.infer.kvcache import KVCache
from gptstack.infer.sampling import Sampler, SamplingParams
from gptstack.model import GPT


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    params: SamplingParams | None = None,
    stop_tokens: frozenset[int] = frozenset(),
    use_cache: bool = True,
    allowed: torch.Tensor | None = None,
    embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Iterator[int]:
    """Yield up to `params.max_tokens` new token ids one at a time (stops early at a stop token, which
    is not yielded). `allowed` (V,) bool: the only ids that may be sampled (Tokenizer.decodable_mask).
    `embeds` (where (T,) bool over the prompt, rows (where.sum(), D)): image features at the prompt's
    placeholders (GPT.forward). Without the cache every step re-runs the whole sequence (the reference
    the cache must match)."""
    params = params or SamplingParams()
    n, ctx = params.max_tokens, model.config.block_size
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt) + n > ctx:
        raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {n} exceed the context of {ctx} tokens")
    weight = next(model.parameters())
    device = weight.device
    sampler = Sampler(params, prompt, model.config.vocab_size, device, None if allowed is None else allowed.to(device))
    seq = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    cache = KVCache(model.config, 1, len(prompt) + n, device, weight.dtype) if use_cache else None
    where, rows = embeds if embeds is not None else (torch.zeros(len(prompt), dtype=torch.bool), None)
    where = where.to(device)

    def splice(T: int):  # the prompt's image rows, for a forward over the first T positions
        if rows is None:
            return None
        return torch.cat([where, where.new_zeros(T - len(prompt))])[None], rows.to(device)

    logits = model(seq, kv_cache=cache, embeds=splice(len(prompt)))[0, -1]  # (V,): only the last position predicts
    for i in range(n):
        token = sampler.sample(logits.float())
        if token in stop_tokens:
            return
        yield token
        if i + 1 == n:
            return
        sampler.observe(token)
        seq = torch.cat([seq, torch.tensor([[token]], device=device)], dim=1)
        if use_cache:
            logits = model(seq[:, -1:], kv_cache=cache)[0, -1]
        else:
            logits = model(seq, embeds=splice(seq.size(1)))[0, -1]
