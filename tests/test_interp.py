"""The interpretability core (gptstack.interp): hooks on every architecture variant leave the forward
bitwise unchanged and nothing attached; captured attention patterns equal transformers'
output_attentions; the exact invariants (last-layer lens = logits, Σ direct attributions + bias =
logit, patching everything clean restores the clean output, head ablation = zeroed c_proj columns);
the tuned lens; the commands' files and errors; SmolLM2 for real (slow)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import SMALL, VARIANTS, scramble

from gptstack import cli
from gptstack.checkpoint import save_checkpoint
from gptstack.config import ModelConfig
from gptstack.interp.attribution import AttributionError, direct_attribution
from gptstack.interp.heads import ablate_heads, induction_scores, repeated_tokens, top_heads
from gptstack.interp.hooks import HookError, hook_names, patched, run_with_cache
from gptstack.interp.lens import LensError, TunedLens, TunedLensConfig, lens_kl, lens_logits, train_tuned_lens
from gptstack.interp.patching import PatchError, patch_sweep
from gptstack.model import build_model

T = 12


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def models():
    """Every variant, scrambled so that logits and attention are far from uniform."""
    return {name: scramble(build_model(cfg, seed=0), seed=1).eval() for name, cfg in VARIANTS.items()}


def ids(vocab: int, seed: int = 0, n: int = T, batch: int = 2) -> torch.Tensor:
    return torch.randint(vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_hooks_capture_everything_and_change_nothing(models, name):
    model = models[name]
    idx = ids(model.config.vocab_size)
    with torch.no_grad():
        plain = model(idx)
        logits, cache = run_with_cache(model, idx)
    assert torch.equal(logits, plain)  # hooks that patch nothing leave the forward bitwise unchanged
    assert set(cache) == set(hook_names(model)) and no_hooks(model)
    cfg = model.config
    for i in range(cfg.n_layer):
        pat = cache[f"blocks.{i}.attn.pattern"]  # (B, h, T, T)
        assert pat.shape == (2, cfg.n_head, T, T)
        torch.testing.assert_close(pat.sum(-1), torch.ones(2, cfg.n_head, T), atol=1e-5, rtol=0)
        assert (pat.triu(1) == 0).all()  # causal
        if cfg.attn_kinds[i] == "local":
            assert (pat.tril(-cfg.attn_window) == 0).all()  # nothing beyond the band
        v = cache[f"blocks.{i}.attn.v"].transpose(1, 2).repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
        z = (pat @ v.float()).transpose(1, 2)  # what SDPA computed, from our pattern
        torch.testing.assert_close(z, cache[f"blocks.{i}.attn.z"], atol=1e-5, rtol=1e-4)
    if cfg.n_expert == 0:
        assert cache["blocks.0.mlp.post"].shape == (2, T, cfg.d_ff)


def test_hooks_are_removed_after_an_error_and_bad_names_are_refused(models):
    model = models["llama-gqa"]
    with pytest.raises(RuntimeError, match="boom"), patched(model, {"blocks.0.resid_post": lambda x: x}):
        raise RuntimeError("boom")
    assert no_hooks(model)
    with pytest.raises(HookError, match=r"no hook point matches 'blocks\.9\.resid_pre'"):
        run_with_cache(model, ids(97), ["blocks.9.resid_pre"])
    with pytest.raises(HookError, match="capture only"):
        patched(model, {"blocks.0.attn.pattern": lambda x: x}).__enter__()
    with pytest.raises(HookError, match="no hook point"):
        run_with_cache(models["moe-swiglu"], ids(97), ["blocks.0.mlp.post"])  # MoE has no dense hidden
    assert no_hooks(model) and no_hooks(models["moe-swiglu"])


def test_patterns_equal_transformers_output_attentions():
    """A tiny random Llama (GQA 6:2, RoPE θ=500), eager attention: the real oracle for the probabilities."""
    transformers = pytest.importorskip("transformers") if not os.environ.get("CI") else __import__("transformers")
    from gptstack.interop.hf import from_hf_model

    hf_cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
    theirs.config._attn_implementation = "eager"
    ours = from_hf_model(theirs).eval()
    idx = ids(101, n=20)
    with torch.no_grad():
        out = theirs(idx, output_attentions=True)
        _, cache = run_with_cache(ours, idx, ["blocks.*.attn.pattern"])
    for i, expected in enumerate(out.attentions):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.pattern"], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_last_layer_logit_lens_is_the_model(models, name):
    model = models[name]
    idx = ids(model.config.vocab_size)
    per_layer, final = lens_logits(model, idx)
    assert per_layer.shape == (model.config.n_layer, 2, model.config.vocab_size)
    assert torch.equal(per_layer[-1], final)
    assert not torch.equal(per_layer[0], final)


@pytest.mark.parametrize("name", sorted(n for n in VARIANTS if VARIANTS[n].prenorm))
def test_direct_attributions_add_up_to_the_logit(models, name):
    model = models[name]
    idx = ids(model.config.vocab_size, seed=3)
    a = direct_attribution(model, idx, target=5)
    torch.testing.assert_close(a.total(), a.logit, atol=1e-4, rtol=0)  # fp32: the tolerance
    torch.testing.assert_close(a.heads.sum(1) + a.attn_bias, a.attn, atol=1e-4, rtol=0)  # heads add up to the layer
    d = direct_attribution(model, idx, target=5, against=6, at=4)  # a logit difference, another position
    torch.testing.assert_close(d.total(), d.logit, atol=1e-4, rtol=0)


def test_direct_attribution_refuses_post_ln(models):
    with pytest.raises(AttributionError, match="pre-norm"):
        direct_attribution(models["gpt1-postln"], ids(97), target=1)


@pytest.mark.parametrize("name", ["gpt2", "gpt1-postln", "gemma3-local-global", "moe-swiglu", "qwen2-qkv-bias"])
def test_patching_every_position_with_the_clean_run_restores_it(models, name):
    model = models[name]
    clean, corrupt = ids(97, seed=1), ids(97, seed=2)
    L = model.config.n_layer - 1
    points = ["resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out"]
    with torch.no_grad():
        want, cache = run_with_cache(model, clean, [f"blocks.{L}.{p}" for p in points] + ["blocks.0.attn.q"])
        assert not torch.allclose(model(corrupt), want)
        for p in points:
            with patched(model, {f"blocks.{L}.{p}": lambda x, p=p: cache[f"blocks.{L}.{p}"]}):
                got = model(corrupt)
            if p == "resid_mid" and model.config.prenorm:  # patched through the attention branch: one rounding
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            elif p in ("resid_pre", "resid_mid", "resid_post"):  # the whole residual: exactly the clean run
                assert torch.equal(got, want), p
            else:  # a branch alone: the corrupted residual remains
                assert not torch.equal(got, want)
    assert no_hooks(model)


def test_patch_sweep_locates_the_changed_token(models):
    """At blocks.0.resid_pre only the embeddings differ: patching the changed position restores the clean
    run (effect 1) and any other position changes nothing (effect 0)."""
    model = models["llama-gqa"]
    clean = ids(97, seed=4, n=8, batch=1)
    corrupt = clean.clone()
    corrupt[0, 3] = (corrupt[0, 3] + 1) % 97
    s = patch_sweep(model, clean, corrupt, target=7, against=8)
    row = torch.tensor(s["effect"][0])
    torch.testing.assert_close(row[3], torch.tensor(1.0), atol=1e-4, rtol=0)
    assert row[torch.arange(8) != 3].abs().max() < 1e-4
    assert torch.tensor(s["effect"][0])[:3].abs().max() == 0 and torch.tensor(s["effect"][-1])[:3].abs().max() == 0
    with pytest.raises(PatchError, match="equal length"):
        patch_sweep(model, clean, clean[:, :5], target=7)


def test_head_ablation_equals_zeroed_output_columns(models):
    model = models["llama-gqa"]
    idx = ids(97, seed=5)
    hd = model.config.head_dim
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.transformer.h[1].attn.c_proj.weight[:, 2 * hd : 3 * hd] = 0  # head 2 of layer 1 writes nothing
        want = ref(idx)
        with ablate_heads(model, [(1, 2)]):
            got = model(idx)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert no_hooks(model)
    with pytest.raises(ValueError, match="no head"):
        ablate_heads(model, [(0, 9)]).__enter__()


def test_induction_scores_on_a_copying_model(models):
    """Shapes, ranges and the random sequences' layout; the repeat is exact."""
    model = models["gpt2"]
    model.tokenizer = None
    seq = repeated_tokens(model, 10, 3, seed=1)
    assert seq.shape == (3, 20) and torch.equal(seq[:, :10], seq[:, 10:])
    r = induction_scores(model, n=10, batch=3)
    scores = torch.tensor(r["induction"])
    assert scores.shape == (2, 4) and ((scores >= 0) & (scores <= 1)).all()
    assert top_heads(r["induction"], 1)[0][2] == scores.max().item()


def test_tuned_lens_trains_saves_and_loads(tmp_path, models):
    """On a scrambled model the least-squares start alone cuts the held-out KL of the middle layer."""
    cfg = ModelConfig(**{**SMALL, "vocab_size": 264, "n_layer": 3})
    model = scramble(build_model(cfg, seed=0), seed=2).eval()
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer="bytes")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"the {i} fox jumps over {i * 7 % 13} dogs. " for i in range(200)))
    lc = TunedLensConfig(checkpoint=str(ckpt), data=[str(text)], out=str(tmp_path / "lens.st"), seq_len=32,
                         max_windows=24, steps=3)  # fmt: skip
    report = train_tuned_lens(lc)
    assert report["kl_tuned_lens"][-1] == report["kl_logit_lens"][-1] == 0
    assert report["kl_least_squares"][1] < 0.8 * report["kl_logit_lens"][1]
    lens = TunedLens.load(lc.out, model)
    windows = torch.randint(264, (2, 32))
    torch.testing.assert_close(lens_kl(model, windows, lens), lens_kl(model, windows, lens))
    assert json.loads((tmp_path / "lens.st.json").read_text())["steps"] == 3
    with pytest.raises(LensError, match="n_layer, n_embd"):
        TunedLens.load(lc.out, models["gpt2"])
    (tmp_path / "bad.st").write_text("not a lens")
    with pytest.raises(LensError, match=r"bad\.st: not a tuned-lens file"):
        TunedLens.load(tmp_path / "bad.st", model)


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    cfg = ModelConfig(**{**SMALL, "vocab_size": 264}, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    return save_checkpoint(scramble(build_model(cfg, seed=0)), tmp_path_factory.mktemp("ck") / "ck", tokenizer="bytes")


def test_commands_write_json_html_and_png(tmp_path, byte_ckpt):
    ck = str(byte_ckpt)
    out = tmp_path / "lens.json"
    assert cli.main(["interp", "lens", ck, "--prompt", "hello wor", "--target", "l", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["logit"]["layers"]) == 2 and data["logit"]["target"] == "l"
    assert (tmp_path / "lens.lens.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "lens.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page
    heads = tmp_path / "heads.json"
    assert cli.main(["interp", "heads", ck, "--prompt", "abcabc", "--induction", "--json", str(heads)]) == 0
    h = json.loads(heads.read_text())
    assert len(h["prompt"]["patterns"]) == 2 and len(h["induction"]["induction"][0]) == 4
    patch = tmp_path / "patch.json"
    args = ["interp", "patch", ck, "--clean", "cat sat", "--corrupt", "dog sat", "--target", "a", "--json", str(patch)]
    assert cli.main(args) == 0
    assert len(json.loads(patch.read_text())["effect"]) == 2


def test_command_errors_are_one_line_and_write_nothing(tmp_path, byte_ckpt, capsys):
    out = tmp_path / "p.json"
    args = [
        "interp",
        "patch",
        str(byte_ckpt),
        "--clean",
        "a cat",
        "--corrupt",
        "a",
        "--target",
        "x",
        "--json",
        str(out),
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "equal length" in err
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["interp", "lens", str(byte_ckpt), "--prompt", "x", "--tuned", str(tmp_path / "nope")]) == 2
    assert "not a tuned-lens file" in capsys.readouterr().err


# ---- SmolLM2-135M-Instruct, for real ------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_lens_finds_paris_and_induction_heads(smollm2):
    """Stored figures (docs/BENCHMARKS.md): the logit lens makes " Paris" top-1 from layer 27 of 30; on
    repeated random tokens the strongest induction heads score above 0.5 and copying cuts the loss."""
    from gptstack.interp.lens import lens_table

    t = lens_table(smollm2, "The Eiffel Tower is located in the city of", " Paris")
    assert t["final_top"] == " Paris" and t["first_top1_layer"] == 27
    r = induction_scores(smollm2, n=30, batch=2)
    assert top_heads(r["induction"], 1)[0][2] > 0.5
    assert r["loss_second_copy"] < 0.5 * r["loss_first_copy"]
    a = direct_attribution(smollm2, torch.tensor([smollm2.tokenizer.encode_prompt("The capital of France is")]),
                           target=smollm2.tokenizer.encode(" Paris")[0])  # fmt: skip
    torch.testing.assert_close(a.total(), a.logit, atol=1e-3, rtol=1e-4)  # massive activations (~2e4): relative
    assert no_hooks(smollm2)
