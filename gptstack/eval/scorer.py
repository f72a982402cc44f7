"""The floor of evaluation: scoring a model with the three requests every evaluation reduces to
(lm-eval's interface). Tasks, perplexity and the lm-eval adapter are built on it; it imports nothing
else of gptstack.eval.

    scorer = Scorer(model, tokenizer)          # or load_scorer(checkpoint)
    scorer.loglikelihood([(context_ids, continuation_ids), ...])      # → [(sum log p, is_greedy), ...]
    scorer.loglikelihood_rolling(ids)                                  # → sum log p of every token
    scorer.generate_until(prompts, stop=["\\n\\n"], max_gen_tokens=256) # → greedy texts (inference engine)

Log-likelihood requests are sorted by length and batched by a token budget, right-padded (padding sits
after every real token, so causal attention never sees it), and the head is computed only at the positions
that predict a continuation token. A request longer than the context loses tokens from the
left of its context; `truncated` counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptstack.checkpoint import load_model
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.model import GPT

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def rolling_windows(tokens: list[int], prefix: int, max_len: int, stride: int | None = None):
    """lm-eval's loglikelihood_rolling windows: every token is predicted exactly once, the first from
    `prefix` (prefix_id: BOS or end-of-text) alone, each window's input at most `max_len` tokens.
    `stride` (≤ max_len): tokens newly predicted per window, the rest of the window being context
    (stride = max_len: disjoint windows, lm-eval's default; a smaller stride gives each token more
    context at more compute). Yields (input ids, the tokens its last positions predict)."""
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, {max_len}], got {stride}")
    seq = [prefix, *tokens]
    start = 0  # index into tokens of the next token to predict
    while start < len(tokens):
        end = min(start + stride, len(tokens))
        lo = max(0, end - max_len)
        yield seq[lo:end], tokens[start:end]  # seq[lo:end] predicts seq[lo+1 : end+1], which ends in these
        start = end


def prefix_id(tokenizer) -> int:
    """What a text with no context is predicted from: BOS for a model whose tokenizer starts every
    sequence with it (Gemma: lm-eval's HF backend uses its prefix_token_id, BOS, there), else end-of-text."""
    return tokenizer.bos_prefix[0] if tokenizer.bos_prefix else tokenizer.eot_id


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Token ids of a (context, continuation) pair as lm-eval's HF backend encodes them: the context's
    trailing whitespace moves to the continuation, the whole text is encoded and split after the
    context's tokens (so the continuation is tokenized as it would be in running text); the context
    opens with the tokenizer's bos_prefix, and an empty context is prefix_id alone."""
    if not context:
        return [prefix_id(tokenizer)], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    cont = whole[len(ctx) :] or tokenizer.encode(continuation)  # (merged into the context's last token)
    return [*tokenizer.bos_prefix, *ctx], cont


BATCH_TOKENS = 8192  # tokens per scoring batch: the one default of the scorer, EvalConfig and the lm-eval model
MAX_GEN_TOKENS = 256  # bound on generated tokens (GSM8K, HumanEval): likewise


class Scorer:
    """Batched log-likelihoods and greedy generation for one model and tokenizer."""

    def __init__(
        self, model: GPT, tokenizer, batch_tokens: int = BATCH_TOKENS, max_batch: int = 64, progress: bool = False
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context = model.config.block_size
        self.device = model.transformer.wte.weight.device
        self.batch_tokens, self.max_batch, self.progress = batch_tokens, max_batch, progress
        self.truncated = 0  # requests that lost context tokens on the left
        self.scored_tokens = 0  # continuation tokens scored
        self.forward_tokens = 0  # tokens run through the model (padding excluded)

    # ---- log-likelihood ----------------------------------------------------------------------------

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
        """The model input (context + continuation minus its last token) and the continuation length,
        truncated from the left to the context window."""
        if not cont:
            raise ValueError("a continuation must have at least one token")
        if not ctx:
            raise ValueError("a context must have at least one token (use end-of-text for none)")
        full = ctx + cont
        if len(full) - 1 > self.context:
            self.truncated += 1
            full = full[-(self.context + 1) :]
        return full[:-1], min(len(cont), len(full) - 1)

    @torch.no_grad()
    def _score(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool, list[float]]]:
        """One batch: for each row, the log-probs of `targets` (the last len(target) positions)."""
        B, T = len(inputs), max(len(x) for x in inputs)
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(x)
        n = max(len(t) for t in targets)
        at = torch.zeros(B, n, dtype=torch.long)  # (B, n): the positions whose next token is a target
        for i, (x, t) in enumerate(zip(inputs, targets, strict=True)):
            at[i] = torch.arange(len(x) - len(t), len(x) - len(t) + n).clamp(max=len(x) - 1)
        logits = self.model(ids.to(self.device), logits_at=at.to(self.device))  # (B, n, V): the head runs on these only
        logp = F.log_softmax(logits.float(), dim=-1)
        out = []
        for i, t in enumerate(targets):
            rows = logp[i, : len(t)]  # (len(t), V)
            tgt = torch.tensor(t, device=self.device)
            lp = rows.gather(1, tgt[:, None])[:, 0]
            out.append((lp.sum().item(), bool((rows.argmax(-1) == tgt).all()), lp.tolist()))
        self.scored_tokens += sum(len(t) for t in targets)
        self.forward_tokens += sum(len(x) for x in inputs)
        return out

    def _batched(self, inputs: list[list[int]], targets: list[list[int]], desc: str) -> list:
        """_score over batches of at most `batch_tokens` tokens (and `max_batch` rows), in input order."""
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # longest first: padding is minimal
        results: list = [None] * len(inputs)
        bar = tqdm(total=len(inputs), desc=desc, unit="req", disable=not self.progress, leave=False)
        i = 0
        while i < len(order):
            width = len(inputs[order[i]])
            n = max(1, min(self.max_batch, self.batch_tokens // width))
            chunk = order[i : i + n]
            for j, r in zip(chunk, self._score([inputs[j] for j in chunk], [targets[j] for j in chunk]), strict=True):
                results[j] = r
            i += n
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(self, requests: Sequence[Request], per_token: bool = False) -> list:
        """Σ log p(continuation | context) and whether greedy decoding would produce the continuation,
        per request (+ the per-token log-probs with per_token=True)."""
        fitted = [self._fit(list(c), list(x)) for c, x in requests]
        inputs = [inp for inp, _ in fitted]
        targets = [(list(c) + list(x))[-n:] for (c, x), (_, n) in zip(requests, fitted, strict=True)]
        results = self._batched(inputs, targets, "loglikelihood")
        return [r if per_token else r[:2] for r in results]

    def loglikelihood_rolling(self, tokens: list[int], stride: int | None = None) -> float:
        """Σ log p over every token of a document (its ids without BOS), with windows of the model's
        context (see rolling_windows); the first token is predicted from prefix_id (BOS or end-of-text),
        so for Gemma this is transformers' loss on tokenizer(text), BOS first."""
        return sum(self.loglikelihood_rolling_batch([tokens], stride)[0])

    def loglikelihood_rolling_batch(self, docs: list[list[int]], stride: int | None = None) -> list[list[float]]:
        """Per document, the log-prob of each of its tokens (windows of all documents batched together)."""
        inputs, targets, owner = [], [], []
        for d, tokens in enumerate(docs):
            for inp, tgt in rolling_windows(tokens, prefix_id(self.tokenizer), self.context, stride):
                inputs.append(inp)
                targets.append(tgt)
                owner.append(d)
        results = self._batched(inputs, targets, "rolling")
        per_doc: list[list[float]] = [[] for _ in docs]
        for d, r in zip(owner, results, strict=True):
            per_doc[d].extend(r[2])
        return per_doc

    # ---- generation --------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[list[int]], stop: Sequence[str] = (), max_gen_tokens: int = MAX_GEN_TOKENS
    ) -> list:
        """Greedy continuations through the inference engine (continuous batching), cut at the first
        stop string, at most `max_gen_tokens` tokens each, so a generation that never stops is bounded.
        Prompts longer than the context minus `max_gen_tokens` lose tokens on the left (counted).
        Returns engine Completions (text, token_ids, finish_reason "stop" | "length")."""
        fitted = self.fit_prompts(prompts, max_gen_tokens)
        engine = Engine(self.model, EngineConfig(max_seqs=min(32, max(1, len(fitted)))), tokenizer=self.tokenizer)
        return engine.generate(fitted, SamplingParams(temperature=0.0, max_tokens=max_gen_tokens, stop=tuple(stop)))

    def fit_prompts(self, prompts: Sequence[list[int]], max_gen_tokens: int) -> list[list[int]]:
        """Prompts cut from the left (counted in `truncated`) to leave `max_gen_tokens` of the context."""
        if max_gen_tokens >= self.context:
            raise ValueError(
                f"max_gen_tokens {max_gen_tokens} leaves no room for a prompt in a {self.context}-token context"
            )
        room = self.context - max_gen_tokens
        fitted = []
        for p in prompts:
            if len(p) > room:
                self.truncated += 1
                p = p[-room:]
            fitted.append(list(p))
        return fitted

    def generate_until(
        self, prompts: Sequence[list[int]], stop: Sequence[str] = (), max_gen_tokens: int = MAX_GEN_TOKENS
    ) -> list[str]:
        """The texts of generate()."""
        return [c.text for c in self.generate(prompts, stop, max_gen_tokens)]


def load_scorer(checkpoint: str | Path, tokenizer=None, device: str = "cpu", **kwargs) -> Scorer:
    """A Scorer over a checkpoint; `tokenizer` (a spec or Tokenizer) overrides the one it names."""
    model = load_model(checkpoint, device=device, tokenizer=tokenizer, require_tokenizer=True)
    return Scorer(model, model.tokenizer, **kwargs)
