"""The GPT-3 optimisation recipe: AdamW parameter groups, the learning-rate schedule and the batch ramp.

Everything is a pure function of the number of tokens trained on, so the "scheduler state" of a
checkpoint is that one number and a resumed run picks up exactly where it stopped.

Weight-decay grouping (GPT-3 §B: "weight decay of 0.1"; nanoGPT's split):
- decayed: every weight matrix (attention and MLP projections, MoE expert and router weights) and the
  token embedding, which is also the output matrix when tied;
- not decayed: biases and norm gains (anything with fewer than 2 dimensions), and, when
  `decay_embeddings=False`, the embedding tables (`wte` when untied, the learned position table `wpe`).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Two AdamW groups, each with a `names` list so that optimizer state can be keyed by name."""
    decay, no_decay = ([], []), ([], [])
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bare = name.removeprefix("module.").replace("_orig_mod.", "")
        is_table = bare in EMBEDDINGS and not (tied and bare == "transformer.wte.weight")
        target = decay if p.dim() >= 2 and (decay_embeddings or not is_table) else no_decay
        target[0].append(p)
        target[1].append(bare)
    return [
        {"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
        {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0},
    ]


def build_adamw(
    groups: list[dict], lr: float, betas: tuple[float, float], eps: float, fused: bool
) -> torch.optim.AdamW:
    """AdamW with the fused kernel when asked and supported (CUDA, and CPU since torch 2.4)."""
    kwargs = {}
    if fused and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


def lr_at(tokens: int, peak: float, warmup: int, decay: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` tokens, then cosine decay to min_ratio·peak at `decay` tokens,
    constant after (GPT-3 §B). `tokens` counts the tokens trained on including the current step."""
    if warmup > 0 and tokens < warmup:
        return peak * tokens / warmup
    if tokens >= decay:
        return peak * min_ratio
    progress = (tokens - warmup) / max(decay - warmup, 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def accum_steps_at(tokens: int, micro_tokens: int, full: int, ramp_start: int | None, ramp_tokens: int) -> int:
    """Micro-batches in the step that starts after `tokens` tokens. With a ramp, the batch grows
    linearly from `ramp_start` tokens to the full batch over the first `ramp_tokens` tokens (GPT-3 §B:
    32k tokens up to the full value over the first 4-12B tokens), rounded to whole micro-batches."""
    if not ramp_start or ramp_tokens <= 0 or tokens >= ramp_tokens:
        return full
    target = ramp_start + (full * micro_tokens - ramp_start) * tokens / ramp_tokens
    return max(1, min(full, round(target / micro_tokens)))


def plan(
    micro_tokens: int,
    full: int,
    ramp_start: int | None,
    ramp_tokens: int,
    max_steps: int | None,
    max_tokens: int | None,
) -> tuple[int, int]:
    """(steps, tokens) of a run that stops at max_steps or at the first step reaching max_tokens."""
    if max_steps is None and max_tokens is None:
        raise ValueError("say how long to train: max_steps, max_tokens or a budget")
    if not ramp_start or ramp_tokens <= 0:
        step_tokens = micro_tokens * full
        if max_steps is None:
            steps = math.ceil(max_tokens / step_tokens)
        else:
            steps = max_steps if max_tokens is None else min(max_steps, math.ceil(max_tokens / step_tokens))
        return steps, steps * step_tokens
    steps = tokens = 0
    while (max_steps is None or steps < max_steps) and (max_tokens is None or tokens < max_tokens):
        tokens += micro_tokens * accum_steps_at(tokens, micro_tokens, full, ramp_start, ramp_tokens)
        steps += 1
    return steps, tokens
