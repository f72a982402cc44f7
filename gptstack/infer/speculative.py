"""Speculative decoding: the rejection-sampling rule and prompt-lookup (n-gram) drafting.

A drafter proposes k tokens d_1..d_k with distributions q_1..q_k; the target scores all of them in
one forward, giving p_1..p_{k+1}. Token d_i is accepted with probability min(1, p_i(d_i)/q_i(d_i));
at the first rejection a replacement is drawn from norm(max(0, p_i - q_i)); when all k are accepted
a bonus token is drawn from p_{k+1}. Each emitted token is then distributed exactly as p (Leviathan
et al. 2023, Chen et al. 2023). A deterministic drafter (prompt lookup) has q one-hot on its
proposal, so the rule accepts d_i with probability p_i(d_i) and otherwise samples p_i without d_i.
Under greedy decoding p is one-hot too, and the rule keeps d_i exactly when it is the argmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptstack.infer.sampling import SamplingParams, draw


def accept(draft: list[int], q: Tensor | None, p: Tensor, generator: torch.Generator | None) -> tuple[list[int], int]:
    """draft: k proposed ids; q (k, V) their draft distributions (None: a deterministic drafter);
    p (k+1, V) the target's. Returns (the emitted tokens: the accepted prefix plus one more, the
    number of draft tokens accepted)."""
    out: list[int] = []
    for i, d in enumerate(draft):
        q_d = 1.0 if q is None else float(q[i, d])
        p_d = float(p[i, d])
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if q_d > 0 and u < p_d / q_d:  # accepted (always when p_d >= q_d)
            out.append(d)
            continue
        residual = p[i].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (residual - q[i]).clamp_(min=0.0)
        total = float(residual.sum())
        # p == q (up to rounding) leaves no residual mass; then p itself is the right distribution
        out.append(draw(residual / total if total > 1e-12 else p[i], generator))
        return out, i
    out.append(draw(p[len(draft)], generator))
    return out, len(draft)


def plain_greedy(params: SamplingParams) -> bool:
    """Greedy without penalties: drafts and verification reduce to argmaxes (no distributions, no draws)."""
    return params.greedy and not params.penalised


def accept_greedy(draft: list[int], targets: list[int]) -> tuple[list[int], int]:
    """The rule under greedy decoding, where p and q are one-hot: targets (k+1) are the target's argmax
    after each draft prefix. Keeps the longest prefix of the draft that agrees with them, then the
    target's own token; returns (emitted tokens, accepted count) as accept() does."""
    a = 0
    while a < len(draft) and draft[a] == targets[a]:
        a += 1
    return [*draft[:a], targets[a]], a


def ngram_propose(tokens: list[int], k: int, n_max: int = 4, n_min: int = 1) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (longest n
    first) and propose the (up to) k tokens that followed it. [] when nothing matches."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        tail = tokens[L - n :]
        for start in range(L - n - 1, -1, -1):  # latest match first; it must leave a continuation
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []
