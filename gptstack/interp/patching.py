"""Activation patching (causal tracing, Meng et al. 2022; TransformerLens's `patching`): run the
corrupted prompt, copy one activation in from the clean run, and see how much of the clean answer
comes back.

The metric is the target's logit at the last position, minus a distractor's when one is given (the
logit difference). The patching effect of (layer, position) is (m_patched − m_corrupt) / (m_clean −
m_corrupt): 1 where that residual carries everything that distinguishes the prompts, 0 where it
carries nothing. Each layer is one batched forward: row p of a batch of T corrupted copies gets the
clean activation at position p only. Patching every position of a residual stream point with the
clean run's values restores the clean output exactly (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptstack.interp.hooks import Hooks, run_with_cache
from gptstack.model import GPT

POINTS = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out")


class PatchError(ValueError):
    """Prompts that cannot be patched into each other, or a point that patching does not sweep."""


def metric(logits: Tensor, target: int, against: int | None) -> Tensor:
    """(B,) the target's last-position logit, minus the distractor's."""
    last = logits[:, -1].float()
    return last[:, target] - (last[:, against] if against is not None else 0.0)


def position_patch(clean: Tensor):
    """A patch that writes clean[0, p] into row p at position p: (T, T, D) batch, one position per row."""

    def fn(x: Tensor) -> Tensor:  # (T, T, D) corrupted copies
        x = x.clone()
        rows = torch.arange(x.size(0))
        x[rows, rows] = clean[0].to(x.dtype)
        return x

    return fn


def patch_sweep(
    model: GPT, clean: Tensor, corrupt: Tensor, target: int, against: int | None = None, point: str = "resid_pre"
) -> dict:
    """Patching effect for every (layer, position) of `point`, prompts (1, T) of equal length."""
    if clean.shape != corrupt.shape or clean.size(0) != 1:
        raise PatchError(f"clean and corrupted prompts must be one row of equal length, got {tuple(clean.shape)} "
                         f"and {tuple(corrupt.shape)} tokens: reword one of them")  # fmt: skip
    if point not in POINTS:
        raise PatchError(f"patching sweeps {', '.join(POINTS)}, not {point!r}")
    n, T = model.config.n_layer, clean.size(1)
    with torch.no_grad():
        logits_clean, cache = run_with_cache(model, clean, [f"blocks.*.{point}"])
        m_clean = float(metric(logits_clean, target, against)[0])
        m_corrupt = float(metric(model(corrupt), target, against)[0])
        batch = corrupt.expand(T, -1)
        effect = []
        for i in range(n):
            with Hooks(model, patches={f"blocks.{i}.{point}": position_patch(cache[f"blocks.{i}.{point}"])}):
                m = metric(model(batch), target, against)  # (T,)
            effect.append(((m - m_corrupt) / (m_clean - m_corrupt + 1e-12)).tolist())
    return {"point": point, "metric_clean": m_clean, "metric_corrupt": m_corrupt, "effect": effect}
