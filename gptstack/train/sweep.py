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

Losses are the validation loss (nats/token) on the same held-out windows for every run. With
`capability` families, every run is also scored on the same generated test items (gptstack.eval.capability),
and the held-out run's capabilities are predicted from the ladder alongside its loss. The predictions
are written to the state file, with their time, before the held-out run starts training; a rerun keeps
them. The state file `out`/scaling.json is rewritten after every run, so a killed sweep resumes where
it stopped and a rerun reuses every finished run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from gptstack.data.shards import read_manifest
from gptstack.eval.capability import (
    capability_markdown,
    check_families,
    plot_capability,
    predict_capability,
    score_capability,
    score_checkpoint,
)
from gptstack.eval.scaling import ScalingConfig, plot_scaling, predict, scaling_markdown, score_prediction, sweep_plan
from gptstack.report import write_section
from gptstack.train.config import TrainConfig
from gptstack.train.loop import pretrain


def now() -> str:
    """The time, UTC, to the microsecond: what orders the prediction before the held-out run."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def train_run(cfg: ScalingConfig, run: dict, vocab: int) -> dict:
    """Pretrain one run of the plan to its D tokens: the run with its val loss, tokens, seconds and
    checkpoint (and its capability scores, with `cfg.capability`)."""
    out = Path(cfg.out) / run["name"]
    tc = TrainConfig(
        data=cfg.data, out=str(out), model=cfg.model(run["width"], vocab).to_dict(), batch_size=cfg.batch_size,
        seq_len=cfg.context, max_tokens=run["D"], lr=cfg.lr, warmup_tokens=max(1, run["D"] // 20),
        checkpoint_every=0, checkpoint_minutes=0, keep_checkpoints=1, eval_every=0, eval_batches=cfg.eval_batches,
        sample_prompts=[], seed=cfg.seed, progress=False, tensorboard=False,
    )  # fmt: skip
    started, start = now(), time.perf_counter()
    summary = pretrain(tc)
    done = {**run, "loss": summary["val_loss"], "tokens": summary["tokens"], "seconds": time.perf_counter() - start,
            "started_at": started, "checkpoint": summary["checkpoint"]}  # fmt: skip
    return score_run(cfg, done)


def score_run(cfg: ScalingConfig, run: dict) -> dict:
    """`run` with the capability scores of its checkpoint for every family of `cfg.capability` (kept
    where a reused run already has them)."""
    have = run.get("capability", {})
    if not cfg.capability or all(f in have for f in cfg.capability):
        return run
    if "checkpoint" not in run:
        raise ValueError(f"{cfg.out}/scaling.json: run {run['name']} has no checkpoint to score capabilities on")
    start = time.perf_counter()
    scores = score_checkpoint(run["checkpoint"], cfg.capability, cfg.capability_items, cfg.capability_shots)
    return {**run, "capability": have | scores, "capability_seconds": time.perf_counter() - start}


def predict_heldout(cfg: ScalingConfig, results: dict, run: dict, stored: dict) -> dict:
    """The loss (and capability) predictions of the held-out `run` from the fitted runs. A prediction
    `stored` in the state file is kept: it was made before the run was first trained."""
    keys = ("fit_compute", "fit_chinchilla", "prediction", "predicted_at", "capability_prediction")
    if all(k in stored for k in keys[:3]) and ("capability_prediction" in stored or not cfg.capability):
        return {k: stored[k] for k in keys if k in stored}
    made = predict(results["runs"], run) | {"predicted_at": now()}
    if cfg.capability:
        ladder = [r for r in results["runs"] if r["role"] == "ladder"]
        metrics = predict_capability(ladder, run)
        made["capability_prediction"] = {"predicted_at": made["predicted_at"], "metrics": metrics}
    return made


def run_sweep(cfg: ScalingConfig) -> dict:
    """Train the sweep (runs already in `out`/scaling.json are reused), fit, predict, train the held-out
    run, and write scaling.json, scaling.png (capability.png) and a report section."""
    check_families(cfg.capability)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = -(-read_manifest(cfg.data)["tokenizer"]["n_vocab"] // 64) * 64  # rounded up to a multiple of 64
    plan = sweep_plan(cfg, vocab)
    state_file = out / "scaling.json"
    stored = json.loads(state_file.read_text()) if state_file.is_file() else {}
    done = {r["name"]: r for r in stored.get("runs", [])}
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}  # what the runs depend on
    results: dict = {"config": config, "runs": []}
    bar = tqdm(total=sum(r["C"] for r in plan), unit="FLOP", unit_scale=True, desc="scaling", disable=not cfg.progress)
    for run in plan:
        if run["role"] == "heldout":  # predict, and write the prediction down, before training it
            results |= predict_heldout(cfg, results, run, stored if run["name"] in done else {})
            state_file.write_text(json.dumps(results, indent=2) + "\n")
        results["runs"].append(score_run(cfg, done[run["name"]]) if run["name"] in done else train_run(cfg, run, vocab))
        state_file.write_text(json.dumps(results, indent=2) + "\n")  # a killed sweep resumes from here
        bar.update(run["C"])
    bar.close()
    finish(cfg, results)
    state_file.write_text(json.dumps(results, indent=2) + "\n")
    return results


def finish(cfg: ScalingConfig, results: dict) -> None:
    """Score the predictions against the held-out run; write the plots and the report section."""
    out, held = Path(cfg.out), results["runs"][-1]
    score_prediction(results["prediction"], held["loss"])
    plot_scaling(results, out / "scaling.png")
    section = scaling_markdown(results) + "\n\n![scaling fit](scaling.png)"
    if cfg.capability:
        score_capability(results["capability_prediction"]["metrics"], held["capability"])
        plot_capability(results, out / "capability.png")
        section += "\n\n" + capability_markdown(results) + "\n\n![capability fits](capability.png)"
    write_section(out / "report.md", "scaling", section)


def sweep_markdown(results: dict) -> str:
    """The loss table and fits, and the capability tables where the sweep scored any."""
    text = scaling_markdown(results)
    return text + "\n\n" + capability_markdown(results) if "capability_prediction" in results else text
