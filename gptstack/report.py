"""The run report every stage shares: report.md, one section per stage (each replaced when its stage
runs again, the others kept), and the training-curve plot. Stage-specific sections live with their
stage (train/report.py, posttrain/common.py, eval/); this module imports nothing from gptstack."""

from __future__ import annotations

from pathlib import Path

SECTION_START, SECTION_END = "<!-- gptstack:{name} -->", "<!-- /gptstack:{name} -->"


def write_section(report: Path, name: str, body: str, title: str = "# gptstack run report") -> Path:
    """Put `body` in report.md as the section `name`, replacing an earlier one (other stages keep theirs)."""
    start, end = SECTION_START.format(name=name), SECTION_END.format(name=name)
    text = report.read_text() if report.is_file() else title + "\n"
    block = f"{start}\n{body.strip()}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    report.write_text(text)
    return report


def plot_training(records: list[dict], path: Path) -> Path:
    """Train loss (raw and smoothed) and validation loss against tokens, and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in records]
    loss = [r["loss"] for r in records]
    smooth, ema = [], None
    for x in loss:
        if x == x and abs(x) != float("inf"):  # skip non-finite (skipped) steps
            ema = x if ema is None else 0.95 * ema + 0.05 * x
        smooth.append(ema)
    evals = [r for r in records if "val_loss" in r]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax.plot(tokens, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    ax.plot(tokens, smooth, color="tab:blue", label="train (EMA 0.95)")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange", label="val")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(tokens, [r["lr"] for r in records], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
