"""Sampling the next token: penalties, temperature, top-k, top-p (nucleus), min-p; greedy at 0.

The order is the one vLLM and HF apply: repetition penalty (over prompt and output tokens, CTRL's
divide-positive/multiply-negative rule), presence and frequency penalties (over output tokens, as
OpenAI defines them), temperature, then the min-p, top-k and top-p filters. Greedy (temperature 0)
takes the argmax of the penalised logits. Log-probabilities reported with tokens are those of the
model (log-softmax of the raw logits), not of the filtered distribution, as OpenAI's API reports.

Sampling draws with the exponential race (argmax of p_i / E_i, E_i ~ Exp(1) from the request's own
generator): exactly a draw from p, and a request's draws depend only on its seed, never on which
other requests share its batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 → greedy
    top_k: int | None = None  # None: no top-k filter
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens below min_p × the most likely token's probability
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # >1 discourages tokens of the prompt and the output
    seed: int | None = None  # the request's own generator (none: random)
    max_tokens: int = 64  # tokens to generate at most
    stop: tuple[str, ...] = ()  # stop strings (need the engine's tokenizer); not part of the text
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's end tokens
    ignore_eos: bool = False  # keep generating past the end tokens
    logprobs: int | None = None  # report each sampled token's log-probability and the top-n alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token (OpenAI's echo)

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if getattr(self, name) != getattr(self, name):  # NaN passes every comparison above as False
                raise ValueError(f"{name} must be a number, got NaN")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def filter_logits(logits: Tensor, top_k: int | None, top_p: float, min_p: float = 0.0) -> Tensor:
    """logits (B, V) with everything outside the min-p set, the top-k and the top-p nucleus set to -inf."""
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def penalise(logits: Tensor, params: SamplingParams, output_counts: Tensor | None, seen: Tensor | None) -> Tensor:
    """logits (V,) float; output_counts (V,) occurrences in the generated tokens; seen (V,) bool over
    prompt and output tokens. Returns new logits."""
    if params.repetition_penalty != 1.0 and seen is not None:
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if output_counts is not None and (params.presence_penalty or params.frequency_penalty):
        counts = output_counts.to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def distribution(logits: Tensor, params: SamplingParams) -> Tensor:
    """The sampling distribution (V,) fp32 of penalised logits (V,): one-hot on the argmax when greedy."""
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(0, logits.argmax().view(1), 1.0)
    return distributions(logits[None], params)[0]


def distributions(logits: Tensor, params: SamplingParams) -> Tensor:
    """The sampling distributions (B, V) fp32 of rows of logits (B, V) sharing one temperature (> 0) and filter.
    Every operation is row-wise, so a row's distribution is the one `distribution` gives it alone."""
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p, params.min_p)
    return scaled.softmax(dim=-1)


def draw(probs: Tensor, generator: torch.Generator | None) -> int:
    """One token from the distribution probs (V,) by the exponential race."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / race).argmax())


class Sampler:
    """One sequence's sampling state: its params, its own generator, and the token counts the
    penalties need. The engine keeps one per request and `generate()` one per call, so both sample
    through the same `penalise → distribution → draw` path. `allowed` (V,) bool: ids that may be
    produced (Tokenizer.decodable_mask); the others are masked before anything else."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab: int, device, allowed: Tensor | None = None):
        self.params, self.allowed = params, allowed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(7)))
        self.counts = torch.zeros(vocab, dtype=torch.int32, device=device) if params.penalised else None  # (V,)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device) if params.repetition_penalty != 1 else None
        if self.seen is not None and prompt:
            self.seen[torch.tensor(prompt, device=device)] = True

    def probs(self, logits: Tensor, history: list[int] = ()) -> Tensor:
        """The sampling distribution (V,) fp32 for logits (V,), after `history` more tokens than were
        observed (speculative drafts score positions past the sequence's end)."""
        p = self.params
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed, float("-inf"))
        if p.penalised:
            counts, seen = self.counts, self.seen
            if history:
                extra = torch.tensor(history, device=logits.device)
                if counts is not None:
                    counts = counts.clone().index_add_(0, extra, torch.ones_like(extra, dtype=counts.dtype))
                if seen is not None:
                    seen = seen.clone().index_fill_(0, extra, True)
            logits = penalise(logits, p, counts, seen)
        return distribution(logits, p)

    def sample(self, logits: Tensor) -> int:
        """The next token for logits (V,); greedy without penalties is a plain argmax."""
        if self.params.greedy and not self.params.penalised:
            if self.allowed is not None:
                logits = logits.masked_fill(~self.allowed, float("-inf"))
            return int(logits.argmax())
        return draw(self.probs(logits), self.generator)

    def observe(self, token: int) -> None:
        """Record a token that joined the output (for the penalties)."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True


def sample_rows(samplers: list[Sampler], logits: Tensor) -> list[int]:
    """The next token of every row of logits (B, V), row i by samplers[i]: the same tokens (and the same draws
    from each request's generator) as [s.sample(row) for s, row in zip(samplers, logits)], with the work over the
    vocabulary done once per group of rows: all greedy rows in one argmax, the sampled rows sharing temperature,
    top-k, top-p and min-p in one filter and softmax, and one argmax of the exponential race. Rows with penalties
    or an `allowed` mask (state of their own) go through their sampler one by one."""
    tokens = [0] * len(samplers)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samplers):
        p = s.params
        if p.penalised or s.allowed is not None:
            key: tuple = ("alone", i)
        else:
            key = ("greedy",) if p.greedy else (p.temperature, p.top_k, p.top_p, p.min_p)
        groups.setdefault(key, []).append(i)
    for key, rows in groups.items():
        if key[0] == "alone":
            tokens[rows[0]] = samplers[rows[0]].sample(logits[rows[0]])
            continue
        sub = logits[torch.tensor(rows, device=logits.device)]  # (b, V)
        if key[0] == "greedy":
            picked = sub.argmax(dim=-1)
        else:
            probs = distributions(sub, samplers[rows[0]].params)  # (b, V)
            race = torch.empty_like(probs)
            for r, i in enumerate(rows):  # each request's own generator, as `draw` uses it
                race[r].exponential_(generator=samplers[i].generator)
            picked = (probs / race).argmax(dim=-1)
        for i, t in zip(rows, picked.tolist(), strict=True):
            tokens[i] = t
    return tokens


def top_logprobs(logprobs: Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """logprobs (V,): the token's log-probability and the n most likely (id, log-probability) pairs."""
    top = logprobs.topk(n) if n > 0 else None
    pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return float(logprobs[token]), pairs
