"""The sparse autoencoder on real components: CE loss recovered is 100% for the identity and 0% for zero (the
splice goes through interp.hooks' patching); the trainer lowers FVU on a tiny model's residual stream; TopK's
L0, the unit-norm decoder, dead-latent resampling, save/load and the command's files and errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL, scramble, shared_file, smollm2_file

from gptstack import cli
from gptstack.checkpoint import load_model, save_checkpoint
from gptstack.config import ModelConfig
from gptstack.interp.neurons import activations_at
from gptstack.interp.sae import (
    ReconstructionStats,
    SAEConfig,
    SAEError,
    SparseAutoencoder,
    evaluate_sae,
    load_sae,
    resample_dead,
    row_batches,
    splice_losses,
    train_and_measure,
)
from gptstack.model import build_model

TEXT = "".join(
    f"{i}: {'to be or not to be' if i % 2 else 'that is the question'}, said player {i % 7}.\n" for i in range(400)
)
SMALL_RUN = dict(layer=1, k=4, expansion=4, lr=1e-2, train_tokens=6144, batch_tokens=128, buffer_tokens=2048,
                 eval_tokens=1024, seq_len=32, batch_size=8, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae")
    cfg = ModelConfig(**{**SMALL, "vocab_size": 264, "n_layer": 3, "n_embd": 32})
    model = scramble(build_model(cfg, seed=0), seed=2, std=0.2)
    ckpt = save_checkpoint(model, root / "ckpt", tokenizer="bytes")
    text = root / "text.txt"
    text.write_text(TEXT)
    return load_model(ckpt), ckpt, text


def held_out(model, text, tokens=256):
    return list(
        row_batches(model, SAEConfig(checkpoint="", data=str(text), layer=0, out="", seq_len=32), "val", tokens)
    )


@pytest.mark.parametrize("site", ["resid_post", "mlp.out"])
def test_ce_recovered_is_one_for_identity_and_zero_for_zero(tiny, site):
    model, _, text = tiny
    rows, name = held_out(model, text), f"blocks.1.{site}"
    seen = []

    def identity(x):
        seen.append(x.shape)
        return x

    same = splice_losses(model, iter(rows), name, identity, skip=1)
    assert same["recovered"] == 1.0 and same["spliced"] == same["clean"] != same["zero"]
    assert seen and all(s == (8 * 31, 32) for s in seen), "the skipped first position reached the reconstruction"
    zero = splice_losses(model, iter(rows), name, torch.zeros_like, skip=1)
    assert zero["recovered"] == 0.0 and zero["spliced"] == zero["zero"]
    # the clean loss is the model's own next-token loss over the rows
    idx = torch.cat(rows)
    logits = model(idx)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))
    assert same["clean"] == pytest.approx(ref.item(), rel=1e-5) and same["tokens"] == idx[:, 1:].numel()
    half = splice_losses(model, iter(rows), name, lambda x: 0.5 * x, skip=1)
    assert half["recovered"] == pytest.approx((half["zero"] - half["spliced"]) / (half["zero"] - half["clean"]))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left attached"


def test_trainer_lowers_fvu_and_round_trips(tiny, tmp_path):
    model, ckpt, text = tiny
    cfg = SAEConfig(checkpoint=str(ckpt), data=str(text), out=str(tmp_path / "sae"), **SMALL_RUN)
    result = train_and_measure(cfg)
    sae, meta = load_sae(cfg.out)
    # the same SAE before training: initialised from the same first activations
    fresh = SparseAutoencoder(32, 128, "topk", 4)
    idx = next(row_batches(model, cfg, "train"))
    first = activations_at(model, idx, "blocks.1.resid_post")[:, 1:].reshape(-1, 32)
    fresh.init_weights(first, cfg.seed)
    before = evaluate_sae(fresh, model, cfg)
    assert result["fvu"] < 0.6 * before["fvu"] and result["fvu"] < 0.4, (before["fvu"], result["fvu"])
    assert 3.5 < result["l0"] <= 4.0 and result["steps"] == 6144 // 128
    assert result["ce_recovered"] == pytest.approx(
        (result["ce_zero"] - result["ce_sae"]) / (result["ce_zero"] - result["ce_clean"])
    )
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(128))
    assert meta["metrics"]["fvu"] == result["fvu"] and meta["point"] == "blocks.1.resid_post"
    # the loaded SAE measures what the trained one measured
    again = evaluate_sae(sae, model, cfg)
    assert again["fvu"] == pytest.approx(result["fvu"], rel=1e-6) and again["ce_sae"] == pytest.approx(result["ce_sae"])


def test_resampling_revives_dead_latents(tiny):
    model, _, text = tiny
    cfg = SAEConfig(checkpoint="", data=str(text), out="", **SMALL_RUN)
    idx = next(row_batches(model, cfg, "train"))
    x = activations_at(model, idx, "blocks.1.resid_post")[:, 1:].reshape(-1, 32)
    sae = SparseAutoencoder(32, 64, "relu")
    sae.init_weights(x)
    with torch.no_grad():
        sae.b_enc[:16] = -1e4  # 16 latents that can never fire
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae(x)[0].square().sum().backward()
    opt.step()
    for state in opt.state.values():  # moments everywhere, so a reset is visible
        state["exp_avg"].fill_(1.0), state["exp_avg_sq"].fill_(1.0)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:16] = True
    assert not (sae.encode(x)[:, :16] > 0).any()
    assert resample_dead(sae, opt, dead, x, torch.Generator().manual_seed(0)) == 16
    torch.testing.assert_close(sae.W_dec[:16].norm(dim=-1), torch.ones(16))
    assert (sae.b_enc[:16] == 0).all()
    for p, dead_part, live_part in (
        (sae.W_dec, (slice(0, 16),), (slice(16, None),)),
        (sae.W_enc, (slice(None), slice(0, 16)), (slice(None), slice(16, None))),
    ):
        assert (opt.state[p]["exp_avg"][dead_part] == 0).all() and (opt.state[p]["exp_avg_sq"][dead_part] == 0).all()
        assert (opt.state[p]["exp_avg"][live_part] == 1).all(), "the live latents' moments were reset too"
    fires = (sae.encode(x)[:, :16] > 0).any(0)
    assert fires.float().mean() > 0.5, fires


def test_reconstruction_stats_fvu_definition(tiny):
    sae = SparseAutoencoder(32, 64, "topk", 8)
    x = torch.randn(100, 32) * 3 + 1
    sae.init_weights(x)
    stats = ReconstructionStats(sae)
    x_hat = stats(x)
    m = stats.metrics()
    ref = (x - x_hat).square().sum() / (x - x.mean(0)).square().sum()
    assert m["fvu"] == pytest.approx(ref.item(), rel=1e-5) and m["l0"] <= 8 and m["heldout_tokens"] == 100


def test_command_writes_the_sae(tiny, tmp_path, capsys):
    _, ckpt, text = tiny
    out = tmp_path / "out"
    argv = ["interp", "sae", str(ckpt), "--data", str(text), "--layer", "0", "--out", str(out), "--kind", "relu",
            "--train-tokens", "2048", "--batch-tokens", "128", "--buffer-tokens", "1024", "--eval-tokens", "512",
            "--seq-len", "32", "--expansion", "2", "--resample-every", "4", "--dead-tokens", "256",
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fvu" in printed and "ce_recovered" in printed and str(out) in printed
    meta = json.loads((out / "sae.json").read_text())
    assert meta["kind"] == "relu" and meta["n_latents"] == 64 and meta["config"]["resample_every"] == 4
    assert (out / "sae.safetensors").is_file() and meta["training"]["steps"] == 16


@pytest.mark.parametrize(
    "extra,message",
    [(["--layer", "7"], "outside the model's 3 layers"), (["--layer", "0", "--k", "0"], "0 < k"),
     (["--layer", "0", "--batch-tokens", "99999"], "exceeds --buffer-tokens")],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_no_folder(tiny, tmp_path, capsys, extra, message):
    _, ckpt, text = tiny
    out = tmp_path / "never"
    argv = ["interp", "sae", str(ckpt), "--data", str(text), "--out", str(out), "--no-progress", "--seq-len", "32"]
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_load_sae_names_the_file(tmp_path):
    with pytest.raises(SAEError, match=r"sae\.json"):
        load_sae(tmp_path)
    (tmp_path / "sae.json").write_text(json.dumps({"format": "gptstack-sae/1", "d_in": 4, "n_latents": 8,
                                                   "kind": "topk", "k": 2}))  # fmt: skip
    with pytest.raises(SAEError, match=r"sae\.safetensors"):
        load_sae(tmp_path)


@pytest.mark.slow
def test_smollm2_splice_identity_recovers_everything():
    """SmolLM2-135M, middle layer: splicing the residual stream back unchanged recovers 100% exactly, and
    zeroing it costs real loss."""
    model = load_model(smollm2_file())
    cfg = SAEConfig(checkpoint="", data=str(shared_file("text/tinyshakespeare.txt")), layer=15, out="", seq_len=64,
                    batch_size=2)  # fmt: skip
    rows = list(row_batches(model, cfg, "val", 128))
    r = splice_losses(model, iter(rows), "blocks.15.resid_post", lambda x: x, skip=1)
    assert r["recovered"] == 1.0 and r["zero"] > r["clean"] + 1.0 and r["clean"] < 5.0, r
