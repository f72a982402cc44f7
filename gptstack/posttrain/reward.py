"""Reward models (InstructGPT step 2) and reward functions.

A reward model is the language model's backbone plus a scalar head read at the last token of
prompt + response (rendered with the chat template). It trains on preference pairs
{"prompt", "chosen", "rejected"[, "margin"]} with the Bradley-Terry loss
−log σ(r_chosen − r_rejected − margin) and reports held-out pair accuracy.

A reward for PPO is a weighted sum of components (GPT-4's rule-based rewards): reward models and
rule functions `f(prompt: str, response: str) -> float`, named by a spec such as
`rm:runs/x/reward`, `rule:gptstack.posttrain.demo:judge` or `0.8*rm:runs/x/reward+0.2*rule:pkg.mod:f`,
and RBRMs, `rbrm:CKPT[:RUBRIC]` (gptstack.safety.judges: an LM grades each response against a lettered
rubric; the term is the expected reward of the rubric's letters, e.g. `rm:runs/x/reward+0.5*rbrm:M.gguf:harmful`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptstack.checkpoint import CheckpointError, load_heads, load_model, read_meta
from gptstack.model import GPT
from gptstack.posttrain.common import (
    SkipRow,
    StageConfig,
    StageRun,
    load_start,
    max_len_of,
    maybe_lora,
    optimize,
    pad,
    read_jsonl,
    split,
)
from gptstack.safety.judges import build_rbrm


@dataclass
class RewardConfig(StageConfig):
    """reward model: scalar head at the last token, Bradley-Terry loss on preference pairs"""

    lr: float = 5e-5


class RewardModel(nn.Module):
    """backbone (GPT) + score head (D → 1) at each row's last token."""

    def __init__(self, backbone: GPT):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.tokenizer = backbone.tokenizer
        self.score_head = nn.Linear(backbone.config.n_embd, 1, device=backbone.lm_head.weight.device)
        nn.init.normal_(self.score_head.weight, std=1 / (backbone.config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.score_head.bias)

    def forward(self, seqs: list[list[int]]) -> Tensor:
        """Scores (B,) of token sequences."""
        idx = pad(seqs).to(self.score_head.weight.device)  # (B, T)
        last = torch.tensor([len(s) - 1 for s in seqs], device=idx.device)
        h, _ = self.backbone.features(idx)  # (B, T, D)
        return self.score_head(h[torch.arange(len(seqs), device=idx.device), last]).squeeze(-1).float()

    def heads(self) -> dict[str, Tensor]:
        return {f"score_head.{k}": v for k, v in self.score_head.state_dict().items()}

    def score_texts(self, prompts: list[str], responses: list[str]) -> Tensor:
        return self([render(self.tokenizer, p, r)[0] for p, r in zip(prompts, responses, strict=True)])


def render(tokenizer, prompt: str | list[dict], response: str) -> tuple[list[int], list[bool]]:
    """prompt + response in the chat template, ending with the end-of-turn token that closes the response
    (<|end|>, <|im_end|>): ids and the mask of the response's tokens. What a template writes after it
    (ChatML's "\n") is cut, so a reward model reads its score where PPO reads it: at the stop token that
    ends a sampled reply (the generation prompt's ids + the reply's)."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    ids, mask = tokenizer.encode_chat([*msgs, {"role": "assistant", "content": response}])
    end = max((i + 1 for i, m in enumerate(mask) if m), default=len(ids))  # after the last assistant token
    return ids[:end], mask[:end]


@dataclass
class Pair:
    """A preference pair in tokens: each response rendered after the prompt, with the mask of the
    tokens the assistant wrote (what DPO scores)."""

    chosen: list[int]
    chosen_mask: list[bool]
    rejected: list[int]
    rejected_mask: list[bool]
    margin: float = 0.0
    ref: tuple[float, float] | None = None  # DPO: the reference model's log p of each response


def parse_pair(tokenizer, row: dict, max_len: int) -> Pair:
    """A preference row {"prompt", "chosen", "rejected"[, "margin"]} as a Pair, or SkipRow."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen or not rejected:
        raise SkipRow("missing response")
    if chosen == rejected:
        raise SkipRow("equal responses")
    if not isinstance(prompt, (str, list)) or not prompt:
        raise SkipRow("missing prompt")
    margin = row.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise SkipRow("margin is not a number")
    if not math.isfinite(margin):  # JSON's NaN, Infinity or 1e999: one would make every weight NaN
        raise SkipRow("margin is not finite")
    try:
        (c, cm), (r, rm) = render(tokenizer, prompt, chosen), render(tokenizer, prompt, rejected)
    except ValueError:
        raise SkipRow("bad prompt messages") from None
    if max(len(c), len(r)) > max_len:
        raise SkipRow("longer than the context")
    return Pair(c, cm, r, rm, float(margin))


def bt_loss(rm: RewardModel, pairs: list[Pair]) -> tuple[Tensor, float, dict[str, float]]:
    """Summed Bradley-Terry loss over the pairs, their count, and metrics (sums)."""
    scores = rm([p.chosen for p in pairs] + [p.rejected for p in pairs])
    rc, rr = scores[: len(pairs)], scores[len(pairs) :]
    margin = torch.tensor([p.margin for p in pairs], device=scores.device)
    loss = -F.logsigmoid(rc - rr - margin).sum()
    return loss, len(pairs), {"loss": float(loss.detach()), "acc": float((rc > rr).sum())}


def train_reward(cfg: RewardConfig) -> dict:
    backbone = load_start(cfg)
    max_len = max_len_of(cfg, backbone)
    pairs, skipped = read_jsonl(cfg.data, lambda row: parse_pair(backbone.tokenizer, row, max_len))
    train, held = split(pairs, cfg.eval_fraction, cfg.seed)
    maybe_lora(backbone, cfg)
    rm = RewardModel(backbone)
    run = StageRun(cfg, "reward", backbone, heads=rm.heads, head_config={"kind": "reward"})
    steps = optimize(rm, train, lambda b: bt_loss(rm, b), run, (lambda: pair_metrics(rm, held)) if held else None)
    last = run.records[-1]
    summary = {
        "train_pairs": len(train), "eval_pairs": len(held), "skipped": sum(skipped.values()),
        **{f"skipped: {k}": v for k, v in skipped.items()}, "steps": steps, "train_loss": last["loss"],
        "train_acc": last["acc"], "eval_acc": last.get("eval_acc", float("nan")),
    }  # fmt: skip
    run.finish(summary, plots=[("accuracy", ["loss", "acc", "eval_acc"])])
    return summary


@torch.no_grad()
def pair_metrics(rm: RewardModel, pairs: list[Pair], batch: int = 64) -> dict[str, float]:
    total, correct = 0.0, 0.0
    for i in range(0, len(pairs), batch):
        loss, _, m = bt_loss(rm, pairs[i : i + batch])
        total, correct = total + float(loss), correct + m["acc"]
    return {"loss": total / len(pairs), "acc": correct / len(pairs)}


def load_reward_model(path: str | Path, device: str = "cpu") -> RewardModel:
    """A reward checkpoint (written by `gptstack reward`) as a RewardModel in eval mode."""
    _, meta = read_meta(path)
    if (meta.get("train") or {}).get("head", {}).get("kind") != "reward":
        raise CheckpointError(f"{path}: not a reward model checkpoint (no reward head)")
    rm = RewardModel(load_model(path, device=device))
    heads = load_heads(path)
    rm.score_head.load_state_dict({k.removeprefix("score_head."): v for k, v in heads.items()})
    return rm.eval()


# ---- reward functions -------------------------------------------------------------------------------

RewardFn = Callable[[list[str], list[str], list[list[int]]], Tensor]


class Reward:
    """Σ weight · component over (prompt text, response text, full token ids) triples.
    Reward models see the ids (prompt + response as sampled); rules see the texts."""

    def __init__(self, components: list[tuple[float, str, RewardFn]]):
        if not components:
            raise ValueError("a reward needs at least one component")
        self.components = components

    @property
    def models(self) -> list[RewardModel]:
        return [fn.rm for _, _, fn in self.components if isinstance(fn, _ModelFn)]

    def __call__(self, prompts: list[str], responses: list[str], ids: list[list[int]]) -> tuple[Tensor, dict]:
        total, parts = torch.zeros(len(prompts)), {}
        for w, name, fn in self.components:
            r = fn(prompts, responses, ids).float().cpu()
            parts[name] = float(r.mean())
            total += w * r
        return total, parts


class _ModelFn:
    def __init__(self, rm: RewardModel):
        self.rm = rm

    @torch.no_grad()
    def __call__(self, prompts, responses, ids) -> Tensor:
        return torch.cat([self.rm(ids[i : i + 64]) for i in range(0, len(ids), 64)])


class _JudgeFn:
    """A graded judge's expected rubric reward per (prompt, response) (an RBRM term)."""

    def __init__(self, judge):
        self.judge = judge

    def __call__(self, prompts, responses, ids) -> Tensor:
        rows = self.judge.judge([{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)])
        return torch.tensor([row["reward"] for row in rows])


def rule(spec: str) -> Callable[[str, str], float]:
    """`module:function`, imported (a function of (prompt, response) -> float)."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"rule {spec!r}: cannot import ({e}); expected module:function") from None
    if not callable(fn):
        raise ValueError(f"rule {spec!r} is not callable")
    return fn


def build_reward(spec: str, device: str = "cpu") -> Reward:
    """Parse `[w*]rm:PATH` / `[w*]rule:module:function` / `[w*]rbrm:CKPT[:RUBRIC]` terms joined by '+'."""
    components = []
    for term in spec.split("+"):
        term = term.strip()
        weight, star, body = term.partition("*")
        if not star:
            weight, body = "1", term
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"reward term {term!r}: weight {weight!r} is not a number") from None
        kind, _, target = body.partition(":")
        if kind == "rm":
            components.append((w, body, _ModelFn(load_reward_model(target, device))))
        elif kind == "rbrm":
            components.append((w, body, _JudgeFn(build_rbrm(target, device))))
        elif kind == "rule":
            fn = rule(target)
            components.append(
                (w, body, lambda p, r, ids, fn=fn: torch.tensor([fn(a, b) for a, b in zip(p, r, strict=True)]))
            )
        else:
            raise ValueError(f"reward term {term!r}: expected rm:PATH, rule:module:function or rbrm:CKPT[:RUBRIC]")
    return Reward(components)
