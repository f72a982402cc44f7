"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO and conservative variants.

With h = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)] (sums over the
response's tokens):
- `sigmoid` (DPO):  −log σ(β h); with label_smoothing ε > 0 it is conservative DPO (cDPO):
  −(1−ε) log σ(β h) − ε log σ(−β h), for preference labels flipped with probability ε;
- `ipo` (Azar et al. 2023): (h − 1/(2β))².
The reference log-probabilities are computed once, before training, with the starting model, so no
reference model is held in memory. The implicit rewards β·(log π − log π_ref) are logged: their
accuracy (chosen above rejected) starts at chance and is the stage's headline metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gptstack.model import GPT
from gptstack.posttrain.common import (
    StageConfig,
    StageRun,
    chunks,
    load_start,
    max_len_of,
    maybe_lora,
    optimize,
    read_jsonl,
    sequence_logprobs,
    split,
)
from gptstack.posttrain.reward import Pair, parse_pair

LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(StageConfig):
    """direct preference optimisation (sigmoid = DPO / cDPO with label smoothing, ipo)"""

    beta: float = 0.1  # β: strength of the implicit KL to the reference
    loss: str = "sigmoid"  # sigmoid (DPO, cDPO with label_smoothing) | ipo
    label_smoothing: float = 0.0  # cDPO's ε
    lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def pair_logprobs(model: GPT, pairs: list[Pair]) -> tuple[Tensor, Tensor]:
    """log π of the chosen and rejected responses, (B,) each, in one forward pass."""
    lp = sequence_logprobs(
        model, [p.chosen for p in pairs] + [p.rejected for p in pairs],
        [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs],
    )  # fmt: skip
    return lp[: len(pairs)], lp[len(pairs) :]


@torch.no_grad()
def attach_reference(model: GPT, pairs: list[Pair], batch: int = 32) -> None:
    """Store the (frozen) starting model's log-probabilities in each pair."""
    model.eval()
    for group in chunks(pairs, batch):
        c, r = pair_logprobs(model, group)
        for p, a, b in zip(group, c.tolist(), r.tolist(), strict=True):
            p.ref = (a, b)


def dpo_losses(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and the implicit rewards of chosen and rejected, from policy (pc, pr) and
    reference (rc, rr) log-probabilities, all (B,)."""
    h = (pc - rc) - (pr - rr)
    if loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_loss(model: GPT, pairs: list[Pair], cfg: DPOConfig) -> tuple[Tensor, float, dict[str, float]]:
    pc, pr = pair_logprobs(model, pairs)
    rc = torch.tensor([p.ref[0] for p in pairs], device=pc.device)
    rr = torch.tensor([p.ref[1] for p in pairs], device=pc.device)
    losses, wc, wr = dpo_losses(pc, pr, rc, rr, cfg.beta, cfg.loss, cfg.label_smoothing)
    acc = (wc > wr).float() + 0.5 * (wc == wr).float()  # ties (step 0: policy = reference) count half
    return losses.sum(), len(pairs), {
        "loss": float(losses.sum().detach()), "reward_acc": float(acc.sum()), "reward_margin": float((wc - wr).sum()),
        "reward_chosen": float(wc.sum()), "reward_rejected": float(wr.sum()),
    }  # fmt: skip


def dpo(cfg: DPOConfig) -> dict:
    model = load_start(cfg)
    max_len = max_len_of(cfg, model)
    pairs, skipped = read_jsonl(cfg.data, lambda row: parse_pair(model.tokenizer, row, max_len))
    train, held = split(pairs, cfg.eval_fraction, cfg.seed)
    attach_reference(model, pairs)
    maybe_lora(model, cfg)
    run = StageRun(cfg, "dpo", model)

    def evaluate() -> dict[str, float]:
        sums, n = {}, 0
        for group in chunks(held, cfg.batch_size):
            _, k, m = dpo_loss(model, group, cfg)
            n += k
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + v
        return {k: v / n for k, v in sums.items()}

    initial = evaluate() if held else {}
    steps = optimize(model, train, lambda b: dpo_loss(model, b, cfg), run, evaluate if held else None)
    last = run.records[-1]
    summary = {
        "train_pairs": len(train), "eval_pairs": len(held), "skipped": sum(skipped.values()),
        **{f"skipped: {k}": v for k, v in skipped.items()}, "loss_type": cfg.loss, "beta": cfg.beta, "steps": steps,
        "initial_eval_loss": initial.get("loss", float("nan")), "eval_loss": last.get("eval_loss", float("nan")),
        "initial_eval_reward_acc": initial.get("reward_acc", float("nan")),
        "eval_reward_acc": last.get("eval_reward_acc", float("nan")), "train_reward_acc": last["reward_acc"],
    }  # fmt: skip
    run.finish(summary, plots=[("rewards", ["loss", "reward_acc", "eval_reward_acc", "reward_margin"])])
    return summary
