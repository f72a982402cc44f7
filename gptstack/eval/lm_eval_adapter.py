"""gptstack checkpoints as an lm-eval model (`pip install lm-eval`; optional).

    python -m gptstack.eval.lm_eval_adapter run --model gptstack \\
        --model_args checkpoint=runs/x/checkpoints/latest,batch_tokens=8192 --tasks my_task --include_path tasks/

(lm-eval's own command line, with this module imported first), or from Python:
`lm_eval.simple_evaluate(model=GPTStackLM(checkpoint=...), tasks=[...])`. Importing this module
registers the model name "gptstack". Scoring runs through the same Scorer as `gptstack eval`, and
pairs are encoded the same way, so both give the same per-item log-likelihoods. As lm-eval's HF backend
does for a model whose tokenizer adds BOS (Gemma), a context opens with BOS and an empty context is BOS
(`prefix_token_id`); a rolling document is its ids without BOS, predicted from the prefix (the HF backend
also scores a second BOS there, lm-eval issue #3333; we do not).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from gptstack.eval.scorer import BATCH_TOKENS, MAX_GEN_TOKENS, Scorer, load_scorer, prefix_id


@register_model("gptstack")
class GPTStackLM(TemplateLM):
    def __init__(
        self, checkpoint: str | None = None, tokenizer: str | None = None, device: str = "cpu",
        batch_tokens: int = BATCH_TOKENS, scorer: Scorer | None = None, **_: object,
    ) -> None:  # fmt: skip
        super().__init__()
        if scorer is None:
            if not checkpoint:
                raise ValueError("the gptstack model needs model_args checkpoint=PATH")
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm-eval passes cuda by default; its HF backend falls back the same way
            scorer = load_scorer(checkpoint, tokenizer, device=device, batch_tokens=int(batch_tokens))
        self.scorer = scorer
        self.tokenizer = scorer.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self.scorer.context

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The ids of `string`, BOS first where the tokenizer adds one, unless add_special_tokens=False."""
        return self.tokenizer.encode(string) if add_special_tokens is False else self.tokenizer.encode_prompt(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # requests: [((context, continuation), context ids, continuation ids), ...]
        return self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tokenizer.encode(req.args[0]) for req in requests]
        return [sum(lp) for lp in self.scorer.loglikelihood_rolling_batch(docs)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy, grouped by generation settings (`until`, `max_gen_toks`); sampling settings ignored."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            kw = req.args[1] if len(req.args) > 1 else {}
            until = kw.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            groups[(until, int(kw.get("max_gen_toks", MAX_GEN_TOKENS)))].append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_tokens), idx in groups.items():
            prompts = [self.tokenizer.encode_prompt(requests[i].args[0]) or [self.eot_token_id] for i in idx]
            max_tokens = min(max_tokens, self.scorer.context - 1)
            for i, text in zip(idx, self.scorer.generate_until(prompts, until, max_tokens), strict=True):
                out[i] = text
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
