"""Calibration of multiple-choice answers (GPT-4 technical report, figure 8).

A model's answer probability for an item is the softmax of its per-choice log-likelihoods; its
confidence is the probability of the answer it picks. Expected calibration error (Guo et al. 2017):
items are put into equal-width confidence bins and ECE = Σ_b (n_b / n) · |accuracy_b - confidence_b|.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def choice_probs(logliks: list[float]) -> np.ndarray:
    x = np.asarray(logliks, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
    """ECE and the per-bin table (count, mean confidence, accuracy) for confidences in [0, 1]."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        raise ValueError("no items to compute calibration over")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        conf = float(confidence[m].mean()) if n else math.nan
        acc = float(correct[m].mean()) if n else math.nan
        if n:
            ece += n / len(confidence) * abs(acc - conf)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n, "confidence": conf, "accuracy": acc})
    return {"ece": ece, "items": len(confidence), "accuracy": float(correct.mean()),
            "mean_confidence": float(confidence.mean()), "bins": table}  # fmt: skip


def plot_reliability(calib: dict, path: str | Path, title: str = "") -> Path:
    """The reliability diagram: accuracy per confidence bin against the diagonal, with bin counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calib["bins"]
    centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    acc = [0.0 if b["n"] == 0 else b["accuracy"] for b in bins]
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, height_ratios=(3, 1))
    ax.bar(centres, acc, width=width * 0.95, color="tab:blue", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"ECE = {calib['ece']:.3f} over {calib['items']:,} items")
    ax.legend(loc="upper left")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax_n.bar(centres, [b["n"] for b in bins], width=width * 0.95, color="tab:gray")
    ax_n.set_ylabel("items")
    ax_n.set_xlabel("confidence (probability of the chosen answer)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
