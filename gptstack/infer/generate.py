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
) -> Iterator[int]:
    """Yield up to `params.max_tokens` new token ids one at a time (stops early at a stop token, which
    is not yielded). `allowed` (V,) bool: the only ids that may be sampled (Tokenizer.decodable_mask).
    Without the cache every step re-runs the whole sequence (the reference the cache must match)."""
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
    logits = model(seq, kv_cache=cache)[0, -1]  # (V,): only the last position predicts
    for i in range(n):
        token = sampler.sample(logits.float())
        if token in stop_tokens:
            return
        yield token
        if i + 1 == n:
            return
        sampler.observe(token)
        seq = torch.cat([seq, torch.tensor([[token]], device=device)], dim=1)
        logits = model(seq[:, -1:] if use_cache else seq, kv_cache=cache)[0, -1]
