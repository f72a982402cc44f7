"""Predictable scaling: the experiment and its fits (GPT-4 report §3; Kaplan et al. 2020; Hoffmann et al. 2022).

The experiment: `ScalingConfig` and `sweep_plan` lay out a ladder of widths at a fixed
tokens-per-parameter ratio, extra runs at other ratios, and a held-out larger run whose loss is
predicted with the fits before it is trained; gptstack.train.sweep (`gptstack scaling`) trains them.
What is fitted and reported are pure functions of the runs' (N, D, C, loss):

- `L(C) = a·C^-α + L∞` on the compute frontier (C = 6·N·D training FLOPs, N the matmul parameters):
  a grid over (α, L∞) with a solved in closed form, refined by Nelder-Mead on the squared relative
  error;
- `L(N, D) = E + A/N^α + B/D^β` (Chinchilla form) over all runs: L-BFGS from a grid of starts on the
  Huber loss of log-loss residuals (Hoffmann et al., appendix D.2);
- `predict`, and the table and plot of the fits against the held-out run.

Capabilities (a task family's -E[log pass rate], pass rate and exact match) are fitted and predicted the
same way by gptstack.eval.capability.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from gptstack.config import ModelConfig
from gptstack.model import count_params


@dataclass
class ScalingConfig:
    data: str  # shard folder
    out: str = "runs/scaling"  # sweep folder (a rerun reuses finished runs)
    widths: list[int] = field(default_factory=lambda: [24, 32, 48, 64, 96])  # n_embd of the ladder
    n_layer: int = 2  # layers of every model
    head_dim: int = 8  # n_head = width // head_dim
    # learned positions make copying (induction) appear late and at one size only: a kink in the ladder
    pos: Literal["learned", "rope"] = "rope"  # position encoding of every model
    context: int = 128  # training window in tokens
    tokens_per_param: float = 10.0  # D/N of the ladder and the held-out run
    extra_ratios: list[float] = field(default_factory=lambda: [2.5, 40.0])  # other D/N, at the middle widths
    heldout_compute: float = 4.0  # held-out compute / the largest fitted run's compute
    batch_size: int = 4  # × context tokens per step: the smallest runs still take hundreds of steps
    lr: float = 3e-3  # peak learning rate
    eval_batches: int = 300  # × batch_size × context tokens of the val split: ~300k, so the loss is not a few files
    seed: int = 1337  # initialisation and data order of every run
    # capability prediction (GPT-4 §3.1): gptstack.eval.capability scores every run on generated test items
    capability: list[str] = field(default_factory=list)  # families to score and predict (add, copy), taught by the data
    capability_items: int = 200  # test items per family (never in training), the same for every run
    capability_shots: int = 2  # training-split example lines before each test item's prompt
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


# ---- fits ---------------------------------------------------------------------------------------------


def fit_power_law(C: np.ndarray, L: np.ndarray) -> dict:
    """L(C) = a·C^-α + L∞, minimising the squared relative error."""
    from scipy.optimize import minimize

    C, L = np.asarray(C, float), np.asarray(L, float)
    x = np.log(C / C.min())  # work in units of the smallest compute: a stays O(1)

    def solve_a(alpha: float, l_inf: float) -> float:
        basis = np.exp(-alpha * x)
        w = 1 / L**2
        return float(np.sum(w * basis * (L - l_inf)) / np.sum(w * basis * basis))

    def loss(p: np.ndarray) -> float:
        alpha, l_inf = p
        if alpha <= 0 or l_inf < 0 or l_inf >= L.min():
            return 1e9
        pred = solve_a(alpha, l_inf) * np.exp(-alpha * x) + l_inf
        return float(np.sum(((pred - L) / L) ** 2))

    grid = [(a, f * L.min()) for a in np.linspace(0.02, 1.5, 60) for f in np.linspace(0.0, 0.98, 50)]
    best = min(grid, key=lambda p: loss(np.array(p)))
    res = minimize(loss, np.array(best), method="Nelder-Mead", options=dict(xatol=1e-8, fatol=1e-14, maxiter=4000))
    alpha, l_inf = res.x
    a = solve_a(alpha, l_inf) * C.min() ** alpha  # back to L = a·C^-α + L∞ in FLOPs
    return {"a": a, "alpha": float(alpha), "L_inf": float(l_inf), "rmse_rel": math.sqrt(res.fun / len(L))}


def power_law(fit: dict, C: float | np.ndarray) -> float | np.ndarray:
    return fit["a"] * np.asarray(C, float) ** -fit["alpha"] + fit["L_inf"]


def fit_chinchilla(N: np.ndarray, D: np.ndarray, L: np.ndarray, delta: float = 1e-3) -> dict:
    """L(N, D) = E + A/N^α + B/D^β: Huber loss on log L residuals, L-BFGS from a grid of starts."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    logN, logD, logL = np.log(N), np.log(D), np.log(L)

    def objective(p: np.ndarray) -> float:
        a, b, e, alpha, beta = p
        pred = logsumexp(np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)]), axis=0)
        r = np.abs(pred - logL)
        return float(np.sum(np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))))

    starts = itertools.product([0, 5, 10], [0, 5, 10], [-0.5, 0.5], [0.3, 0.7], [0.3, 0.7])
    best = None
    for s in starts:
        res = minimize(objective, np.array(s, float), method="L-BFGS-B",
                       bounds=[(-10, 40), (-10, 40), (-5, 3), (0.01, 2.5), (0.01, 2.5)])  # fmt: skip
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return {"A": math.exp(a), "B": math.exp(b), "E": math.exp(e), "alpha": float(alpha), "beta": float(beta)}


def chinchilla(fit: dict, N, D):
    return fit["E"] + fit["A"] / np.asarray(N, float) ** fit["alpha"] + fit["B"] / np.asarray(D, float) ** fit["beta"]


def predict(fitted: list[dict], heldout: dict) -> dict:
    """Both fits over the `fitted` runs (the ladder for L(C), all of them for L(N, D)) and their
    predictions of the `heldout` run's loss; the held-out run's own loss is not used."""
    ladder = [r for r in fitted if r["role"] == "ladder"]
    fit_compute = fit_power_law(np.array([r["C"] for r in ladder]), np.array([r["loss"] for r in ladder]))
    fit_nd = fit_chinchilla(*(np.array([r[k] for r in fitted]) for k in ("N", "D", "loss")))
    prediction = {
        "compute_ratio": heldout["C"] / max(r["C"] for r in fitted),
        "L(C)": float(power_law(fit_compute, heldout["C"])),
        "L(N,D)": float(chinchilla(fit_nd, heldout["N"], heldout["D"])),
    }
    return {"fit_compute": fit_compute, "fit_chinchilla": fit_nd, "prediction": prediction}


def score_prediction(prediction: dict, loss: float) -> None:
    """Add the held-out run's actual loss and both relative prediction errors to `prediction`."""
    prediction["actual"] = loss
    prediction["error_L(C)"] = abs(prediction["L(C)"] - loss) / loss
    prediction["error_L(N,D)"] = abs(prediction["L(N,D)"] - loss) / loss


# ---- report -------------------------------------------------------------------------------------------


def scaling_markdown(results: dict) -> str:
    fc, fn, p = results["fit_compute"], results["fit_chinchilla"], results["prediction"]
    head = "| run | role | N (matmul params) | D (tokens) | C (FLOPs) | val loss | seconds |"
    lines = ["## Predictable scaling", "", head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r['name']} | {r['role']} | {r['N']:,} | {r['D']:,} | {r['C']:.3g} | {r['loss']:.4f} "
                     f"| {r['seconds']:.0f} |")  # fmt: skip
    lines += [
        "",
        f"L(C) = {fc['a']:.4g}·C^-{fc['alpha']:.4f} + {fc['L_inf']:.4f} "
        f"(ladder fit, relative RMSE {fc['rmse_rel']:.2%})",
        f"L(N, D) = {fn['E']:.4f} + {fn['A']:.4g}/N^{fn['alpha']:.3f} + {fn['B']:.4g}/D^{fn['beta']:.3f}",
        "",
        f"Held-out run at {p['compute_ratio']:.1f}× the largest fitted compute: actual loss **{p['actual']:.4f}**; "
        f"L(C) predicted {p['L(C)']:.4f} (error **{p['error_L(C)']:.2%}**), L(N, D) predicted {p['L(N,D)']:.4f} "
        f"(error **{p['error_L(N,D)']:.2%}**).",
    ]
    return "\n".join(lines)


def plot_scaling(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for role, style in (("ladder", "o"), ("extra", "s")):
        rs = [r for r in runs if r["role"] == role]
        ax.scatter([r["C"] for r in rs], [r["loss"] for r in rs], marker=style, label=f"{role} runs (fitted)")
    held = runs[-1]
    cs = np.geomspace(min(r["C"] for r in runs) / 1.5, held["C"] * 1.5, 200)
    ax.plot(cs, power_law(results["fit_compute"], cs), "--", color="gray", label="L(C) fit")
    ax.scatter([held["C"]], [held["loss"]], marker="*", s=200, color="tab:red", label="held-out run (actual)", zorder=3)
    ax.scatter([held["C"]], [results["prediction"]["L(N,D)"]], marker="x", s=80, color="tab:green",
               label="L(N, D) prediction", zorder=3)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6·N·D (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    p = results["prediction"]
    ax.set_title(f"held-out {p['compute_ratio']:.1f}× compute: L(C) error {p['error_L(C)']:.2%}, "
                 f"L(N,D) error {p['error_L(N,D)']:.2%}", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
