"""Training the predictable-scaling sweep (`gptstack scaling`): many small pretraining runs on one
shard folder, all with the same recipe, and a larger held-out run predicted before it is trained
(GPT-4 §3). The design (ScalingConfig, sweep_plan) and the fits are gptstack.eval.scaling's; this
module trains the runs, keeps the state file, and hands the losses to the fits:

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
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from gptstack.data.shards import read_manifest
from gptstack.eval.scaling import ScalingConfig, plot_scaling, predict, scaling_markdown, score_prediction, sweep_plan
from gptstack.report import write_section
from gptstack.train.config import TrainConfig
from gptstack.train.loop import pretrain


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
