"""The predictable-scaling sweep (`gptstack scaling`): many small pretraining runs on one shard folder,
all with the same recipe, and a larger held-out run predicted before it is trained (GPT-4 §3).

- a ladder of widths at a fixed tokens-per-parameter ratio r (D = r·N), giving the compute frontier
  that `L(C) = a·C^-α + L∞` is fitted to (C = 6·N·D training FLOPs, N the matmul parameters);
- a few extra runs of the middle widths at other ratios, so `L(N, D) = E + A/N^α + B/D^β` (Chinchilla
  form) is identifiable (on one ray D = r·N the N and D terms cannot be told apart);
- a held-out model with `heldout_compute` times the compute of the largest fitted run: both fits
  (gptstack.eval.scaling) predict its loss first, then it is trained and the errors are reported.

Losses are the validation loss (nats/token) on the same held-out windows for every run. The state
file `out`/scaling.json is rewritten after every run, so a killed sweep resumes where it stopped and a
rerun reuses every finished run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from gptstack.config import ModelConfig
from gptstack.data.shards import read_manifest
from gptstack.eval.scaling import plot_scaling, predict, scaling_markdown, score_prediction
from gptstack.model import count_params
from gptstack.report import write_section
from gptstack.train.loop import TrainConfig, pretrain


@dataclass
class ScalingConfig:
    data: str = ""  # shard folder
    out: str = "runs/scaling"  # sweep folder (a rerun reuses finished runs)
    widths: list[int] = field(default_factory=lambda: [24, 32, 48, 64, 96])  # n_embd of the ladder
    n_layer: int = 2  # layers of every model
    head_dim: int = 8  # n_head = width // head_dim
    pos: str = "rope"  # learned positions make copying (induction) appear late and at one size only: a kink
    context: int = 128  # training window in tokens
    tokens_per_param: float = 10.0  # D/N of the ladder and the held-out run
    extra_ratios: list[float] = field(default_factory=lambda: [2.5, 40.0])  # other D/N, at the middle widths
    heldout_compute: float = 4.0  # held-out compute / the largest fitted run's compute
    batch_size: int = 4  # × context tokens per step: the smallest runs still take hundreds of steps
    lr: float = 3e-3  # peak learning rate
    eval_batches: int = 300  # × batch_size × context tokens of the val split: ~300k, so the loss is not a few files
    seed: int = 1337  # initialisation and data order of every run
    progress: bool = True  # a progress bar over the sweep's FLOPs

    def model(self, width: int, vocab: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab, block_size=self.context, n_layer=self.n_layer, n_embd=width,
                           n_head=max(1, width // self.head_dim), dropout=0.0, pos=self.pos)  # fmt: skip


def sweep_plan(cfg: ScalingConfig, vocab: int) -> list[dict]:
    """The runs: (name, width, N, D, C, role) with role ladder | extra | heldout."""
    runs = []
    for w in cfg.widths:
        n = count_params(cfg.model(w, vocab))["matmul"]
        runs.append(dict(name=f"w{w}-r{cfg.tokens_per_param:g}", width=w, N=n, D=int(cfg.tokens_per_param * n),
                         role="ladder"))  # fmt: skip
    middle = cfg.widths[len(cfg.widths) // 2 - 1 : len(cfg.widths) // 2 + 1]
    for w, r in itertools.product(middle, cfg.extra_ratios):
        n = count_params(cfg.model(w, vocab))["matmul"]
        runs.append(dict(name=f"w{w}-r{r:g}", width=w, N=n, D=int(r * n), role="extra"))
    c_max = max(6 * r["N"] * r["D"] for r in runs)
    # the held-out width: the smallest multiple of head_dim whose ladder run has ≥ heldout_compute × c_max
    w = cfg.widths[-1]
    while True:
        w += cfg.head_dim
        n = count_params(cfg.model(w, vocab))["matmul"]
        if 6 * n * cfg.tokens_per_param * n >= cfg.heldout_compute * c_max:
            break
    runs.append(dict(name=f"w{w}-r{cfg.tokens_per_param:g}", width=w, N=n, D=int(cfg.tokens_per_param * n),
                     role="heldout"))  # fmt: skip
    for r in runs:
        r["C"] = 6.0 * r["N"] * r["D"]
    return runs


def train_run(cfg: ScalingConfig, run: dict, vocab: int) -> dict:
    """Pretrain one run of the plan to its D tokens: the run with its val loss, tokens and seconds."""
    out = Path(cfg.out) / run["name"]
    tc = TrainConfig(
        data=cfg.data, out=str(out), model=cfg.model(run["width"], vocab).to_dict(), batch_size=cfg.batch_size,
        seq_len=cfg.context, max_tokens=run["D"], lr=cfg.lr, warmup_tokens=max(1, run["D"] // 20),
        checkpoint_every=0, checkpoint_minutes=0, keep_checkpoints=1, eval_every=0, eval_batches=cfg.eval_batches,
        sample_prompts=[], seed=cfg.seed, progress=False, tensorboard=False,
    )  # fmt: skip
    start = time.perf_counter()
    summary = pretrain(tc)
    return {**run, "loss": summary["val_loss"], "tokens": summary["tokens"], "seconds": time.perf_counter() - start}


def run_sweep(cfg: ScalingConfig) -> dict:
    """Train the sweep (runs already in `out`/scaling.json are reused), fit, predict, train the held-out
    run, and write scaling.json, scaling.png and a report section."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = -(-read_manifest(cfg.data)["tokenizer"]["n_vocab"] // 64) * 64  # rounded up to a multiple of 64
    plan = sweep_plan(cfg, vocab)
    state_file = out / "scaling.json"
    done = {r["name"]: r for r in json.loads(state_file.read_text())["runs"]} if state_file.is_file() else {}
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}  # what the runs depend on
    results: dict = {"config": config, "runs": []}
    bar = tqdm(total=sum(r["C"] for r in plan), unit="FLOP", unit_scale=True, desc="scaling", disable=not cfg.progress)
    for run in plan:
        if run["role"] == "heldout":  # predict before training it
            results |= predict(results["runs"], run)
        results["runs"].append(done.get(run["name"]) or train_run(cfg, run, vocab))
        state_file.write_text(json.dumps(results, indent=2) + "\n")  # a killed sweep resumes from here
        bar.update(run["C"])
    bar.close()
    score_prediction(results["prediction"], results["runs"][-1]["loss"])
    state_file.write_text(json.dumps(results, indent=2) + "\n")
    plot_scaling(results, out / "scaling.png")
    write_section(out / "report.md", "scaling", scaling_markdown(results) + "\n\n![scaling fit](scaling.png)")
    return results
