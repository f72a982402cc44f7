"""Pretraining: the recipe's schedules, the loop on real shards, guards, bad input, exact resume after
SIGKILL, and DDP / FSDP2 on 2 gloo processes matching 1 process."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptstack import checkpoint as ckpt
from gptstack.config import ConfigError, get_preset
from gptstack.data.pipeline import LocalExecutor, PrepareConfig, prepare
from gptstack.data.shards import write_token_arrays
from gptstack.model import GPT, build_model, count_params
from gptstack.tokenizer import train_bpe, train_chars
from gptstack.train import optim
from gptstack.train.config import TrainConfig, make_config
from gptstack.train.loop import Trainer, TrainingError, pretrain
from gptstack.train.metrics import read_metrics
from gptstack.train.plan import plan_run

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["argparse.py", "ast.py", "base64.py", "calendar.py", "csv.py", "dataclasses.py", "difflib.py",
           "enum.py", "fractions.py", "functools.py", "heapq.py", "inspect.py", "pathlib.py", "random.py",
           "shlex.py", "statistics.py", "textwrap.py", "typing.py"]  # fmt: skip
MICRO = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
MICRO_SET = [f"{k}={v}" for k, v in MICRO.items()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Real stdlib modules through the real pipeline, byte-level tokens (~0.6M train tokens)."""
    root = tmp_path_factory.mktemp("train")
    src = root / "src"
    src.mkdir()
    for name in MODULES:
        shutil.copy(STDLIB / name, src / name)
    cfg = PrepareConfig(out=str(root / "shards"), inputs=[str(src)], tokenizer="bytes", dedup="none", val_fraction=0.15)
    prepare(cfg, LocalExecutor(1), progress=False)
    return root / "shards"


def micro_cfg(shards: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(shards), out=str(out), model="tiny", model_overrides=dict(MICRO), batch_size=4,
                max_steps=20, lr=3e-3, eval_every=10, eval_batches=2, sample_tokens=8, progress=False,
                tensorboard=False, checkpoint_every=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


# ---- the recipe --------------------------------------------------------------------------------------
def test_lr_schedule_warmup_cosine_floor():
    peak, lo = 6e-4, 0.1
    assert optim.lr_at(0, peak, 100, 1000, lo) == 0.0
    assert optim.lr_at(50, peak, 100, 1000, lo) == pytest.approx(peak / 2)
    assert optim.lr_at(100, peak, 100, 1000, lo) == pytest.approx(peak)
    assert optim.lr_at(550, peak, 100, 1000, lo) == pytest.approx(peak * (lo + (1 - lo) / 2))  # half-way: midpoint
    assert optim.lr_at(1000, peak, 100, 1000, lo) == pytest.approx(peak * lo)
    assert optim.lr_at(10**9, peak, 100, 1000, lo) == pytest.approx(peak * lo)  # GPT-3: stays at 10% after decay
    values = [optim.lr_at(t, peak, 100, 1000, lo) for t in range(100, 1001, 10)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_batch_ramp_and_plan():
    micro, full = 1000, 8  # full batch 8k tokens
    assert optim.accum_steps_at(0, micro, full, 2000, 80_000) == 2
    assert optim.accum_steps_at(40_000, micro, full, 2000, 80_000) == 5  # 2k + 6k/2
    assert optim.accum_steps_at(80_000, micro, full, 2000, 80_000) == full
    assert optim.accum_steps_at(0, micro, full, None, 0) == full
    assert optim.plan(micro, full, None, 0, 10, None) == (10, 80_000)
    assert optim.plan(micro, full, None, 0, None, 20_000) == (3, 24_000)
    steps, tokens = optim.plan(micro, full, 2000, 80_000, None, 200_000)
    assert tokens >= 200_000 and steps > 200_000 // 8000  # smaller early batches → more steps
    with pytest.raises(ValueError, match="how long"):
        optim.plan(micro, full, None, 0, None, None)


def test_weight_decay_groups():
    model = build_model(get_preset("tiny", vocab_size=300, tie_embeddings=False, **MICRO), seed=0)
    decay, no_decay = optim.param_groups(model, 0.1, decay_embeddings=False)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.h.0.attn.c_attn.weight" in decay["names"] and "lm_head.weight" in decay["names"]
    for name in ("transformer.h.0.attn.c_attn.bias", "transformer.h.0.ln_1.weight", "transformer.wpe.weight",
                 "transformer.wte.weight"):  # fmt: skip
        assert name in no_decay["names"]
    decay, _ = optim.param_groups(model, 0.1, decay_embeddings=True)
    assert "transformer.wpe.weight" in decay["names"]
    n = sum(p.numel() for g in optim.param_groups(model, 0.1) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


# ---- the loop ------------------------------------------------------------------------------------------
def test_pretrain_learns_and_writes_run(shards, tmp_path):
    run = tmp_path / "run"
    summary = pretrain(micro_cfg(shards, run, max_steps=40, tensorboard=True))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"):
        assert all(math.isfinite(r[key]) for r in records), key
    first, last = sum(r["loss"] for r in records[:5]) / 5, sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 1.0, (first, last)  # byte-level: from ~ln(320) towards the character statistics
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert 0 < evals[-1]["val_bpb"] < 8  # byte tokens: bits per byte = loss / ln 2 on ordinary bytes
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2), rel=0.05)
    assert len(summary["samples"]) == len(TrainConfig().sample_prompts)
    assert summary["peak_source"].startswith("measured CPU fp32 matmul")
    # report and plot
    report = (run / "report.md").read_text()
    assert "## Pretraining" in report and "loss.png" in report and "Samples" in report
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    try:
        import tensorboard  # noqa: F401

        assert any((run / "tb").iterdir())
    except ImportError:
        pass
    # the checkpoint is a complete, self-describing folder that generation can load
    model = ckpt.load_model(run)
    assert model.tokenizer.name == "bytes" and ckpt.resolve(run).name == "step-000040"
    state = ckpt.load_training_state(run)
    assert state["step"] == 40 and state["tokens"] == records[-1]["tokens"] and "optimizer" in state


def test_budget_sizing(shards, tmp_path):
    t = Trainer(micro_cfg(shards, tmp_path / "a", max_steps=None, budget="chinchilla"))
    total = count_params(t.model_cfg)["total"]
    assert t.schedule.tokens >= 20 * total and t.schedule.tokens - 20 * total < t.plan.micro_tokens
    fresh = build_model(t.model_cfg, seed=t.cfg.seed).state_dict()
    t = Trainer(micro_cfg(shards, tmp_path / "b", max_steps=None, budget="3s"))
    after = torch.get_rng_state()
    assert t.schedule.tokens > 0 and t.schedule.steps >= 1
    assert t.tokens == 0 and t.loader.position == 0  # the probe consumed no data,
    assert all(torch.equal(v, t.base.state_dict()[k]) for k, v in fresh.items())  # changed no weight,
    assert not t.optimizer.state  # left no AdamW state,
    assert torch.equal(after, torch.manual_seed(t.cfg.seed).get_state())  # and drew no random numbers
    with pytest.raises(ConfigError, match="chinchilla"):
        micro_cfg(shards, tmp_path / "c", budget="10 minutes")


def test_a_run_is_planned_without_building_a_model(shards, tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("plan_run built a model")  # counting parameters on the meta device is free

    monkeypatch.setattr(GPT, "init_weights", no_weights)
    plan = plan_run(micro_cfg(shards, tmp_path / "run", max_steps=None, batch_tokens=8 * 32), world=2)
    assert plan.model == get_preset("tiny", vocab_size=320, **MICRO)  # bytes: 256 + 5 specials, padded to 64
    assert (plan.seq_len, plan.micro_tokens, plan.full_accum) == (32, 2 * 4 * 32, 1)
    total = count_params(plan.model)["total"]
    assert plan.schedule.tokens >= 20 * total and plan.schedule.steps == -(-plan.schedule.tokens // (8 * 32))
    assert plan.schedule.warmup == plan.schedule.tokens // 20 and plan.schedule.decay == plan.schedule.tokens
    assert plan.tokenizer.name == "bytes" and plan.resume_from is None
    assert plan_run(micro_cfg(shards, tmp_path / "run", max_steps=None, budget="5m")).schedule is None  # timed
    with pytest.raises(ConfigError, match="not a multiple"):
        plan_run(micro_cfg(shards, tmp_path / "run", batch_tokens=8 * 32), world=3)
    assert not (tmp_path / "run").exists()


def test_batch_ramp_and_accumulation(shards, tmp_path):
    run = tmp_path / "ramp"
    cfg = micro_cfg(shards, run, batch_tokens=4 * 128, batch_ramp_start=128, batch_ramp_tokens=2048, max_steps=10)
    pretrain(cfg)
    sizes = [r["batch_tokens"] for r in read_metrics(run / "metrics.jsonl")]
    assert sizes[0] == 128 and sizes[-1] == 512 and sizes == sorted(sizes)


def test_accumulation_matches_one_big_batch(shards, tmp_path):
    """8 sequences in one micro-batch == 2 micro-batches of 4 accumulated (same data, same update)."""
    pretrain(micro_cfg(shards, tmp_path / "one", batch_size=8, max_steps=6))
    pretrain(micro_cfg(shards, tmp_path / "acc", batch_size=4, batch_tokens=8 * 32, max_steps=6))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "acc")
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_activation_checkpointing_and_precisions(shards, tmp_path):
    pretrain(micro_cfg(shards, tmp_path / "ref", max_steps=5))
    pretrain(micro_cfg(shards, tmp_path / "ac", max_steps=5, activation_checkpointing=True))
    assert max(abs(x - y) for x, y in zip(losses(tmp_path / "ref"), losses(tmp_path / "ac"), strict=True)) < 1e-5
    for dtype in ("bf16", "fp16"):  # CPU autocast; fp16 goes through the GradScaler
        pretrain(micro_cfg(shards, tmp_path / dtype, max_steps=5, dtype=dtype))
        trace = losses(tmp_path / dtype)
        assert len(trace) == 5 and all(math.isfinite(x) for x in trace[1:])
        assert abs(trace[0] - losses(tmp_path / "ref")[0]) < 0.05


@pytest.mark.slow
def test_compile_matches_eager(shards, tmp_path):
    # no evaluation: it would compile a second (eval-mode) graph, and the losses compared are the train steps'
    pretrain(micro_cfg(shards, tmp_path / "eager", max_steps=4, eval_every=0))
    pretrain(micro_cfg(shards, tmp_path / "compiled", max_steps=4, compile=True, eval_every=0))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert max(abs(x - y) for x, y in zip(eager, compiled, strict=True)) < 1e-3


# ---- guards --------------------------------------------------------------------------------------------
def _nan_on(trainer: Trainer, calls: set[int]) -> None:
    """Make the first block's output NaN on the given forward calls (1-based)."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        if count[0] in calls:
            return (output[0] * float("nan"), output[1])
        return output

    trainer.base.transformer.h[0].register_forward_hook(hook)


def test_non_finite_step_is_skipped_and_counted(shards, tmp_path):
    trainer = Trainer(micro_cfg(shards, tmp_path / "run", max_steps=6, eval_every=0))
    _nan_on(trainer, {3})  # forward 3 = step 3 (evaluation only runs at the end)
    weights = trainer.base.transformer.h[1].mlp.c_fc.weight
    seen = {}

    def snapshot(module, args):  # the weights entering steps 3 and 4
        if trainer.step in (2, 3) and trainer.base.training:
            seen[trainer.step] = weights.detach().clone()

    trainer.base.register_forward_pre_hook(snapshot)
    trainer.run()
    assert torch.equal(seen[2], seen[3])  # the NaN step changed nothing
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert math.isnan(records[2]["loss"]) and records[2]["skipped"] == 1 and records[-1]["skipped"] == 1
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    assert trainer.skipped == 1


def test_repeated_failures_stop_with_last_good_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(micro_cfg(shards, run, max_steps=20, checkpoint_every=4, eval_every=0, max_bad_steps=3))
    _nan_on(trainer, set(range(7, 100)))
    with pytest.raises(TrainingError, match=r"3 consecutive steps .* Last good checkpoint: .*step-000004"):
        trainer.run()
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-000004"]
    ckpt.load_model(run)  # intact: checksums verify
    assert ckpt.load_training_state(run)["step"] == 4


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_input_fails_before_compute(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a shard folder"):
        Trainer(micro_cfg(tmp_path / "nowhere", tmp_path / "r"))
    with pytest.raises(ConfigError, match="does not fit the model's context"):
        Trainer(micro_cfg(shards, tmp_path / "r", seq_len=64))
    with pytest.raises(ConfigError, match="not a multiple"):
        Trainer(micro_cfg(shards, tmp_path / "r", batch_tokens=100))
    with pytest.raises(ValueError, match="fewer than one step needs"):
        Trainer(micro_cfg(shards, tmp_path / "r", batch_size=100_000))
    with pytest.raises(ConfigError, match="smaller than the data tokenizer"):
        Trainer(micro_cfg(shards, tmp_path / "r", model={**get_preset("tiny", **MICRO).to_dict(), "vocab_size": 100}))
    with pytest.raises(ConfigError, match="unknown config field 'lrr'"):
        make_config(None, "tiny", ["lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown preset"):
        Trainer(micro_cfg(shards, tmp_path / "r", model="gpt9"))
    assert not (tmp_path / "r").exists()  # nothing was written


def test_resume_refuses_incompatible_checkpoints(shards, tmp_path):
    run = tmp_path / "run"
    pretrain(micro_cfg(shards, run, max_steps=3))
    with pytest.raises(ConfigError, match="already has checkpoints"):
        Trainer(micro_cfg(shards, run, max_steps=6))
    with pytest.raises(ConfigError, match=r"different model \(fields differ: n_layer\)"):
        Trainer(micro_cfg(shards, run, max_steps=6, model_overrides={**MICRO, "n_layer": 3}), resume=True)
    other = tmp_path / "other"  # the same documents, another tokenizer of the same size class
    src = shards.parent / "src"
    bpe = train_bpe([p.read_text() for p in src.iterdir()], 300, "cl100k", name="bpe300").save(tmp_path / "bpe300")
    prepare(PrepareConfig(out=str(other), inputs=[str(src)], tokenizer=str(bpe), dedup="none", val_fraction=0.15),
            LocalExecutor(1), progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="tokenized with 'bytes'"):
        Trainer(micro_cfg(other, run, max_steps=6), resume=True)
    # a corrupt newest checkpoint is refused, never half-loaded
    newest = ckpt.resolve(run)
    with open(newest / "optimizer.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(micro_cfg(shards, run, max_steps=6), resume=True)


# ---- exact resume after SIGKILL --------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptstack.cli", *args]


def _env(threads: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}


@pytest.mark.slow
def test_sigkill_resume_is_exact(shards, tmp_path):
    common = ["pretrain", "--data", str(shards), "--preset", "tiny", "--max-steps", "80", "--batch-size", "4",
              "--no-progress", *(x for s in MICRO_SET for x in ("--set", s)), "--set", "checkpoint_every=4",
              "--set", "eval_every=20", "--set", "eval_batches=2", "--set", "sample_tokens=4",
              "--set", "tensorboard=false"]  # fmt: skip
    ref = tmp_path / "ref"
    subprocess.run(_cli(*common, "--out", str(ref)), check=True, env=_env(), capture_output=True)
    run = tmp_path / "killed"
    rng = random.Random(0)
    kills, during_save = 0, 0
    for attempt in range(7):  # each start costs an interpreter and a torch import: 3-4 kills are enough
        proc = subprocess.Popen(_cli(*common, "--out", str(run), "--resume"), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        if attempt % 2 == 0:  # kill the moment a save is in flight
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if any((run / "checkpoints").glob(".tmp-step-*")):
                    break
                time.sleep(0.002)
            during_save += proc.poll() is None
        else:  # kill mid-run, a random 1-8 steps after this attempt's first: by progress, not by the clock,
            # so a fast machine cannot finish the run before enough kills (a sleep here once flaked in CI)
            target = len(read_metrics(run / "metrics.jsonl")) + rng.randint(1, 8)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if len(read_metrics(run / "metrics.jsonl")) >= target:
                    break
                time.sleep(0.005)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        for folder in ckpt.list_checkpoints(run / "checkpoints"):  # never a half-written checkpoint
            _, meta = ckpt.read_meta(folder)
            ckpt.verify_files(folder, meta)
    else:
        subprocess.run(_cli(*common, "--out", str(run), "--resume"), check=True, env=_env(), capture_output=True)
    assert kills >= 3 and during_save >= 1
    done = subprocess.run(_cli(*common, "--out", str(run), "--resume"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0  # already finished: resumes at the last step and stops
    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 81))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-exact on CPU
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]


# ---- torchrun: 2 gloo processes == 1 process ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(shards, tmp_path, mode):
    common = ["pretrain", "--data", str(shards), "--preset", "tiny", "--max-steps", "8", "--no-progress",
              *(x for s in MICRO_SET for x in ("--set", s)), "--set", "eval_every=4", "--set", "eval_batches=2",
              "--set", "sample_tokens=4", "--set", "tensorboard=false", "--set", "checkpoint_every=4"]  # fmt: skip
    one = subprocess.run(_cli(*common, "--batch-size", "8", "--out", str(tmp_path / "one")),
                         env=_env(2), capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "gptstack.cli", *common, "--batch-size", "4", "--distributed", mode]
    two = subprocess.run(
        [*cmd, "--out", str(tmp_path / "two")], env=_env(1), capture_output=True, text=True, timeout=300
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(a) == len(b) == 8 and all(r["batch_tokens"] == 8 * 32 for r in b)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) < 1e-5
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 1e-5
    # the 2-process checkpoint is the same model: it loads on one process and resumes there
    w1, w2 = ckpt.load_model(tmp_path / "one").state_dict(), ckpt.load_model(tmp_path / "two").state_dict()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert ckpt.load_training_state(tmp_path / "two")["world"] == 2
    longer = _cli(*common[:6], "12", *common[7:], "--batch-size", "8", "--resume", "--out", str(tmp_path / "two"))
    cont = subprocess.run(longer, env=_env(2), capture_output=True, text=True)
    assert cont.returncode == 0, cont.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")] == list(range(1, 13))
    assert torch.isfinite(torch.tensor(losses(tmp_path / "two"))).all()


def test_make_config_precedence_and_token_arrays(tmp_path):
    cfg = make_config(None, "gpt3-xl", [])
    assert (cfg.lr, cfg.batch_tokens, cfg.batch_ramp_start) == (2e-4, 2**20, 32_768)  # GPT-3 Table 2.1
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 1e-4, "eval_every": 7}))
    cfg = make_config(str(path), "tiny", ["lr=5e-4", "n_layer=3"], lr=None, max_steps=9)
    assert (cfg.lr, cfg.eval_every, cfg.max_steps, cfg.batch_size) == (5e-4, 7, 9, 8)  # --set beats the file
    assert cfg.model == "tiny" and cfg.model_overrides == {"n_layer": 3}
    again = TrainConfig.from_file(path.with_name("c.json"))
    assert again.eval_every == 7
    for text, message in (("{not json", "c.json: not valid JSON"), ("[1]", "expected a JSON object")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            make_config(str(path), "tiny", [])
    with pytest.raises(ConfigError, match=r"config file .*nope\.json does not exist"):
        TrainConfig.from_file(tmp_path / "nope.json")
    # a shard folder from streams tokenized elsewhere trains like a prepared one
    tok = train_chars(["abcdefgh ij\n" * 50])
    ids = np.array(tok.encode("abc defg hij\n" * 400), dtype=np.int64)
    write_token_arrays(tmp_path / "s", tok, {"train": ids[:4000], "val": ids[4000:]})
    summary = pretrain(
        micro_cfg(
            tmp_path / "s",
            tmp_path / "run",
            max_steps=80,
            lr=1e-2,
            vocab_multiple=1,
            sample_prompts=["import ", "abc "],
        )
    )  # "import " is not encodable: skipped
    assert [s["prompt"] for s in summary["samples"]] == ["abc "]
    assert summary["model"]["vocab_size"] == tok.n_vocab == 12 + 5  # 12 characters + 5 special tokens
    assert summary["val_loss"] < 1.0  # a periodic text is learnt quickly
