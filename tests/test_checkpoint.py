"""Checkpoints: exact round trip, atomic under SIGKILL, and refusal of truncated, corrupt,
mismatched or code-executing files with an error naming the file and the problem."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import VARIANTS, scramble
from safetensors import safe_open

import gptstack
from gptstack.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_model,
    load_training_state,
    load_weights,
    resolve,
    save_checkpoint,
    step_dir,
)
from gptstack.config import ModelConfig
from gptstack.model import build_model


@pytest.fixture
def saved(tmp_path):
    model = scramble(build_model(VARIANTS["gpt2"], seed=0)).eval()
    path = save_checkpoint(model, step_dir(tmp_path / "ckpts", 5), step=5, tokenizer="bytes")
    return model, path


@pytest.mark.parametrize("name", ["gpt2", "moe-swiglu", "rope-scaled", "gpt1-postln"])
def test_round_trip_is_exact(tmp_path, name):
    model = scramble(build_model(VARIANTS[name], seed=0)).eval()
    path = save_checkpoint(model, tmp_path / "ck", tokenizer="cl100k_base")
    loaded = gptstack.load(path)
    idx = torch.randint(0, 97, (2, 16))
    assert torch.equal(loaded(idx), model(idx))
    assert loaded.config == model.config and not loaded.training
    assert loaded.tokenizer.name == "cl100k_base"


def test_tied_head_is_stored_once_and_stays_tied(saved):
    _, path = saved
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())  # a safetensors handle, not a dict
        assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    loaded = load_model(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_latest_resolves_to_the_newest_complete_step(tmp_path):
    model = build_model(VARIANTS["gpt2"], seed=0)
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 20, 3):
        save_checkpoint(model, step_dir(root, step), step=step)
    (root / ".tmp-step-000099-123").mkdir()  # an interrupted save: never a candidate
    (root / ".tmp-step-000099-123" / "model.safetensors").write_bytes(b"partial")
    assert resolve(root / "latest").name == "step-000020"
    assert resolve(root).name == "step-000020"
    assert resolve(tmp_path / "run").name == "step-000020"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nope")


SAVER = """
import sys, torch
from gptstack.checkpoint import save_checkpoint, step_dir
from gptstack.config import ModelConfig
from gptstack.model import build_model
model = build_model(ModelConfig(vocab_size=4000, block_size=64, n_layer=4, n_head=4, n_embd=128), seed=0)
opt = torch.optim.AdamW(model.parameters())
model(torch.zeros(1, 8, dtype=torch.long), targets=torch.zeros(1, 8, dtype=torch.long))[1].backward()
opt.step()
for step in range(10_000):
    save_checkpoint(model, step_dir(sys.argv[1], step), step=step,
                    training_state={"optimizer": opt.state_dict(), "step": step})
    print(step, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_half_checkpoint(tmp_path):
    root = tmp_path / "ckpts"
    for delay in (0.9, 1.3, 1.7):  # kill at different points of the write/rename cycle
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root)], stdout=subprocess.PIPE)
        assert proc.stdout.readline()  # at least one save has finished
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        complete = list_checkpoints(root)
        assert complete, "no checkpoint survived"
        for path in complete:  # every folder under a step-* name verifies and loads whole
            load_model(path)
            assert load_training_state(path)["step"] == json.loads((path / "config.json").read_text())["step"]
        assert resolve(root / "latest") == complete[-1]


def test_truncated_weights_are_refused(saved):
    _, path = saved
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or altered: \d+ bytes, expected \d+"):
        load_model(path)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):  # even without checksum verification
        load_model(path, verify=False)


def test_corrupt_bytes_are_refused(saved):
    _, path = saved
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF  # same size, one flipped byte in the weights
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt: SHA-256"):
        load_model(path)


def test_checkpoint_of_another_architecture_is_refused_before_any_copy(saved):
    _, path = saved
    wider = build_model(ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64), seed=0)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"tensor transformer\.\S+ has shape .* another architecture"):
        load_weights(wider, path)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items()), "half-loaded"
    deeper = build_model(ModelConfig(vocab_size=97, block_size=64, n_layer=3, n_head=4, n_embd=32), seed=0)
    with pytest.raises(CheckpointError, match=r"missing \d+ tensors \(e\.g\. transformer\.h\.2\."):
        load_weights(deeper, path)


def test_bad_config_json_is_refused(saved):
    _, path = saved
    (path / "config.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(path)
    (path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a gptstack checkpoint"):
        load_model(path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_training_state_round_trips_and_pickled_code_never_runs(tmp_path, monkeypatch):
    model = build_model(VARIANTS["gpt2"], seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4, dtype=torch.long), targets=torch.ones(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": 7, "cursor": {"shard": 2}}
    path = save_checkpoint(model, tmp_path / "ck", step=7, training_state=state)
    loaded = load_training_state(path)
    assert loaded["step"] == 7 and loaded["cursor"] == {"shard": 2} and torch.equal(loaded["rng"], state["rng"])
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], exp_avg)

    monkeypatch.chdir(tmp_path)
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump(Exploit(), f, protocol=2)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: cannot be loaded safely"):
        load_training_state(path)
    assert not (tmp_path / "PWNED").exists()


def test_saving_over_an_existing_step_replaces_it(tmp_path):
    a = scramble(build_model(VARIANTS["gpt2"], seed=0), seed=1)
    b = scramble(build_model(VARIANTS["gpt2"], seed=0), seed=2)
    save_checkpoint(a, tmp_path / "step-000001")
    save_checkpoint(b, tmp_path / "step-000001")
    idx = torch.randint(0, 97, (1, 8))
    assert torch.equal(load_model(tmp_path / "step-000001")(idx), b.eval()(idx))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
