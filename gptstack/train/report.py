"""The pretraining report: RUN_DIR/loss.png and the "Pretraining" section of RUN_DIR/report.md, written
at the end of a run from metrics.jsonl and the run summary (`Trainer.run`'s return value)."""

from __future__ import annotations

from pathlib import Path

from gptstack.config import ModelConfig
from gptstack.report import plot_training, write_section
from gptstack.train.metrics import read_metrics


def write_pretrain_report(run_dir: str | Path, summary: dict) -> Path:
    """loss.png and the "pretrain" section of report.md, from metrics.jsonl and the run summary."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if records:
        plot_training(records, run_dir / "loss.png")
    lines = ["## Pretraining", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in _rows(summary)), ""]
    if records:
        lines += ["![training loss and learning rate](loss.png)", ""]
    if summary["samples"]:
        lines += ["### Samples at the end of training", ""]
        for s in summary["samples"]:
            lines += [f"Prompt `{s['prompt']!r}`:", "", "```", s["prompt"] + s["completion"], "```", ""]
    return write_section(run_dir / "report.md", "pretrain", "\n".join(lines))


def _rows(summary: dict) -> list[tuple[str, str]]:
    """The report's table: (what, value) rows."""
    cfg = ModelConfig.from_dict(summary["model"])
    params = summary["params"]
    val = (
        f"{summary['val_loss']:.4f} nats/token, {summary['val_bpb']:.4f} bits/byte" if "val_loss" in summary else "n/a"
    )
    return [
        ("model", f"{cfg.n_layer} layers × {cfg.n_embd} wide, {cfg.n_head} heads, context {cfg.block_size}, "
                  f"vocab {cfg.vocab_size}; {params['total']:,} parameters"),
        ("trained", f"{summary['steps']:,} steps, {summary['tokens']:,} tokens in {summary['train_seconds']:.0f} s "
                    f"on {summary['world']} × {summary['device']} ({summary['dtype']})"),
        ("throughput", f"{summary['tokens_per_s']:,.0f} tokens/s (median), MFU {summary['mfu']:.1%} "
                       f"(peak: {summary['peak_source']})"),
        ("final train loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"),
        ("validation", val),
        ("skipped steps", f"{summary['skipped']} (non-finite loss or gradient)"),
        ("checkpoint", summary["checkpoint"]),
    ]  # fmt: skip
