"""Decode layout: linear layers that run batch-1 decoding through the C GEMV kernel.

During decoding each linear layer multiplies one row by its weight, which is bound by memory
bandwidth; the BLAS GEMV behind F.linear leaves much of it unused on CPU (see transforms/kernels.py).
`decode_layout(model)` swaps every nn.Linear for a DecodeLinear holding the same weight tensor (no
copy; a tied output head stays tied). On CPU a single row goes through `kernels.gemv` and up to
`kernels.SMALL_M` rows through `kernels.gemm` (csrc/gemm.c, register-tiled); larger inputs (prefill, big batches)
and GPU go through F.linear. Which of the C GEMV and BLAS runs one row is chosen per weight shape by measurement,
once per process (`gemv_wins`): on SmolLM2's 576-wide shapes BLAS was the faster on some and the slower on others
(issue 20). It is an inference transform applied from outside the model, like quantization: the result is frozen
and is never what a checkpoint saves.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptstack.model import GPT
from gptstack.transforms import kernels

_GEMV_WINS: dict[tuple[int, int], bool] = {}  # weight shape (N, K) → the C GEMV beat BLAS there (measured once)


def _best_time(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemv_wins(x: Tensor, w: Tensor) -> bool:
    """Whether the C GEMV is faster than F.linear for one row x (1, K) against w (N, K): timed on first use."""
    key = tuple(w.shape)
    if key not in _GEMV_WINS:
        _GEMV_WINS[key] = _best_time(lambda: kernels.gemv(x, w)) <= _best_time(lambda: F.linear(x, w))
    return _GEMV_WINS[key]


class DecodeLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # (out, in), shared with the original module
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        M = x2.size(0)
        small = M <= kernels.SMALL_M and x2.device.type == "cpu" and not torch.is_grad_enabled()
        if small and (M > 1 or kernels.library() is None or gemv_wins(x2, self.weight)):
            y = kernels.gemv(x2, self.weight) if M == 1 else kernels.gemm(x2.contiguous(), self.weight)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x2, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def replace_linears(model: nn.Module, make) -> nn.Module:
    """In place: every nn.Linear child `lin` of `model` becomes make(lin)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))
    return model


@torch.no_grad()
def decode_layout(model: GPT) -> GPT:
    """In place: every nn.Linear of `model` becomes a DecodeLinear. Returns the model (eval mode)."""
    model.requires_grad_(False)
    return replace_linears(model, DecodeLinear).eval()
