"""`speedrun`: the whole main job on a few stdlib modules, then reruns that skip, redo a removed stage,
and resume an interrupted pretraining exactly."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from gptstack import checkpoint as ckpt
from gptstack.data.sources import default_corpus
from gptstack.posttrain.chatset import KINDS, first_sentence, module_facts, stdlib_chat_set
from gptstack.speedrun import STAGES, Run, SpeedrunConfig, Stage, do_stage, file_digest, results_table, speedrun
from tests.conftest import SHARED_DATA

MODULES = ("textwrap", "fnmatch", "glob", "heapq", "bisect", "copy", "base64", "shlex")
# A model and a run small enough for seconds on 2 cores; fixed steps, so the resumed run can be compared.
OVERRIDES = [
    "n_layer=1", "n_head=2", "n_embd=32", "block_size=128", "batch_size=4", "max_steps=8", "checkpoint_every=2",
    "eval_batches=2", "eval_every=0", "sample_tokens=8", 'sample_prompts=["def "]',
]  # fmt: skip


def test_chat_set_is_real_and_has_known_answers():
    rows = stdlib_chat_set()
    assert len(rows) >= 300
    assert {r["kind"] for r in rows} == set(KINDS)
    assert rows == stdlib_chat_set()  # deterministic
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][1]["content"] == r["answer"] and r["answer"]
    imports = {r["messages"][0]["content"]: r["answer"] for r in rows if r["kind"] == "import"}
    assert imports["How do I import `textwrap.dedent`?"] == "from textwrap import dedent"
    assert first_sentence("Return the sum.\n\nMore text.") == "Return the sum."
    assert first_sentence("no full stop here") is None
    facts = module_facts("m", 'def f(a, b=1):\n    """Add a and b. Then more."""\ndef _g():\n    """Hidden."""\n')
    assert [(f.name, f.signature, f.summary) for f in facts] == [("f", "f(a, b=1)", "Add a and b.")]


def test_skip_rule(tmp_path):
    """A stage is skipped while its settings, its inputs' outputs and its own output are unchanged;
    one that starts over loses its old artifacts first; a changed output reruns what needs it."""
    calls = []

    def stage(name, needs, key, content):
        def run(r):
            calls.append(name)
            assert not r.path(f"{name}.old").exists()  # removed when starting over
            r.path(f"{name}.txt").write_text(content())
            return {"headline": name}

        return Stage(name, needs, (key,), (f"{name}.txt", f"{name}.old"), False, run,
                     lambda r: file_digest(r.path(f"{name}.txt")), lambda r, f: None)  # fmt: skip

    version = {"a": "1"}
    a, b = stage("a", (), "vocab_size", lambda: version["a"]), stage("b", ("a",), "preset", lambda: "b")

    def go(**settings):
        run = Run(SpeedrunConfig(out=str(tmp_path), **settings))
        calls.clear()
        for k, s in enumerate((a, b), 1):
            do_stage(run, k, s)
        return list(calls)

    assert go() == ["a", "b"]
    assert go() == []
    (tmp_path / "a.txt").unlink()
    assert go() == ["a"]  # the same output again: b stays
    version["a"] = "2"
    (tmp_path / "a.txt").write_text("tampered")
    assert go() == ["a", "b"]  # a new output: b reruns
    (tmp_path / "a.old").write_text("")
    assert go(vocab_size=300) == ["a"]  # new settings: a starts over; its output is the same, so b stays
    assert go(vocab_size=300, preset="tiny-llama") == ["b"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished speedrun and the summary of its first call."""
    root = tmp_path_factory.mktemp("speedrun")
    src = root / "src"
    src.mkdir()
    for name in MODULES:
        shutil.copy(default_corpus() / f"{name}.py", src / f"{name}.py")
    copa = SHARED_DATA / "eval" / "copa.jsonl"
    cfg = SpeedrunConfig(
        out=str(root / "run"), budget="20s", input=[str(src)], vocab_size=300, overrides=OVERRIDES,
        tasks=[str(copa)] if copa.is_file() else [], task_limit=8, held_out=8, workers=1, progress=False,
    )  # fmt: skip
    return cfg, speedrun(cfg)


@pytest.mark.slow
def test_speedrun_writes_every_stage_and_the_report_card(finished):
    cfg, summary = finished
    out = Path(summary["out"])
    assert summary["ran"] == [s.name for s in STAGES]
    for path in ("tokenizer/gptstack-tokenizer.json", "data/manifest.json", "metrics.jsonl", "loss.png", "eval.json",
                 "chat.jsonl", "chat.json", "speedrun.json", "report.md"):  # fmt: skip
        assert (out / path).exists(), path
    assert ckpt.resolve(summary["checkpoint"]).name == "step-000008"
    assert ckpt.resolve(summary["sft_checkpoint"]).parent == out / "sft"
    report = (out / "report.md").read_text()
    for heading in ("## Summary", "## Tokenizer", "## Data", "## Pretraining", "## Evaluation", "## SFT",
                    "## Chat", "![training loss and learning rate](loss.png)"):  # fmt: skip
        assert heading in report, heading
    assert report.count("| stage | wall time | key figures |") == 1
    for name in summary["stages"]:
        assert f". {name} |" in report
    sft = summary["stages"]["sft"]["figures"]
    assert sft["loss_before"] > 0 and sft["loss_after"] > 0
    chat = summary["stages"]["chat"]["figures"]
    assert set(chat["before"]) == set(chat["after"]) and "exact: import" in chat["after"]
    assert chat["sample"]["prompt"] == cfg.chat_prompt
    assert "total" in results_table(summary)


@pytest.mark.slow
def test_rerun_of_a_finished_run_skips_every_stage(finished):
    cfg, summary = finished
    t0 = time.perf_counter()
    again = speedrun(cfg)
    assert time.perf_counter() - t0 < 10
    assert again["ran"] == []
    assert again["stages"] == summary["stages"]


@pytest.mark.slow
def test_removed_artifacts_redo_only_their_stages(finished):
    """SFT and eval are deterministic: redone, they give the same output, so the chat stage stays."""
    cfg, summary = finished
    shutil.rmtree(Path(cfg.out) / "sft")
    (Path(cfg.out) / "eval.json").unlink()
    again = speedrun(cfg)
    assert again["ran"] == ["eval", "sft"]
    assert again["stages"]["sft"]["figures"]["checkpoint"] == summary["stages"]["sft"]["figures"]["checkpoint"]


@pytest.mark.slow
def test_interrupted_pretraining_resumes_exactly(finished):
    """Without its newest checkpoint the run looks killed after step 6: pretraining resumes from there,
    reaches the same weights bit for bit, and so nothing downstream is redone."""
    cfg, _ = finished
    newest = ckpt.resolve(Path(cfg.out) / "checkpoints")
    _, meta = ckpt.read_meta(newest)
    shutil.rmtree(newest)
    again = speedrun(cfg)
    assert again["ran"] == ["pretrain"]
    _, resumed = ckpt.read_meta(Path(cfg.out) / "checkpoints")
    assert resumed["step"] == meta["step"]
    assert resumed["files"]["model.safetensors"] == meta["files"]["model.safetensors"]
