"""Top-activating examples of MLP neurons: the streamed, bounded-memory top K equals a brute-force topk over all
activations at once; the statistics, the text split, the command's files and its errors; SmolLM2 for real."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SMALL, scramble, shared_file, smollm2_file

from gptstack import cli
from gptstack.checkpoint import load_model, save_checkpoint
from gptstack.config import ModelConfig
from gptstack.data.shards import write_token_arrays
from gptstack.interp.hooks import run_with_cache
from gptstack.interp.neurons import (
    InterpDataError,
    NeuronsConfig,
    activations_at,
    stream_neurons,
    text_pieces,
    text_split,
    token_pieces,
    token_rows,
)
from gptstack.model import build_model

TEXT = "".join(
    f"line {i}: the quick brown fox {'jumps' if i % 3 else 'naps'} over {i * 7 % 11} dogs\n" for i in range(60)
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A scrambled byte-level GPT (SwiGLU, so neurons go negative too) saved as a checkpoint, and a text file."""
    root = tmp_path_factory.mktemp("neurons")
    cfg = ModelConfig(**{**SMALL, "vocab_size": 264, "n_layer": 3}, mlp="swiglu")
    model = scramble(build_model(cfg, seed=0), seed=1, std=0.2)
    ckpt = save_checkpoint(model, root / "ckpt", tokenizer="bytes")
    text = root / "text.txt"
    text.write_text(TEXT)
    return load_model(ckpt), ckpt, text


def brute_force(model, cfg: NeuronsConfig):
    """Every activation of the layer at once: the top K values per neuron, all activations (R, T, F) with the
    skipped positions at -inf, the mean over the counted positions, and the rows (R, T)."""
    pieces = token_pieces(cfg.data, model.tokenizer, model.config.vocab_size, cfg.split, cfg.val_fraction)
    idx = torch.from_numpy(np.stack(list(token_rows(pieces, cfg.seq_len, cfg.max_tokens))))  # (R, T)
    name = f"blocks.{cfg.layer}.mlp.post"
    _, cache = run_with_cache(model, idx, [name])
    acts = cache[name].clone()  # (R, T, F)
    mean = acts[:, cfg.skip :].reshape(-1, acts.size(-1)).double().mean(0)
    acts[:, : cfg.skip] = -math.inf
    vals = acts.reshape(-1, acts.size(-1)).topk(cfg.top, dim=0).values  # (K, F)
    return vals, acts, mean, idx


@pytest.mark.parametrize("batch_size,skip", [(1, 1), (3, 0), (64, 2)])
def test_streamed_top_k_equals_brute_force(tiny, batch_size, skip):
    model, _, text = tiny
    cfg = NeuronsConfig(checkpoint="", data=str(text), layer=1, json="", top=5, seq_len=16, batch_size=batch_size,
                        skip=skip, progress=False)  # fmt: skip
    top, chosen, info = stream_neurons(model, cfg)
    vals, acts, mean, idx = brute_force(model, cfg)
    assert chosen == list(range(model.config.d_ff)) and info["rows"] == idx.size(0) > 3
    torch.testing.assert_close(top.values, vals, atol=1e-5, rtol=1e-5)
    # ties are real here (rows share their first tokens), so positions are checked through their activations
    at = acts[top.rows, top.pos, torch.arange(acts.size(-1))]  # (K, F): brute-force activation at each example
    torch.testing.assert_close(at, top.values, atol=1e-5, rtol=1e-5)
    assert len({(int(r), int(p)) for r, p in zip(top.rows[:, 0], top.pos[:, 0], strict=True)}) == cfg.top
    torch.testing.assert_close(top.stats()["mean"], mean, atol=1e-6, rtol=1e-5)
    # the context window: the example's own token and activation at its centre, the row's tokens around it
    r, f = 2, 7
    row, p = int(top.rows[r, f]), int(top.pos[r, f])
    centre = cfg.before
    assert int(top.tokens[r, f, centre]) == int(idx[row, p])
    assert float(top.acts[r, f, centre]) == pytest.approx(float(top.values[r, f]))
    for j, off in enumerate(top.offsets.tolist()):
        inside = 0 <= p + off < cfg.seq_len
        assert int(top.tokens[r, f, j]) == (int(idx[row, p + off]) if inside else -1)


def test_selected_neurons_and_early_stop(tiny):
    model, _, text = tiny
    cfg = NeuronsConfig(checkpoint="", data=str(text), layer=2, json="", top=3, neurons=[5, 0, 9], seq_len=16,
                        progress=False, max_tokens=64)  # fmt: skip
    top, chosen, info = stream_neurons(model, cfg)
    assert chosen == [5, 0, 9] and info["tokens"] == 64 and top.values.shape == (3, 3)
    full = NeuronsConfig(**{**cfg.__dict__, "neurons": None})
    top_all, _, _ = stream_neurons(model, full)
    middle = NeuronsConfig(**{**cfg.__dict__, "layer": None})
    assert stream_neurons(model, middle)[2]["layer"] == 1  # no --layer: the middle of the model's 3
    torch.testing.assert_close(top.values, top_all.values[:, [5, 0, 9]])
    # the forward that stops after the layer gives the activation the whole forward gives
    idx = torch.randint(0, 256, (2, 16))
    _, cache = run_with_cache(model, idx, ["blocks.1.mlp.post"])
    assert torch.equal(activations_at(model, idx, "blocks.1.mlp.post"), cache["blocks.1.mlp.post"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left attached"


def test_text_split_cuts_at_a_line_end(tiny, tmp_path, monkeypatch):
    _, _, text = tiny
    a, cut = text_split(text, "train", 0.25)
    cut2, end = text_split(text, "val", 0.25)
    data = text.read_bytes()
    assert a == 0 and cut == cut2 and end == len(data) and data[cut - 1 : cut] == b"\n"
    assert 0.7 < cut / len(data) < 0.8
    monkeypatch.setattr("gptstack.interp.neurons.TEXT_BLOCK", 100)  # many pieces, each ending at a line end
    pieces = list(text_pieces(text, 0, len(data)))
    assert len(pieces) > 10 and "".join(pieces) == TEXT and all(p.endswith("\n") for p in pieces)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n" * 10 + b"\xff\xfe broken\n")
    with pytest.raises(InterpDataError, match=r"bad\.txt: not UTF-8"):
        list(text_pieces(bad, 0, bad.stat().st_size))


def test_shard_folder_equals_its_text(tiny, tmp_path):
    model = tiny[0]
    ids = model.tokenizer.encode(TEXT)
    write_token_arrays(tmp_path / "shards", model.tokenizer, {"train": ids[:1000], "val": ids[1000:]})
    rows = list(token_rows(token_pieces(tmp_path / "shards", None, 264, "all"), 32))
    assert sum(len(r) for r in rows) == len(ids) // 32 * 32 and rows[0].tolist() == ids[:32]
    val = list(token_rows(token_pieces(tmp_path / "shards", None, 264, "val"), 8))
    assert val[0].tolist() == ids[1000:1008]
    with pytest.raises(InterpDataError, match="the model only 100"):
        next(token_pieces(tmp_path / "shards", None, 100, "all"))


def test_command_writes_json_and_html(tiny, tmp_path):
    _, ckpt, text = tiny
    out = tmp_path / "out" / "neurons.json"
    argv = ["interp", "neurons", str(ckpt), "--data", str(text), "--layer", "0", "--json", str(out), "--top", "4",
            "--neurons", "3", "11", "--seq-len", "32", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["layer"] == 0 and [n["neuron"] for n in result["neurons"]] == [3, 11]
    n = result["neurons"][0]
    acts = [e["activation"] for e in n["examples"]]
    assert len(acts) == 4 and acts == sorted(acts, reverse=True) and 0 < n["frequency"] < 1
    e = n["examples"][0]
    assert e["acts"][e["center"]] == pytest.approx(e["activation"]) and len(e["tokens"]) == len(e["ids"])
    assert "".join(e["tokens"]) in TEXT
    page = out.with_suffix(".html").read_text()
    assert page.startswith("<!doctype html>") and 'id="n11"' in page and "<script" not in page


@pytest.mark.parametrize(
    "extra,message",
    [(["--layer", "3"], "outside the model's 3 layers"), (["--layer", "0", "--neurons", "999"], "--neurons 999"),
     (["--layer", "0", "--seq-len", "100000"], "exceeds the model's context of 64"),
     (["--layer", "0", "--split", "val", "--val-fraction", "0.001"], "fewer than --seq-len 32 tokens in split 'val'")],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_no_output(tiny, tmp_path, capsys, extra, message):
    _, ckpt, text = tiny
    out = tmp_path / "n.json"
    argv = ["interp", "neurons", str(ckpt), "--data", str(text), "--json", str(out), "--no-progress", "--seq-len", "32",
            *extra]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_missing_data_names_the_path(tiny, tmp_path, capsys):
    _, ckpt, _ = tiny
    argv = [
        "interp",
        "neurons",
        str(ckpt),
        "--data",
        str(tmp_path / "nope"),
        "--layer",
        "0",
        "--json",
        "x.json",
        "--seq-len",
        "32",
    ]
    assert cli.main(argv) == 2
    assert "nope: no such text file or shard folder" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_streamed_equals_full_forward():
    """SmolLM2-135M on Tiny Shakespeare: the early-stopped, streamed top example of every neuron of a middle
    layer equals the topk over a full forward's captured activations."""
    model = load_model(smollm2_file())
    data = shared_file("text/tinyshakespeare.txt")
    cfg = NeuronsConfig(checkpoint="", data=str(data), layer=15, json="", top=2, seq_len=64, batch_size=4,
                        max_tokens=512, progress=False)  # fmt: skip
    top, _, info = stream_neurons(model, cfg)
    vals, acts, _, _ = brute_force(model, cfg)
    assert info["tokens"] == 512 and top.values.shape == (2, 1536)
    torch.testing.assert_close(top.values, vals, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(acts[top.rows, top.pos, torch.arange(1536)], top.values, atol=1e-4, rtol=1e-4)
