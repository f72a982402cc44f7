"""Chain of thought and self-consistency (gptstack/eval/cot.py): answer extraction, maj@k with ties, pass@k
against enumeration, parity with lm-eval's majority_vote filter, the K samples of an item sharing its
prompt's KV blocks in the engine, and `gptstack eval --tasks gsm8k --cot --samples 4` end to end."""

from __future__ import annotations

import itertools
import json
import os
import random

import pytest
from conftest import scramble, shared_file

from gptstack.checkpoint import save_checkpoint
from gptstack.cli import main
from gptstack.config import ModelConfig
from gptstack.eval.cot import (
    COT_TRIGGER,
    Sampling,
    cot_demonstration,
    cot_prompt,
    extract_cot,
    majority,
    pass_at_k,
    run_cot,
    sample_fanout,
    tied,
)
from gptstack.eval.run import run_report_of
from gptstack.eval.scorer import Scorer
from gptstack.eval.tasks import Task, TaskError, load_task, run_task
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.model import build_model
from gptstack.tokenizer import byte_tokenizer

BS = 16  # the engine's default KV block size


def lm_eval_majority(rows: list[list[str | None]]) -> list[str | None]:
    """lm-eval's own majority_vote filter on our answers (None as its "[invalid]")."""
    if os.environ.get("CI"):
        import lm_eval.filters.selection as selection
    else:
        selection = pytest.importorskip("lm_eval.filters.selection")
    resps = [["[invalid]" if a is None else a for a in row] for row in rows]
    return [None if v == "[invalid]" else v for (v,) in selection.MajorityVoteFilter().apply(resps, None)]


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer byte-level model with a 512-token context (GSM8K prompts fit)."""
    return scramble(build_model(ModelConfig(vocab_size=300, block_size=512, n_layer=2, n_head=2, n_embd=32)), 0)


@pytest.fixture(scope="module")
def gsm8k():
    return load_task(shared_file("eval/gsm8k.jsonl"))


def first(task: Task, n: int) -> Task:
    return Task(task.name, task.kind, task.records[:n], task.path)


# ---- prompts and extraction ---------------------------------------------------------------------------


def test_extraction_prefers_the_answer_phrase_then_hashes_then_the_last_number():
    assert extract_cot("3 + 4 = 7. The answer is 7. Question: 2 + 2? The answer is 4.") == "7"  # the first one
    assert extract_cot("so $1,250.00 in all. The answer is: $1,250.") == "1250"
    assert extract_cot("Half of 9 is 4.5\nThe answer is 4.50") == "4.5"
    assert extract_cot("16 - 3 = 13 #### 13 then 99") == "13"
    assert extract_cot("first 12, then 5 * 3 = 15 eggs") == "15"
    assert extract_cot("the answer is -3") == "-3"
    assert extract_cot("no digits at all") is None


def test_cot_prompt_and_demonstration_format(gsm8k):
    rec = gsm8k.records[0]
    assert cot_prompt(rec) == f"Question: {rec['context']}\nAnswer: {COT_TRIGGER}"
    demo = cot_demonstration(rec)
    assert demo.startswith(cot_prompt(rec) + " ") and demo.endswith(f"The answer is {rec['answer']}.")
    assert "<<" not in demo and "16 - 3 - 4 = 9" in demo  # GSM8K's calculator notes are removed
    assert extract_cot(demo[len(cot_prompt(rec)) :]) == rec["answer"]


# ---- maj@k and pass@k -----------------------------------------------------------------------------------


def test_majority_ties_are_not_a_majority():
    assert majority(["3", "5", "3", None]) == "3"
    assert majority(["3", "5", "5", "3"]) is None and tied(["3", "5", "5", "3"])
    assert majority(["3", "5", "5", "3"], ties="first") == "3"  # lm-eval's rule: the first of the tied
    assert majority(["5", "3", "3", "5", "7"], ties="first") == "5"
    assert majority([None, None, "4"]) is None and not tied([None, None, "4"])  # "no answer" won
    assert majority(["8"]) == "8" and majority([]) is None
    with pytest.raises(ValueError, match="ties"):
        majority(["1"], ties="random")


def test_pass_at_k_equals_enumerating_every_subset():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                outcomes = [True] * c + [False] * (n - c)
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert 0 < pass_at_k(200, 3, 100) < 1  # C(200, 100) ~ 9e58: the product form has no overflow


def test_majority_matches_lm_eval_majority_vote_on_random_votes():
    rng = random.Random(0)
    rows = [[rng.choice(["1", "2", "3", None]) for _ in range(rng.randint(1, 8))] for _ in range(500)]
    theirs = lm_eval_majority(rows)
    assert [majority(r, ties="first") for r in rows] == theirs  # identical everywhere on lm-eval's rule
    strict = [majority(r) for r in rows]
    assert all(s == t for s, t, r in zip(strict, theirs, rows, strict=True) if not tied(r))  # agree with a majority
    ties = [r for r in rows if tied(r)]
    assert len(ties) > 50 and all(majority(r) is None for r in ties)  # and ours counts a tie wrong


# ---- generation through the engine ---------------------------------------------------------------------


def test_the_k_samples_of_an_item_share_its_prompt_blocks(tiny, gsm8k):
    tok = byte_tokenizer()
    prompts = [tok.encode_prompt(cot_prompt(r)) for r in gsm8k.records[:3]]
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    sampled = SamplingParams(temperature=1.0, max_tokens=6, seed=7)
    engine = Engine(tiny, EngineConfig(max_seqs=8), tokenizer=tok)
    out = sample_fanout(engine, prompts, greedy, sampled, k=4)
    full = [(len(p) - 1) // BS * BS for p in prompts]  # full blocks before the last prompt token
    for (g, samples), shared in zip(out, full, strict=True):
        assert g.num_cached_tokens == 0 and len(samples) == 4
        assert [s.num_cached_tokens for s in samples] == [shared] * 4  # every sample took the prompt's blocks
    assert engine.stats["prefix_hits"] == 4 * sum(full) > 0
    texts = [s.token_ids for s in out[0][1]]
    assert len({tuple(t) for t in texts}) > 1  # different seeds, different samples
    # the same requests added all at once compute every prompt (nothing is named yet), so none is shared
    at_once = Engine(tiny, EngineConfig(max_seqs=16, max_step_tokens=4096), tokenizer=tok)
    at_once.generate([p for p in prompts for _ in range(5)], [greedy, *[sampled] * 4] * 3)
    assert at_once.stats["prefix_hits"] == 0
    again = sample_fanout(Engine(tiny, EngineConfig(max_seqs=8), tokenizer=tok), prompts, greedy, sampled, k=4)
    assert [[s.token_ids for s in ss] for _, ss in again] == [[s.token_ids for s in ss] for _, ss in out]  # seeded


def test_the_greedy_answer_is_the_plain_runs_and_samples_are_logged(tiny, gsm8k):
    task = first(gsm8k, 4)
    scorer = Scorer(tiny, byte_tokenizer())
    plain = run_task(scorer, task, max_gen_tokens=16)
    metrics, items = run_cot(scorer, task, Sampling(cot=False, samples=3, temperature=1.0), max_gen_tokens=16)
    assert [it["generation"] for it in items] == [it["generation"] for it in plain.items]
    assert metrics["acc"] == plain.metrics["acc"] and {"maj@3", "pass@1", "pass@3"} <= metrics.keys()
    for it in items:
        assert len(it["samples"]) == 3 and it["n_correct"] == sum(s["correct"] for s in it["samples"])
        gold = task.records[it["index"]]["answer"]
        assert it["maj_correct"] == (it["majority"] is not None and it["majority"] == gold)
    assert metrics["prefix_shared"] > 0


def test_bad_sampling_options_are_refused(tiny, gsm8k):
    with pytest.raises(TaskError, match="--samples"):
        Sampling(samples=0)
    with pytest.raises(TaskError, match="temperature"):
        Sampling(samples=4, temperature=0.0)
    mc = Task("copa", "mc", [{"query": "a", "choices": ["b", "c"], "gold": 0}])
    with pytest.raises(TaskError, match="math tasks"):
        run_cot(Scorer(tiny, byte_tokenizer()), mc, Sampling())


def test_gptstack_eval_gsm8k_cot_samples_end_to_end(tmp_path, tiny, capsys):
    ckpt = save_checkpoint(tiny, tmp_path / "run" / "checkpoints", step=1, tokenizer=byte_tokenizer())
    log, out = tmp_path / "samples.jsonl", tmp_path / "results.json"
    argv = ["eval", str(ckpt), "--tasks", "gsm8k", "--cot", "--samples", "4", "--limit", "3", "--shots", "1",
            "--max-gen-tokens", "12", "--log-samples", str(log), "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    m = json.loads(out.read_text())["tasks"]["gsm8k"]
    assert m["items"] == 3 and {"acc", "maj@4", "pass@1", "pass@4", "no_majority"} <= m.keys()
    assert "maj@4" in capsys.readouterr().out
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and all(len(r["samples"]) == 4 for r in rows)
    assert all(r["tokens"] <= 12 and all(s["tokens"] <= 12 for s in r["samples"]) for r in rows)
    votes = [[s["extracted"] for s in r["samples"]] for r in rows]  # parity on the logged file itself
    assert [majority(v, ties="first") for v in votes] == lm_eval_majority(votes)
    assert main(["eval", str(ckpt), "--tasks", "copa", "--cot", "--no-progress"]) == 2  # no math task: refused
    assert "math tasks" in capsys.readouterr().err
    (tmp_path / "model.gguf").touch()
    assert run_report_of(tmp_path / "model.gguf") is None  # a GGUF file has no run report to append to


@pytest.mark.slow
def test_smollm2_gsm8k_cot_samples_are_real_answers_and_match_lm_eval(smollm2, gsm8k):
    """SmolLM2-135M-Instruct, 3 GSM8K items, 4 samples: the samples reason to numbers, share the prompt's
    blocks, and lm-eval's majority_vote agrees with ours on the logged votes (on its tie rule)."""
    scorer = Scorer(smollm2, smollm2.tokenizer)
    metrics, items = run_cot(scorer, first(gsm8k, 3), Sampling(cot=True, samples=4), max_gen_tokens=96)
    votes = [[s["extracted"] for s in it["samples"]] for it in items]
    assert sum(v is not None for row in votes for v in row) >= 9  # most samples end in a number
    assert len({s["text"] for it in items for s in it["samples"]}) == 12  # sampled, not greedy copies
    assert [majority(v, ties="first") for v in votes] == lm_eval_majority(votes)
    assert [it["majority"] for it in items] == [None if tied(v) else majority(v, "first") for v in votes]
    assert metrics["prefix_shared"] >= 4 * 3 * 16  # every sample took at least one block of its prompt
