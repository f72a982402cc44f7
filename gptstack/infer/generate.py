"""Autoregressive generation with a KV cache: prefill the prompt once, then one token per step."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gptstack.infer.kvcache import KVCache
from gptstack.infer.sampling import SamplingParams, sample
from gptstack.model import GPT


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_tokens: frozenset[int] = frozenset(),
    use_cache: bool = True,
    allowed: torch.Tensor | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (stops early at a stop token, which is not yielded).
    `allowed` (V,) bool: the only ids that may be sampled (see Tokenizer.decodable_mask).
    Without the cache every step re-runs the whole sequence (the reference the cache must match)."""
    params = params or SamplingParams()
    ctx = model.config.block_size
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > ctx:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} exceed the context of {ctx} tokens"
        )
    if max_new_tokens == 0:
        return
    weight = next(model.parameters())
    device = weight.device
    allowed = allowed.to(device) if allowed is not None else None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    seq = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device, weight.dtype) if use_cache else None
    logits = model(seq, kv_cache=cache)[:, -1]  # (1, V): only the last position predicts
    for i in range(max_new_tokens):
        token = sample(logits, params, generator, allowed)  # (1,)
        if token.item() in stop_tokens:
            return
        yield token.item()
        if i + 1 == max_new_tokens:
            return
        seq = torch.cat([seq, token[:, None]], dim=1)
        logits = model(token[:, None] if use_cache else seq, kv_cache=cache)[:, -1]
