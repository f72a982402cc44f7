"""Post-training hardening (issue 24, items 15-16): exact resume of SFT, reward, DPO, PPO and GPT-1
fine-tuning (from a checkpoint, and after a real SIGKILL), `latest` owned by the newest run, and the
non-finite guard (NaN margins, NaN rule rewards, a NaN starting checkpoint, NaN steps skipped)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptstack.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_heads,
    load_model,
    read_meta,
    resolve,
    save_checkpoint,
    step_dir,
    verify_files,
)
from gptstack.cli import main
from gptstack.config import ModelConfig
from gptstack.data.shards import write_texts
from gptstack.model import build_model
from gptstack.posttrain import demo
from gptstack.posttrain.common import DataError, StageConfig, StageRun, optimize
from gptstack.posttrain.dpo import DPOConfig, dpo
from gptstack.posttrain.finetune import FinetuneConfig, finetune
from gptstack.posttrain.ppo import PPOConfig, ppo
from gptstack.posttrain.reward import RewardConfig, train_reward
from gptstack.posttrain.sft import SFTConfig, encode_example, pack, sft, sft_loss
from gptstack.tokenizer import byte_tokenizer
from gptstack.train.loop import TrainingError
from gptstack.train.metrics import read_metrics

TOK = byte_tokenizer()
JUDGE = "rule:gptstack.posttrain.demo:judge"


def tiny(seed: int = 0):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=320, block_size=96, pos="rope")
    m = build_model(cfg, seed=seed)
    m.tokenizer = TOK
    return m


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair_rows(count: int) -> list[dict]:
    rows = []
    for n in range(10, 10 + count):
        rows.append({"prompt": demo.PROMPT.format(n=n), "chosen": f"{n - 3}+3", "rejected": f"{n} plus"})
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A random tiny checkpoint and each stage's data (real rows of the demo task)."""
    root = tmp_path_factory.mktemp("resume")
    save_checkpoint(tiny(), root / "init", tokenizer=TOK)
    write_jsonl(root / "sft.jsonl", demo.sft_rows(96, seed=0))
    write_jsonl(root / "pairs.jsonl", pair_rows(64))
    write_jsonl(root / "prompts.jsonl", demo.prompt_rows(32, seed=1))
    write_texts(root / "shards", TOK, [f"def f{i}(x):\n    return x + {i}\n" * 8 for i in range(16)], val_fraction=0.2)
    write_jsonl(
        root / "cls.jsonl", [{"text": f"item {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(80)]
    )
    return root


# the stage function, its config class, its data file and its own options
STAGES = {
    "sft": (sft, SFTConfig, "sft.jsonl", {}),
    "reward": (train_reward, RewardConfig, "pairs.jsonl", {}),
    "dpo": (dpo, DPOConfig, "pairs.jsonl", {}),
    "ppo": (ppo, PPOConfig, "prompts.jsonl", {"reward": JUDGE, "max_tokens": 8, "minibatch_size": 4, "ppo_epochs": 2}),
    "finetune": (finetune, FinetuneConfig, "cls.jsonl", {}),
    "sft-lora": (sft, SFTConfig, "sft.jsonl", {"lora_rank": 4, "lora_dropout": 0.1}),
    # PPO's own state: the adaptive β and the PPO-ptx cursor (set to the shards in stage_cfg)
    "ppo-ptx": (
        ppo,
        PPOConfig,
        "prompts.jsonl",
        {
            "reward": JUDGE,
            "max_tokens": 8,
            "minibatch_size": 4,
            "ppo_epochs": 1,
            "adaptive_kl": True,
            "kl_target": 0.5,
            "kl_horizon": 50,
            "ptx_coef": 0.5,
        },
    ),
}


def stage_cfg(name: str, inputs: Path, out: Path, **kw):
    _, cls, data, own = STAGES[name]
    own = {**own, "ptx_data": str(inputs / "shards")} if "ptx_coef" in own else own
    base = dict(init=str(inputs / "init"), data=str(inputs / data), out=str(out), batch_size=8, max_steps=6,
                checkpoint_every=3, warmup_steps=2, lr=1e-3, progress=False)  # fmt: skip
    return cls(**{**base, **own, **kw})


def run_stage(name: str, inputs: Path, out: Path, **kw) -> dict:
    return STAGES[name][0](stage_cfg(name, inputs, out, **kw))


def folder_of(name: str) -> str:
    return name.split("-")[0]  # sft-lora writes sft/


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of the weights (and heads) of the newest checkpoint under folder: equal means bitwise equal."""
    ckpt, meta = read_meta(folder)
    return {k: v["sha256"] for k, v in meta["files"].items() if k.endswith(".safetensors")} | {"step": ckpt.name}


def losses(folder: Path) -> list:
    return [(r["step"], r.get("loss", r.get("reward"))) for r in read_metrics(folder / "log.jsonl")]


# ---- exact resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(STAGES))
def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_weights(name, inputs, tmp_path):
    """A run cut back to its step-3 checkpoint and resumed ends bitwise where an uninterrupted run ends."""
    stage = folder_of(name)
    ref = run_stage(name, inputs, tmp_path / "ref")
    run_stage(name, inputs, tmp_path / "cut")
    cut = tmp_path / "cut" / stage
    assert [p.name for p in list_checkpoints(cut)] == ["step-000003", "step-000006"]
    shutil.rmtree(step_dir(cut, 6))  # as if killed after step 3's checkpoint
    resumed = run_stage(name, inputs, tmp_path / "cut", resume=True)
    assert resumed["resumed_at_step"] == 3
    assert digest(cut) == digest(tmp_path / "ref" / stage)
    assert losses(cut) == losses(tmp_path / "ref" / stage) and len(losses(cut)) == 6
    assert {k: v for k, v in resumed.items() if k != "resumed_at_step"} == pytest.approx(ref, nan_ok=True)
    if name == "sft":  # a finished run resumed: nothing left to train, the same checkpoint again
        again = run_stage(name, inputs, tmp_path / "cut", resume=True)
        assert again["resumed_at_step"] == 6 and digest(cut) == digest(tmp_path / "ref" / stage)


def test_resume_refuses_other_settings_or_data(inputs, tmp_path):
    run_stage("sft", inputs, tmp_path)
    with pytest.raises(CheckpointError, match=r"other settings \(lr differ\)"):
        run_stage("sft", inputs, tmp_path, resume=True, lr=2e-3)
    run_stage("sft", inputs, tmp_path, resume=True, progress=True, checkpoint_every=2)  # runtime-only fields
    assert digest(tmp_path / "sft")["step"] == "step-000006"
    data = write_jsonl(tmp_path / "d.jsonl", demo.sft_rows(96, seed=0))
    run_stage("sft", inputs, tmp_path / "b", data=str(data))
    write_jsonl(data, demo.sft_rows(60, seed=0))  # the same file, other rows
    with pytest.raises(DataError, match=r"trained on 43 items, .*d\.jsonl now gives 27 \(different data\)"):
        run_stage("sft", inputs, tmp_path / "b", resume=True, data=str(data))


def test_shorter_rerun_owns_latest_and_the_report(inputs, tmp_path):
    """A new run without --resume replaces the stage's earlier checkpoints: `latest` is its own last step."""
    run_stage("sft", inputs, tmp_path, max_steps=8, checkpoint_every=2)
    assert [p.name for p in list_checkpoints(tmp_path / "sft")] == ["step-000006", "step-000008"]
    run_stage("sft", inputs, tmp_path, max_steps=3, checkpoint_every=2)
    assert [p.name for p in list_checkpoints(tmp_path / "sft")] == ["step-000002", "step-000003"]
    assert resolve(tmp_path / "sft") == resolve(tmp_path / "sft" / "latest") == step_dir(tmp_path / "sft", 3)
    assert f"checkpoint `{step_dir(tmp_path / 'sft', 3)}`" in (tmp_path / "report.md").read_text()
    assert [r["step"] for r in read_metrics(tmp_path / "sft" / "log.jsonl")] == [1, 2, 3]


def test_a_step_folder_of_another_kind_is_never_removed(inputs, tmp_path):
    foreign = save_checkpoint(tiny(), step_dir(tmp_path / "sft", 50), tokenizer=TOK, train_config={"note": "mine"})
    with pytest.raises(CheckpointError, match="not a sft checkpoint"):
        run_stage("sft", inputs, tmp_path)
    assert (foreign / "model.safetensors").is_file()


def test_a_clean_rerun_removes_only_the_adapter_files_it_wrote(inputs, tmp_path):
    """An earlier LoRA run's adapter is not the new run's and goes, but only its two files: a user's
    file in adapter/ stays (the folder used to be deleted whole)."""
    run_stage("sft-lora", inputs, tmp_path, max_steps=2)
    adapter = tmp_path / "sft" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    (adapter / "notes.txt").write_text("mine")
    run_stage("sft", inputs, tmp_path, max_steps=2)  # no LoRA this time
    assert sorted(p.name for p in adapter.iterdir()) == ["notes.txt"]


# ---- SIGKILL -------------------------------------------------------------------------------------------


def cli_args(name: str, inputs: Path, out: Path, **kw) -> list[str]:
    """The `gptstack <stage>` command line of stage_cfg(name, …): every field that differs from its default."""
    cfg = stage_cfg(name, inputs, out, **kw)
    defaults = type(cfg)(**({"reward": cfg.reward} if name == "ppo" else {}))
    args = [sys.executable, "-m", "gptstack.cli", folder_of(name), "--no-progress"]
    for k, v in cfg.to_dict().items():
        if (v != getattr(defaults, k) or k == "reward") and not isinstance(v, bool):
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def wait_for(proc: subprocess.Popen, ready, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "attempts"), [("sft", 2), ("reward", 1), ("dpo", 1), ("ppo", 1)])
def test_sigkill_mid_run_then_resume_is_exact(name, attempts, inputs, tmp_path):
    """Kill a real `gptstack <stage>` with SIGKILL mid-run (by progress; SFT a second time while a checkpoint
    is being written, if the poll catches one), resume with --resume: the uninterrupted run's weights, bitwise."""
    stage, kw = folder_of(name), dict(max_steps=16, checkpoint_every=4)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONHASHSEED": "0"}
    ref = subprocess.run(cli_args(name, inputs, tmp_path / "ref", **kw), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]  # a fresh process too: no global torch state of earlier tests
    out, log = tmp_path / "killed", tmp_path / "killed" / stage / "log.jsonl"
    kills = 0
    for attempt in range(attempts):
        proc = subprocess.Popen([*cli_args(name, inputs, out, **kw), "--resume"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        target = len(read_metrics(log)) + 6  # a step-4 checkpoint, then 2 steps more
        if attempt == 0:
            wait_for(proc, lambda n=target: len(read_metrics(log)) >= n)
        else:  # while a checkpoint is being written, if the poll catches one
            wait_for(proc, lambda n=target: any((out / stage).glob(".tmp-step-*")) or len(read_metrics(log)) >= n)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        for folder in list_checkpoints(out / stage):  # never a half-written checkpoint
            verify_files(*read_meta(folder))
    assert kills >= 1, "the run finished before it could be killed"
    done = subprocess.run([*cli_args(name, inputs, out, **kw), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    assert digest(out / stage) == digest(tmp_path / "ref" / stage)
    assert losses(out / stage) == losses(tmp_path / "ref" / stage)


# ---- the non-finite guard -------------------------------------------------------------------------------


def all_finite(folder: Path) -> bool:
    model = load_model(folder)
    tensors = [*model.state_dict().values(), *load_heads(folder).values()]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_nonfinite_margins_are_skipped_at_load(inputs, tmp_path):
    bad = ['{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}',
           '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1e999}',
           '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": -Infinity}']  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", [*pair_rows(40), *bad])
    s = run_stage("reward", inputs, tmp_path, data=str(data))
    assert s["skipped: margin is not finite"] == 3 and s["nonfinite_steps"] == 0
    assert all_finite(tmp_path / "reward") and math.isfinite(s["train_loss"])
    assert run_stage("dpo", inputs, tmp_path, data=str(data))["skipped: margin is not finite"] == 3
    assert all_finite(tmp_path / "dpo")


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path):
    rows = pack([encode_example(TOK, r, 96) for r in demo.sft_rows(32, seed=2)], 96, pack=False)
    model, calls = tiny(seed=1), []

    def loss_fn(batch):  # the second step's loss is NaN
        calls.append(1)
        loss, n, m = sft_loss(model, batch)
        return (loss * float("nan"), n, m) if len(calls) == 2 else (loss, n, m)

    cfg = StageConfig(out=str(tmp_path), batch_size=8, max_steps=4, lr=1e-3, progress=False)
    run = StageRun(cfg, "sft", model)
    before = [p.detach().clone() for p in model.parameters()]
    optimize(model, rows, loss_fn, run)
    assert [("nonfinite" in r) for r in run.records] == [False, True, False, False]
    assert "loss nan" in run.records[1]["nonfinite"] and run.records[-1]["nonfinite_steps"] == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step changed nothing
    run.finish({"ok": 1})
    assert all_finite(tmp_path / "sft")


def test_a_checkpoint_with_a_nonfinite_tensor_is_never_written(tmp_path):
    """The last line of the guard: whatever the steps did, a save with an inf or NaN tensor is refused."""
    rows = pack([encode_example(TOK, r, 96) for r in demo.sft_rows(8, seed=3)], 96, pack=False)
    model = tiny(seed=3)
    run = StageRun(StageConfig(out=str(tmp_path), batch_size=8, max_steps=1, lr=1e-3, progress=False), "sft", model)
    optimize(model, rows, lambda batch: sft_loss(model, batch), run)
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight[0, 0] = float("inf")
    with pytest.raises(TrainingError, match=r"refusing to save step 1: 1 tensors are not finite .*h\.1\.attn\.c_proj"):
        run.save()
    assert list_checkpoints(tmp_path / "sft") == []


def test_a_nan_checkpoint_stops_with_one_clear_line_and_saves_nothing(inputs, tmp_path, capsys):
    broken = tiny()
    with torch.no_grad():
        broken.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    save_checkpoint(broken, tmp_path / "nan-init", tokenizer=TOK)
    args = ["sft", "--init", str(tmp_path / "nan-init"), "--data", str(inputs / "sft.jsonl"), "--out", str(tmp_path),
            "--max-steps", "20", "--batch-size", "8", "--max-bad-steps", "3", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 consecutive steps with a non-finite loss" in err[0] and "loss nan" in err[0]
    assert list_checkpoints(tmp_path / "sft") == []
    assert main([*args[:-3], "--max-steps", "2", "--no-progress"]) == 2  # fewer steps than the limit: all bad
    assert "all 2 steps had a non-finite" in capsys.readouterr().err
    assert list_checkpoints(tmp_path / "sft") == []


NAN_RULES = '''
calls = 0


def first_batch_nan(prompt, response):
    """NaN for the first 8 responses (the first batch), then a finite reward."""
    global calls
    calls += 1
    return float("nan") if calls <= 8 else 1.0 - len(response) / 100


def always_nan(prompt, response):
    return float("nan")
'''


def test_ppo_rule_reward_nan_is_skipped_or_stops(inputs, tmp_path, monkeypatch):
    (tmp_path / "g2_nan_rules.py").write_text(NAN_RULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    s = run_stage("ppo", inputs, tmp_path, reward="rule:g2_nan_rules:first_batch_nan", max_steps=3)
    log = read_metrics(tmp_path / "ppo" / "log.jsonl")
    assert "8 of 8 rewards not finite (rule:g2_nan_rules:first_batch_nan)" in log[0]["nonfinite"]
    assert [("nonfinite" in r) for r in log] == [True, False, False] and s["nonfinite_steps"] == 1
    assert math.isfinite(s["reward_first"]) and all_finite(tmp_path / "ppo")
    with pytest.raises(TrainingError, match=r"2 consecutive steps .*rule:g2_nan_rules:always_nan"):
        run_stage("ppo", inputs, tmp_path / "always", reward="rule:g2_nan_rules:always_nan", max_bad_steps=2)
    assert list_checkpoints(tmp_path / "always" / "ppo") == []
