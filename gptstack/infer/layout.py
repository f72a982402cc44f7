"""Decode layout: linear weights stored (in, out) for fast matrix-vector products on CPU.

During decoding each linear layer multiplies one row by its weight. On CPU the GEMV kernel runs
1.4-1.7× faster (2.8× for a 50k-vocabulary head) when the weight is stored (in, out), i.e. as
y = x @ W_t, than as nn.Linear's y = x @ W.T with W stored (out, in); for large batches the two
are equal (benchmarks/bench_model.py). HF's GPT-2 gets this layout from its Conv1D modules.

`decode_layout(model)` swaps every nn.Linear for a TransposedLinear holding a contiguous copy of
Wᵀ. It is an inference transform applied from outside the model, like quantization: the result is
frozen (no gradients) and is never what a checkpoint saves. A tied output head gets its own
transposed copy (vocab × width more memory); the embedding table keeps serving lookups.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gptstack.model import GPT


class TransposedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def decode_layout(model: GPT) -> GPT:
    """In place: every nn.Linear of `model` becomes a TransposedLinear. Returns the model (eval mode)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, TransposedLinear(child))
    return model.eval()
