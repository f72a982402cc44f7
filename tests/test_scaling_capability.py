"""Capability prediction across the scaling sweep (gptstack.eval.capability, issue 23): the split of
generated items, the pass-rate estimator on a model whose next-token distribution is set by hand, the
fits on known power laws, and a tiny sweep that predicts before it trains."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from gptstack.cli import main
from gptstack.config import ModelConfig
from gptstack.data.shards import write_texts
from gptstack.eval.capability import (
    FAMILIES,
    CapabilityError,
    capability_metrics,
    draw_item,
    eval_items,
    is_test_item,
    predict_capability,
    score_capability,
    training_documents,
)
from gptstack.eval.scaling import ScalingConfig, chinchilla, power_law
from gptstack.eval.scorer import Scorer
from gptstack.model import GPT
from gptstack.tokenizer import byte_tokenizer
from gptstack.train.sweep import predict_heldout


def test_items_have_ground_truth_and_test_items_are_never_in_training():
    for family in FAMILIES:
        trained = {line for doc in training_documents(family, 300) for line in doc.splitlines()}
        items = eval_items(family, 100, shots=2)
        assert len({it["context"].splitlines()[-1] for it in items}) == 100  # distinct prompts
        for it in items:
            *shots, prompt = it["context"].splitlines()
            assert (
                is_test_item(prompt) and len(shots) == 2 and not any(is_test_item(s.split("=")[0] + "=") for s in shots)
            )
            assert prompt + it["answer"] not in trained
        assert not any(is_test_item(line[: line.index("=") + 1]) for line in trained)
        assert 0.05 < np.mean([is_test_item(draw_item(family, random.Random(i))[0]) for i in range(2000)]) < 0.15
    a, b = map(int, eval_items("add", 1)[0]["context"].splitlines()[-1].rstrip("=").split("+"))
    assert eval_items("add", 1)[0]["answer"] == str(a + b)
    with pytest.raises(CapabilityError, match="unknown capability family 'mul'"):
        training_documents("mul", 1)


def constant_model(logits: dict[int, float], vocab: int = 320) -> GPT:
    """A GPT whose next-token logits are `logits` (0 elsewhere) after every context: every block's
    output projections are zero, so the residual stream stays the all-ones embedding, and the head
    maps it to the logits."""
    cfg = ModelConfig(vocab_size=vocab, block_size=32, n_layer=1, n_embd=16, n_head=2, pos="rope",
                      norm="rmsnorm", bias=False, tie_embeddings=False, dropout=0.0)  # fmt: skip
    model = GPT(cfg)
    z = torch.zeros(vocab)
    for i, v in logits.items():
        z[i] = v
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "ln" in name or "norm" in name else 0.0)
        model.transformer.wte.weight.fill_(1.0)
        model.lm_head.weight.copy_(z[:, None].expand(vocab, 16) / 16)  # logit v = Σ_d 1 · z_v / 16 = z_v
    return model


def test_pass_rate_is_the_probability_of_the_exact_answer_on_a_hand_set_model():
    # p('\n') = 64/414, p('2') = 32/414, the other 318 ids 1/414 each, whatever the context
    model = constant_model({ord("\n"): math.log(64), ord("2"): math.log(32)})
    items = [
        {"context": "1+1=", "answer": "2"},
        {"context": "copy ab=", "answer": "22"},
        {"context": "x=", "answer": ""},
    ]
    passes = [32 * 64 / 414**2, 32 * 32 * 64 / 414**3, 64 / 414]
    got = capability_metrics(Scorer(model, byte_tokenizer()), items)
    assert got["pass_rate"] == pytest.approx(np.mean(passes), rel=1e-4)
    assert got["neg_log_pass"] == pytest.approx(-np.mean(np.log(passes)), rel=1e-4)
    assert got["exact_match"] == pytest.approx(1 / 3)  # only the empty answer ("\n", the argmax) is greedy


def ladder_of(C: np.ndarray, nlp: np.ndarray, acc: np.ndarray) -> list[dict]:
    return [{"C": c, "capability": {"add": {"neg_log_pass": n, "pass_rate": math.exp(-n), "exact_match": a}}}
            for c, n, a in zip(C, nlp, acc, strict=True)]  # fmt: skip


def test_capability_fits_recover_a_known_power_law_and_flag_the_metrics_that_jump():
    truth = {"a": 3e3, "alpha": 0.3, "L_inf": 0.2}
    C = np.geomspace(1e10, 1e12, 5)
    held = {"C": 4e12}
    acc = np.array([0.0, 0.0, 0.0, 0.0, 0.02])  # exact match: 0 until the largest fitted run
    pred = predict_capability(ladder_of(C, power_law(truth, C), acc), held)
    nlp = pred["add/neg_log_pass"]
    assert nlp["predicted"] == pytest.approx(power_law(truth, held["C"]), rel=1e-4)
    assert nlp["fit"]["alpha"] == pytest.approx(0.3, rel=1e-3) and nlp["fit"]["L_inf"] == pytest.approx(0.2, rel=1e-3)
    actual = {"add": {"neg_log_pass": float(power_law(truth, held["C"])), "pass_rate": 0.5, "exact_match": 0.4}}
    assert pred["add/pass_rate"]["ladder"] == pytest.approx(power_law(truth, C))  # -log of exp(-L)
    score_capability(pred, actual)
    assert nlp["smooth"] and nlp["error"] < 1e-4
    em = pred["add/exact_match"]
    assert not em["smooth"] and "0 at most fitted runs" in em["why_not"] and em["actual"] == pytest.approx(0.6)
    assert em["error"] > 0.5  # the jump was not predicted: 1 - 0.4 actual against ~0.98
    pure = {"a": 3e3, "alpha": 0.3, "L_inf": 0.0}  # GPT-4's form: the log-log line is recovered exactly
    got = predict_capability(ladder_of(C, power_law(pure, C), acc), held)["add/neg_log_pass"]
    assert got["fit_pure"]["alpha"] == pytest.approx(0.3, rel=1e-9) and got["fit_pure"]["rmse_rel"] < 1e-9
    assert got["predicted_pure"] == pytest.approx(power_law(pure, held["C"]), rel=1e-9)
    flat = predict_capability(ladder_of(C, power_law(truth, C), np.zeros(5)), held)["add/exact_match"]
    score_capability({"add/exact_match": flat}, actual)
    assert flat["fit"] is None and flat["predicted"] == 1.0 and "flat: no fit" in flat["why_not"]


@pytest.mark.slow  # the L(N, D) fit's 108 L-BFGS starts: ~2 min on the shared 2 cores
def test_the_heldout_prediction_uses_the_fitted_runs_only_and_a_stored_one_is_kept():
    truth = {"a": 3e3, "alpha": 0.3, "L_inf": 0.2}
    C = np.geomspace(1e10, 1e12, 5)
    ladder = ladder_of(C, power_law(truth, C), np.zeros(5))
    law = {"E": 1.2, "A": 30.0, "alpha": 0.35, "B": 60.0, "beta": 0.3}
    runs = []
    for i, r in enumerate(ladder):  # D = 10·N, C = 6·N·D
        n = math.sqrt(r["C"] / 60)
        runs.append({**r, "name": f"w{i}", "role": "ladder", "N": n, "D": 10 * n, "loss": chinchilla(law, n, 10 * n)})
    for n, d in (
        (runs[2]["N"], runs[2]["N"] * 2.5),
        (runs[2]["N"], runs[2]["N"] * 40),
    ):  # off the ray: L(N, D) is identifiable
        runs.append(
            {"name": f"x{d:.0f}", "role": "extra", "N": n, "D": d, "C": 6 * n * d, "loss": chinchilla(law, n, d)}
        )
    cfg = ScalingConfig(data="unused", capability=["add"])
    held = {"name": "big", "role": "heldout", "C": 4e12, "N": math.sqrt(4e12 / 60), "D": 10 * math.sqrt(4e12 / 60)}
    made = predict_heldout(cfg, {"runs": runs}, held, {})
    assert made["capability_prediction"]["predicted_at"] == made["predicted_at"]
    got = made["capability_prediction"]["metrics"]["add/neg_log_pass"]["predicted"]
    assert got == pytest.approx(power_law(truth, 4e12), rel=1e-4)
    assert predict_heldout(cfg, {"runs": runs}, held, made) == made  # a rerun: the stored prediction, its time


def test_scaling_cli_rejects_an_unknown_family_in_one_line(tmp_path, capsys):
    assert main(["scaling", "--data", str(tmp_path), "--capability", "mul", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown capability family 'mul'" in err[0] and "Traceback" not in err[0]


@pytest.mark.slow
def test_tiny_sweep_predicts_capabilities_before_training_the_heldout_run(tmp_path, capsys):
    rng = random.Random(0)
    docs = training_documents("add", 600) + training_documents("copy", 600)
    rng.shuffle(docs)
    write_texts(tmp_path / "shards", byte_tokenizer(), docs)
    args = ["scaling", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "sweep"), "--widths", "8", "12",
            "16", "--n-layer", "1", "--context", "32", "--tokens-per-param", "2", "--extra-ratios", "1",
            "--heldout-compute", "2", "--eval-batches", "5", "--capability", "add", "copy", "--capability-items",
            "20", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    r = json.loads((tmp_path / "sweep" / "scaling.json").read_text())
    held, cap = r["runs"][-1], r["capability_prediction"]
    assert cap["predicted_at"] < held["started_at"]  # ISO times, UTC: written before the run started
    assert all(set(run["capability"]) == {"add", "copy"} for run in r["runs"])
    assert set(cap["metrics"]) == {
        f"{f}/{m}" for f in ("add", "copy") for m in ("neg_log_pass", "pass_rate", "exact_match")
    }
    # the prediction used the ladder only: recomputed without the held-out run's scores, it is the same
    ladder = [x for x in r["runs"] if x["role"] == "ladder"]
    again = predict_capability(ladder, {"C": held["C"]})
    assert all(again[k]["predicted"] == pytest.approx(cap["metrics"][k]["predicted"]) for k in again)
    nlp = cap["metrics"]["copy/neg_log_pass"]
    assert nlp["actual"] == pytest.approx(held["capability"]["copy"]["neg_log_pass"])
    assert nlp["error"] == pytest.approx(abs(nlp["predicted"] - nlp["actual"]) / nlp["actual"])
    assert held["capability"]["copy"]["neg_log_pass"] < ladder[0]["capability"]["copy"]["neg_log_pass"]
    assert (tmp_path / "sweep" / "capability.png").stat().st_size > 10_000
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "### Capability" in report and "before the held-out run started training" in report
    assert "### Capability" in capsys.readouterr().out
    assert main(args) == 0  # a rerun reuses every run and keeps the prediction made before training
    assert (
        json.loads((tmp_path / "sweep" / "scaling.json").read_text())["capability_prediction"]["predicted_at"]
        == (cap["predicted_at"])
    )
