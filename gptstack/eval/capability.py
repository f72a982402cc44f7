"""Predicting capabilities, not only loss (GPT-4 report §3.1, figure 2): generated task families with
ground truth, a per-item pass rate that is smooth in model size, and its power-law fit across a sweep.

The families, one item a line of text:

    add     3-digit addition:                 "417+385=802"
    copy    repeat six random letters:        "copy qzkwle=qzkwle"

Every item is put in a split by a hash of its prompt: one in ten is a test item (`is_test_item`).
`training_documents` (what a sweep's training text mixes in) never emits a test item and `eval_items`
emits nothing else, so no scored item was ever trained on, and the split needs no shared seed.

The pass rate of an item is the probability that the model, sampling at temperature 1 from the prompt,
writes exactly the answer and then ends the line: exp(log p(answer + "\\n" | prompt)), the scorer's exact
continuation log-likelihood. It is the expectation of sampled pass@1 and never 0, so a model too small
to solve anything still has a finite, smooth -E[log pass rate], the metric GPT-4 extrapolated on
HumanEval. A run is scored three ways (`capability_metrics`):

    neg_log_pass   -mean log pass rate (nats)                  smooth: fitted like the loss
    pass_rate      mean pass rate (= expected sampled pass@1)  bounded, S-shaped
    exact_match    greedy decoding writes the answer           a threshold: 0 until it jumps

`predict_capability` fits L(C) = a·C^-α + L∞ (gptstack.eval.scaling.fit_power_law) and GPT-4's pure
a·C^-α on the ladder to the lower-is-better form of each metric (neg_log_pass, -log pass_rate,
1 - exact_match) and extrapolates both to the held-out run; `score_capability` adds the actual values
and says which metrics did not scale smoothly (not monotone over the ladder, a poor fit, or stuck at 0).
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np

from gptstack.eval.scaling import fit_power_law, power_law
from gptstack.eval.scorer import Scorer, encode_pair, load_scorer

FAMILIES = ("add", "copy")
# each metric's lower-is-better form, the quantity fitted: the mean pass rate of a small model is ~1e-6,
# so 1 - pass rate would be flat at 1; its -log is what moves
METRICS = {
    "neg_log_pass": lambda v: v,
    "pass_rate": lambda v: -math.log(max(v, 1e-300)),
    "exact_match": lambda v: 1 - v,
}
TEST_FRACTION = 10  # one item in TEST_FRACTION is a test item
SMOOTH_RMSE = 0.05  # a ladder fit worse than this relative RMSE is not smooth


class CapabilityError(ValueError):
    """A bad capability option or input (printed by the CLI as one line)."""


def check_families(families: list[str]) -> None:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise CapabilityError(f"unknown capability family {unknown[0]!r}: the families are {', '.join(FAMILIES)}")


def draw_item(family: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of a family, e.g. ("417+385=", "802")."""
    if family == "add":
        a, b = rng.randrange(1000), rng.randrange(1000)
        return f"{a}+{b}=", str(a + b)
    if family == "copy":
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        return f"copy {s}=", s
    raise CapabilityError(f"unknown capability family {family!r}: the families are {', '.join(FAMILIES)}")


def is_test_item(prompt: str) -> bool:
    """The split, by a hash of the prompt: stable across seeds, runs and machines."""
    return int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") % TEST_FRACTION == 0


def _draw(family: str, rng: random.Random, test: bool) -> tuple[str, str]:
    while True:
        prompt, answer = draw_item(family, rng)
        if is_test_item(prompt) == test:
            return prompt, answer


def training_documents(family: str, n_docs: int, seed: int = 0, lines: tuple[int, int] = (8, 24)) -> list[str]:
    """`n_docs` documents of training-split items, one "prompt answer" a line, to mix into training text."""
    check_families([family])
    rng = random.Random(f"capability-train:{family}:{seed}")
    docs = []
    for _ in range(n_docs):
        items = [_draw(family, rng, test=False) for _ in range(rng.randint(*lines))]
        docs.append("".join(p + a + "\n" for p, a in items))
    return docs


def eval_items(family: str, n: int, shots: int = 2, seed: int = 0) -> list[dict]:
    """`n` distinct test items, each {context, answer}: `shots` training-split lines, then the prompt."""
    check_families([family])
    rng = random.Random(f"capability-test:{family}:{seed}")
    seen, items = set(), []
    while len(items) < n:
        prompt, answer = _draw(family, rng, test=True)
        if prompt in seen:
            continue
        seen.add(prompt)
        context = "".join(p + a + "\n" for p, a in (_draw(family, rng, test=False) for _ in range(shots)))
        items.append({"context": context + prompt, "answer": answer})
    return items


# ---- scoring one model ---------------------------------------------------------------------------------


def item_log_pass(scorer: Scorer, items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per item: log p(answer + "\\n" | context) (the log pass rate at temperature 1) and whether greedy
    decoding writes it."""
    requests = [encode_pair(scorer.tokenizer, it["context"], it["answer"] + "\n") for it in items]
    scored = scorer.loglikelihood(requests)
    return np.array([lp for lp, _ in scored]), np.array([g for _, g in scored], dtype=bool)


def capability_metrics(scorer: Scorer, items: list[dict]) -> dict:
    """neg_log_pass, pass_rate and exact_match of one model over `items`."""
    log_pass, greedy = item_log_pass(scorer, items)
    return {
        "neg_log_pass": float(-log_pass.mean()),
        "pass_rate": float(np.exp(log_pass).mean()),
        "exact_match": float(greedy.mean()),
        "items": len(items),
    }


def score_checkpoint(checkpoint: str | Path, families: list[str], n_items: int, shots: int) -> dict:
    """{family: capability_metrics} of a checkpoint, on the same test items for every run."""
    scorer = load_scorer(checkpoint)
    return {f: capability_metrics(scorer, eval_items(f, n_items, shots)) for f in families}


# ---- fits across the sweep ---------------------------------------------------------------------------


def fit_pure_power_law(C: np.ndarray, y: np.ndarray) -> dict:
    """y = a·C^-α (GPT-4's form for -E[log pass rate]): least squares on log y against log C."""
    slope, intercept = np.polyfit(np.log(C), np.log(y), 1)
    rel = y / np.exp(intercept + slope * np.log(C)) - 1
    return {
        "a": float(np.exp(intercept)),
        "alpha": float(-slope),
        "L_inf": 0.0,
        "rmse_rel": float(np.sqrt(np.mean(rel**2))),
    }


def predict_capability(ladder: list[dict], heldout: dict) -> dict:
    """Per family and metric: two fits of its lower-is-better form over the ladder runs (each with C and
    capability), a·C^-α + L∞ (`fit`, as the loss) and a·C^-α (`fit_pure`, GPT-4's), and their predictions
    for the held-out run (whose capability is not used)."""
    C = np.array([r["C"] for r in ladder])
    out: dict = {}
    for family in ladder[0]["capability"]:
        for metric, lower in METRICS.items():
            y = np.array([lower(r["capability"][family][metric]) for r in ladder])
            entry: dict = {"ladder": y.tolist()}
            if np.all(y > 0) and np.ptp(y) > 0:
                fit, pure = fit_power_law(C, y), fit_pure_power_law(C, y)
                entry |= {"fit": fit, "predicted": float(power_law(fit, heldout["C"])),
                          "fit_pure": pure, "predicted_pure": float(power_law(pure, heldout["C"]))}  # fmt: skip
            else:  # a flat ladder (every run at 0 accuracy) or a perfect one: nothing to extrapolate
                entry |= {"fit": None, "predicted": float(y[-1]), "fit_pure": None, "predicted_pure": float(y[-1])}
            out[f"{family}/{metric}"] = entry
    return out


def score_capability(predicted: dict, actual: dict) -> None:
    """Add to each `predicted` entry the held-out run's value, the relative error, and whether the
    metric scaled smoothly over the ladder (and why not)."""
    for key, entry in predicted.items():
        family, metric = key.split("/")
        y = np.array(entry["ladder"])
        entry["actual"] = float(METRICS[metric](actual[family][metric]))
        entry["error"] = abs(entry["predicted"] - entry["actual"]) / max(entry["actual"], 1e-12)
        entry["error_pure"] = abs(entry["predicted_pure"] - entry["actual"]) / max(entry["actual"], 1e-12)
        reasons = []
        if metric == "exact_match" and np.sum(y >= 1.0) >= math.ceil(len(y) / 2):  # accuracy 0
            reasons.append("0 at most fitted runs")
        if entry["fit"] is None:
            reasons.append("flat: no fit")
        elif not np.all(np.diff(y) < 0):
            reasons.append("not monotone in C")
        if entry["fit"] is not None and entry["fit"]["rmse_rel"] > SMOOTH_RMSE:
            reasons.append(f"fit RMSE {entry['fit']['rmse_rel']:.1%}")
        entry["smooth"] = not reasons
        entry["why_not"] = "; ".join(reasons)


def capability_markdown(results: dict) -> str:
    """The capability table of a sweep: per run and family the three metrics, then the predictions."""
    cap = results["capability_prediction"]
    families = sorted({k.split("/")[0] for k in cap["metrics"]})
    head = "| run | role | C (FLOPs) | " + " | ".join(f"{f} -E[log pass] | {f} pass rate | {f} exact" for f in families)
    lines = ["### Capability", "", head + " |", "|---|---|---:|" + "---:|" * 3 * len(families)]
    for r in results["runs"]:
        cells = [f"{r['capability'][f][m]:.4g}" for f in families for m in METRICS]
        lines.append(f"| {r['name']} | {r['role']} | {r['C']:.3g} | " + " | ".join(cells) + " |")
    started = results["runs"][-1].get("started_at", "?")
    order = "before" if cap["predicted_at"] < started else "AFTER"  # ISO times in UTC sort as strings
    lines += ["", f"Predicted at {cap['predicted_at']}, {order} the held-out run started training ({started}).", ""]
    lines += ["| metric (lower is better) | actual | a·C^-α + L∞ | error | a·C^-α (GPT-4) | error | smooth |"]
    lines += ["|---|---:|---:|---:|---:|---:|---|"]
    names = {"neg_log_pass": "-E[log pass rate]", "pass_rate": "-log E[pass rate]", "exact_match": "1 - exact match"}
    for key, e in cap["metrics"].items():
        family, metric = key.split("/")
        smooth = "yes" if e["smooth"] else f"no ({e['why_not']})"
        lines.append(f"| {family}: {names[metric]} | {e['actual']:.4g} | {e['predicted']:.4g} | {e['error']:.2%} "
                     f"| {e['predicted_pure']:.4g} | {e['error_pure']:.2%} | {smooth} |")  # fmt: skip
    return "\n".join(lines)


def plot_capability(results: dict, path: Path) -> Path:
    """Per family: -E[log pass rate] and 1 - exact match against compute, the ladder fit, and the
    held-out run's prediction (x) and actual value (star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap = results["capability_prediction"]["metrics"]
    families = sorted({k.split("/")[0] for k in cap})
    ladder = [r for r in results["runs"] if r["role"] == "ladder"]
    held = results["runs"][-1]
    cs = np.geomspace(ladder[0]["C"] / 1.5, held["C"] * 1.5, 200)
    fig, axes = plt.subplots(2, len(families), figsize=(5 * len(families), 7), squeeze=False)
    for j, family in enumerate(families):
        for i, (metric, label) in enumerate((("neg_log_pass", "-E[log pass]"), ("exact_match", "1 - exact match"))):
            ax, e = axes[i][j], cap[f"{family}/{metric}"]
            ax.scatter([r["C"] for r in ladder], e["ladder"], label="ladder runs (fitted)")
            if e["fit"] is not None:
                ax.plot(cs, power_law(e["fit"], cs), "--", color="gray", label="a·C^-α + L∞ fit")
                ax.plot(cs, power_law(e["fit_pure"], cs), ":", color="tab:purple", label="a·C^-α fit (GPT-4)")
                ax.scatter([held["C"]], [e["predicted_pure"]], marker="+", s=80, color="tab:purple", zorder=3)
            ax.scatter([held["C"]], [e["actual"]], marker="*", s=200, color="tab:red", label="held-out (actual)")
            ax.scatter([held["C"]], [e["predicted"]], marker="x", s=80, color="tab:green", label="prediction")
            ax.set_xscale("log")
            ax.set_title(f"{family}: {label} (error {e['error']:.1%}{'' if e['smooth'] else ', not smooth'})",
                         fontsize=9)  # fmt: skip
            ax.set_xlabel("training compute C (FLOPs)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
