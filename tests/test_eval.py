"""gptstack eval: scoring against transformers and lm-eval as oracles, rolling windows, task formats,
few-shot sampling, bad input, the code sandbox, calibration, contamination and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import SHARED_DATA, need_sandbox, scramble, shared_file

from gptstack.checkpoint import save_checkpoint
from gptstack.cli import main
from gptstack.config import ModelConfig
from gptstack.data.shards import write_token_arrays
from gptstack.eval.calibration import plot_reliability, reliability
from gptstack.eval.execution import Job, Limits, pass_at_k, run_job, run_jobs
from gptstack.eval.run import run_tasks
from gptstack.eval.scorer import Scorer, encode_pair, rolling_windows
from gptstack.eval.tasks import (
    TaskError,
    _item_requests,
    code_job,
    demonstration,
    extract_answer,
    load_task,
    resolve_task,
    run_task,
    shots_prefix,
)
from gptstack.interop.hf import from_hf_model
from gptstack.model import build_model
from gptstack.tokenizer import byte_tokenizer

EVAL = SHARED_DATA / "eval"  # tests that read it call shared_eval() first, which skips when it is absent


def shared_eval() -> Path:
    if not EVAL.is_dir():
        pytest.skip(f"{EVAL} is absent: these tests read the shared data beside the repository")
    return EVAL


@pytest.fixture(scope="module")
def hf_pair():
    """A tiny random transformers GPT-2 and the same model imported through interop."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=320, n_positions=512, n_embd=48,
                                                              n_layer=2, n_head=4)).eval()  # fmt: skip
    scramble(hf, seed=1, std=0.1)
    return hf, from_hf_model(hf).eval()


def small_task(tmp_path, name: str, n: int):
    """The first n items of a shared task file, as a local task file."""
    src = next(p for p in shared_eval().iterdir() if p.name.startswith(name))
    dst = tmp_path / f"{name}.jsonl"
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return load_task(dst)


@torch.no_grad()
def hf_loglik(hf, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(hf(ids).logits[0, :-1].float(), dim=-1)  # position t predicts token t+1
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


@pytest.mark.parametrize("name,shots", [("copa", 0), ("copa", 2), ("winogrande", 1), ("lambada_openai", 0)])
def test_every_choice_loglikelihood_equals_transformers(tmp_path, hf_pair, name, shots):
    hf, ours = hf_pair
    tok = byte_tokenizer()
    task = small_task(tmp_path, name, 12)
    scorer = Scorer(ours, tok, batch_tokens=2048)
    result = run_task(scorer, task, shots=shots)
    assert scorer.truncated == 0
    checked = 0
    for item in result.items:
        pairs = _item_requests(task, task.records[item["index"]], shots_prefix(task, item["index"], shots, 1234))
        ours_ll = item["logliks"] if "logliks" in item else [item["loglik"]]
        for (ctx, cont), ll in zip(pairs, ours_ll, strict=True):
            want = hf_loglik(hf, *encode_pair(tok, ctx, cont))
            assert ll == pytest.approx(want, abs=2e-4), (item["index"], ctx[-40:], cont, ll, want)
            checked += 1
    assert checked >= 12


@pytest.mark.slow
def test_lm_eval_gives_the_same_per_item_logliks_as_our_runner(tmp_path, hf_pair):
    lm_eval = pytest.importorskip("lm_eval")
    from gptstack.eval.lm_eval_adapter import GPTStackLM

    _, ours = hf_pair
    tok = byte_tokenizer()
    task = small_task(tmp_path, "copa", 20)
    (tmp_path / "copa_local.yaml").write_text(
        "task: copa_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'copa.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=GPTStackLM(scorer=Scorer(ours, tok)), tasks=["copa_local"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
    )  # fmt: skip
    samples = sorted(out["samples"]["copa_local"], key=lambda s: s["doc_id"])
    ours_result = run_task(Scorer(ours, tok), task)
    assert len(samples) == len(ours_result.items) == 20
    for s, item in zip(samples, ours_result.items, strict=True):
        theirs = [r[0][0] for r in s["resps"]]  # per choice: [(loglik, is_greedy)]
        np.testing.assert_allclose(item["logliks"], theirs, atol=1e-5)
    metrics = out["results"]["copa_local"]
    assert metrics["acc,none"] == pytest.approx(ours_result.metrics["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(ours_result.metrics["acc_norm"])


def _windows_by_lm_eval(tokens, prefix, max_len):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, max_len, 1)]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 50])
def test_rolling_windows_match_lm_eval(n):
    pytest.importorskip("lm_eval")
    tokens = list(range(100, 100 + n))
    ours = list(rolling_windows(tokens, 7, 16))
    theirs = _windows_by_lm_eval(tokens, 7, 16)
    assert len(ours) == len(theirs)
    for (inp, tgt), (ctx, cont) in zip(ours, theirs, strict=True):
        assert tgt == cont and (ctx + cont)[:-1][-len(inp) :] == inp  # same predictions, same context


def test_rolling_loglikelihood_with_any_stride_equals_a_per_token_reference():
    torch.manual_seed(0)
    model = scramble(build_model(ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32)), 3)
    tok = byte_tokenizer()
    doc = tok.encode("To be, or not to be, that is the question: whether 'tis nobler")  # 63 tokens > 16
    seq = [tok.eot_id, *doc]
    with torch.no_grad():
        for stride in (16, 5, 1):
            # reference: token i is predicted from the window ending at it, started where its stride block starts
            ref = 0.0
            for start in range(0, len(doc), stride):
                end = min(start + stride, len(doc))
                lo = max(0, end - 16)
                logp = F.log_softmax(model(torch.tensor([seq[lo:end]]))[0], -1)
                ref += sum(logp[i - lo, doc[i]].item() for i in range(start, end))
            got = Scorer(model, tok).loglikelihood_rolling(doc, stride=stride)
            assert got == pytest.approx(ref, abs=1e-3), stride
        full = Scorer(model, tok).loglikelihood_rolling(doc[:15])  # fits: one plain forward pass
        logp = F.log_softmax(model(torch.tensor([seq[:15]]))[0], -1)
        assert full == pytest.approx(sum(logp[i, doc[i]].item() for i in range(15)), abs=1e-4)
    with pytest.raises(ValueError, match="stride"):
        Scorer(model, tok).loglikelihood_rolling(doc, stride=17)


def test_every_shared_task_file_loads_with_its_kind():
    kinds = {
        "arc_easy": "mc", "copa": "mc", "piqa": "mc", "boolq": "mc", "winogrande": "schema",
        "lambada_openai": "lm", "jeopardy_all": "lm", "gsm8k": "math", "human_eval": "code", "hellaswag": "mc",
    }  # fmt: skip
    shared_eval()
    for name, kind in kinds.items():
        task = (
            resolve_task(str(EVAL / f"{name}.jsonl"))
            if name != "hellaswag"
            else load_task(EVAL / "hellaswag_val_full.txt.bz2")
        )
        assert task.kind == kind, name
    hs = load_task(EVAL / "hellaswag_val_full.txt.bz2")
    assert len(hs.records) == 10042 and hs.random_baseline == 0.25
    assert hs.records[0]["choices"][3] == "starts pulling up roofing on a roof."


def test_few_shot_examples_are_seeded_exclude_the_item_and_do_not_depend_on_limit(tmp_path):
    task = small_task(tmp_path, "arc_easy", 30)
    a = shots_prefix(task, 5, 4, seed=1)
    assert a == shots_prefix(task, 5, 4, seed=1) and a != shots_prefix(task, 5, 4, seed=2)
    assert a.count("\n\n") == 4 and task.records[5]["query"] not in a
    for i in range(30):
        assert task.records[i]["query"] not in shots_prefix(task, i, 29, seed=0)
    with pytest.raises(TaskError, match="30 shots asked, but only 29"):
        shots_prefix(task, 0, 30, seed=0)


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "not valid JSON"),
        ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold 2 is not an index"),
        ('{"query": "q", "choices": ["a"], "gold": 0}', "at least two"),
        ('{"query": 3, "choices": ["a", "b"], "gold": 0}', "string 'query'"),
        ('{"context": "c", "continuation": "  "}', "empty continuation"),
        ('{"foo": 1}', "unknown record format"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_task_lines_fail_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "ok", "choices": ["a", "b"], "gold": 0}\n' + line + "\n")
    with pytest.raises(TaskError, match=message) as e:
        load_task(path)
    assert "bad.jsonl:2" in str(e.value)


def test_long_prompts_are_truncated_from_the_left_and_counted(tmp_path):
    model = build_model(ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16), seed=0)
    tok = byte_tokenizer()
    scorer = Scorer(model, tok)
    ctx, cont = tok.encode("x" * 100), tok.encode(" yes")
    ll_long, _ = scorer.loglikelihood([(ctx, cont)])[0]
    assert scorer.truncated == 1
    ll_cut, _ = scorer.loglikelihood([(ctx[-(33 - len(cont)) :], cont)])[0]  # what it was cut to
    assert ll_long == pytest.approx(ll_cut, abs=1e-5) and scorer.truncated == 1
    results = run_tasks(scorer, [small_task(tmp_path, "boolq", 3)])  # passages of hundreds of bytes
    assert results["truncated_requests"] >= 3 and results["tasks"]["boolq"]["items"] == 3


def test_a_generation_that_never_stops_is_bounded(tmp_path):
    model = scramble(build_model(ModelConfig(vocab_size=300, block_size=128, n_layer=1, n_head=2, n_embd=16)), 0)
    tok = byte_tokenizer()
    scorer = Scorer(model, tok)
    task = small_task(tmp_path, "gsm8k", 3)
    result = run_task(scorer, task, max_gen_tokens=20)
    for item in result.items:
        assert item["tokens"] == 20 and item["finish"] == "length"
    assert result.metrics["acc"] == 0.0 and scorer.truncated == 3  # 128-token context: the prompts were cut


def test_gsm8k_answer_extraction():
    assert extract_answer("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert extract_answer("so 1,234.0 apples") == "1234"
    assert extract_answer("no digits here") is None
    assert extract_answer("-3 then 7.5") == "7.5"


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_bad_code_is_contained():
    need_sandbox()  # the attacks on the sandbox itself are in test_sandbox.py
    task = load_task(shared_eval() / "human_eval.jsonl")
    recs = task.records[:8]
    outcomes = run_jobs([code_job(r, r["canonical_solution"]) for r in recs], Limits(timeout=20))
    assert all(o.passed for o in outcomes), [o.detail for o in outcomes]
    wrong = run_job(code_job(recs[0], "    return []\n"))
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    assert run_job(Job("while True:\n    pass\n"), Limits(timeout=2)).status == "timeout"
    hog = run_job(Job("x = bytearray(4 << 30)\n"), Limits(memory_mb=512))
    assert hog.status == "failed" and "MemoryError" in hog.detail
    assert run_job(Job("import os\nprint(os.getcwd())\nopen('f', 'w').write('ok')\n")).passed  # its own /tmp
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(5, 0, 1) == 0.0 and pass_at_k(2, 2, 1) == 1.0


def test_expected_calibration_error():
    calib = reliability(np.array([0.95, 0.95, 0.55, 0.55]), np.array([1, 0, 1, 1]), bins=10)
    # bin 0.9-1.0: conf 0.95, acc 0.5 → 0.45; bin 0.5-0.6: conf 0.55, acc 1 → 0.45; ECE = 0.45
    assert calib["ece"] == pytest.approx(0.45)
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 20000)
    assert reliability(conf, rng.uniform(size=conf.size) < conf)["ece"] < 0.02  # calibrated by construction
    assert reliability(conf, rng.uniform(size=conf.size) < conf / 2)["ece"] > 0.25  # overconfident
    with pytest.raises(ValueError):
        reliability(np.array([]), np.array([]))


def _checkpoint(tmp_path, seed=0):
    model = scramble(build_model(ModelConfig(vocab_size=300, block_size=256, n_layer=2, n_head=2, n_embd=32)), seed)
    return save_checkpoint(model, tmp_path / "run" / "checkpoints", step=1, tokenizer=byte_tokenizer())


def test_contamination_splits_clean_and_dirty_items(tmp_path):
    task = small_task(tmp_path, "arc_easy", 40)
    tok = byte_tokenizer()
    planted = [i for i, r in enumerate(task.records) if len(r["query"].split()) >= 16][:3]
    assert len(planted) == 3
    docs = ["an unrelated training document about sorting lists in python"] * 5
    docs += [f"notes: {task.records[i]['query']} and more" for i in planted]
    stream = np.concatenate([np.array([*tok.encode(d), tok.eot_id]) for d in docs])
    write_token_arrays(tmp_path / "shards", tok, {"train": stream, "val": stream[:50]})
    model = build_model(ModelConfig(vocab_size=300, block_size=256, n_layer=1, n_head=2, n_embd=16), seed=0)
    results = run_tasks(Scorer(model, tok), [task], contamination=str(tmp_path / "shards"))
    c = results["contamination"]["arc_easy"]
    assert c["dirty"] == 3 and c["clean_items"] == 37
    correct = {it["index"]: it["correct"] for it in results["items"]["arc_easy"]}
    assert c["acc_clean"] == pytest.approx(np.mean([v for i, v in correct.items() if i not in planted]))
    assert c["acc_all"] == pytest.approx(results["tasks"]["arc_easy"]["acc"])


def test_cli_writes_json_samples_plot_and_the_run_report(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    small_task(tmp_path, "copa", 10)
    small_task(tmp_path, "lambada_openai", 6)
    text = tmp_path / "doc.txt"
    text.write_text(shared_file("text/tinyshakespeare.txt").read_text()[:3000])
    out = tmp_path / "results.json"
    args = [
        "eval", str(ckpt), "--tasks", f"{tmp_path / 'copa.jsonl'},{tmp_path / 'lambada_openai.jsonl'}",
        "--shots", "1", "--out", str(out), "--perplexity", str(text), "--no-progress",
        "--calibration-plot", str(tmp_path / "run" / "reliability.png"), "--log-samples", str(tmp_path / "s.jsonl"),
    ]  # fmt: skip
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["tasks"]["copa"]["items"] == 10 and r["tasks"]["lambada_openai"]["items"] == 6
    assert set(r["tasks"]["copa"]) >= {"acc", "acc_norm", "random", "centered", "shots"}
    assert r["core"] == pytest.approx(np.mean([m["centered"] for m in r["tasks"].values()]))
    p = r["perplexity"][str(text)]
    assert p["tokens"] == p["bytes"] == 3000 and p["bpb"] == pytest.approx(p["nll"] / math.log(2))
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 16
    assert (tmp_path / "run" / "reliability.png").stat().st_size > 5000
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Evaluation" in report and "| copa | mc | 1 | 10 |" in report and "reliability.png" in report
    assert "| copa | mc | 1 | 10 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
        (["--tasks", "copa", "--shots", "500"], "500 shots asked"),
        ([], "nothing to evaluate"),
    ],
)
def test_cli_bad_input_gives_one_line_errors(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("GPTSTACK_TASKS", str(tmp_path))
    small_task(tmp_path, "copa", 10)
    assert main(["eval", str(_checkpoint(tmp_path)), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_reliability_plot_is_written(tmp_path):
    calib = reliability(np.array([0.9, 0.8, 0.3, 0.6]), np.array([1, 1, 0, 0]))
    assert plot_reliability(calib, tmp_path / "r.png").stat().st_size > 5000


def test_eval_imports_point_down():
    """The scorer is the floor of eval (tasks and the runner sit on it, never the reverse), and the
    scaling fits know nothing of training (the sweep in gptstack.train.sweep uses them)."""
    probe = (
        "import sys, gptstack.eval.scorer, gptstack.eval.scaling\n"
        "print(sorted(m for m in sys.modules if m.startswith(('gptstack.eval', 'gptstack.train'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['gptstack.eval',", "'gptstack.eval.scaling',", "'gptstack.eval.scorer']"]


def test_scaling_fits_recover_known_laws_and_extrapolate():
    from gptstack.eval.scaling import chinchilla, fit_chinchilla, fit_power_law, power_law

    C = np.geomspace(1e10, 1e12, 6)
    truth = {"a": 40.0, "alpha": 0.12, "L_inf": 1.1}
    L = power_law(truth, C) * (1 + np.array([0.002, -0.003, 0.001, 0.0, -0.002, 0.002]))  # measurement noise
    fit = fit_power_law(C, L)
    assert fit["rmse_rel"] < 0.005
    held = 4 * C[-1]
    assert power_law(fit, held) == pytest.approx(power_law(truth, held), rel=0.01)
    law = {"E": 1.2, "A": 30.0, "alpha": 0.35, "B": 60.0, "beta": 0.3}
    N = np.array([1e4, 2e4, 4e4, 8e4, 1.6e5, 2e4, 2e4, 4e4, 4e4])
    D = np.array([1e5, 2e5, 4e5, 8e5, 1.6e6, 5e4, 8e5, 1e5, 1.6e6])
    got = fit_chinchilla(N, D, chinchilla(law, N, D))
    assert chinchilla(got, 3.2e5, 3.2e6) == pytest.approx(chinchilla(law, 3.2e5, 3.2e6), rel=0.005)


@pytest.mark.slow
def test_scaling_cli_trains_a_sweep_predicts_and_resumes(tmp_path, capsys):
    from gptstack.data.shards import write_texts

    text = shared_file("text/tinyshakespeare.txt").read_text()
    write_texts(tmp_path / "shards", byte_tokenizer(), [text[i : i + 2000] for i in range(0, 400_000, 2000)])
    args = ["scaling", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "sweep"), "--widths", "8", "16",
            "24", "--n-layer", "1", "--context", "32", "--tokens-per-param", "4", "--extra-ratios", "1", "8",
            "--heldout-compute", "4", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    r = json.loads((tmp_path / "sweep" / "scaling.json").read_text())
    roles = [x["role"] for x in r["runs"]]
    assert roles.count("ladder") == 3 and roles.count("extra") == 4 and roles[-1] == "heldout"
    assert r["prediction"]["compute_ratio"] >= 4
    held = r["runs"][-1]
    assert r["prediction"]["actual"] == held["loss"] and held["loss"] < min(x["loss"] for x in r["runs"][:3])
    assert r["prediction"]["error_L(C)"] == pytest.approx(abs(r["prediction"]["L(C)"] - held["loss"]) / held["loss"])
    assert (tmp_path / "sweep" / "scaling.png").stat().st_size > 10_000
    assert "Held-out run at" in (tmp_path / "sweep" / "report.md").read_text()
    first = capsys.readouterr().out
    before = {p.name: p.stat().st_mtime for p in (tmp_path / "sweep").iterdir() if p.is_dir()}
    assert main(args) == 0  # a rerun reuses every finished run
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "sweep").iterdir() if p.is_dir()} == before
    assert capsys.readouterr().out == first


def test_synthetic_icl_tasks_have_one_consistent_rule_unseen_in_training(tmp_path):
    import random

    from gptstack.eval.synthetic import FAMILIES, SEP, draw_rule, episode, train_tokenizer, training_text, write_tasks

    paths = write_tasks(tmp_path, items=150)
    assert [p.name for p in paths] == [f"icl_{f}.jsonl" for f in FAMILIES]
    train = training_text(2000)
    episodes = [set(e.split(SEP)) for e in train]
    tok = train_tokenizer(train)
    for path in paths:
        task = load_task(path)
        assert task.kind == "lm" and len(task.records) == 150
        answer: dict[str, str] = {}
        for r in task.records:
            assert answer.setdefault(r["context"], r["continuation"]) == r["continuation"]  # a function
        assert len(answer) == {"lookup": 6, "mapping": 5, "copy": 1}[path.stem.removeprefix("icl_")]
        lines = {f"{c} {a}" for c, a in answer.items()}
        assert not any(lines <= e for e in episodes)  # a new rule, never a training one
        for c, a in answer.items():  # every input and every answer number or word is one token
            assert len(tok.encode(c)) == 1 and len(tok.encode(" " + a)) == len(a.split())
        shot = tok.encode(demonstration(task, task.records[0]) + "\n\n")
        assert len(shot) == 2 + len(task.records[0]["continuation"].split())
    assert episode(random.Random(3)) == episode(random.Random(3))
    with pytest.raises(ValueError, match="unknown family"):
        draw_rule("sort", random.Random(0))
