"""HF interop: tiny random transformers models of the GPT-2, Llama, Mixtral, Qwen2 and Gemma 3 families
give the same fp32 logits after import (atol 1e-5; on sequences that cross the sliding window), and
exported folders load in transformers and agree; what no family represents is refused by name."""

import pytest
import torch
import transformers
from conftest import scramble

from gptstack.checkpoint import load_model, save_checkpoint
from gptstack.cli import main
from gptstack.config import get_preset
from gptstack.interop.hf import InteropError, from_hf_config, from_hf_model, to_hf_config, to_hf_model
from gptstack.model import build_model

V = 101
HF_CONFIGS = {
    "gpt2-odd-heads-tied": transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=60, n_layer=2, n_head=5),
    "gpt2-untied-ninner": transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=48, n_layer=3, n_head=4, n_inner=80, tie_word_embeddings=False
    ),
    "llama-gqa-3to1-theta500": transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "llama-mqa-linear-rope-bias-tied": transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "llama-odd-heads-headdim": transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=60,
        intermediate_size=90,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=24,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "mixtral-2experts-top1": transformers.MixtralConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        num_local_experts=2,
        num_experts_per_tok=1,
    ),
    "mixtral-3experts-gqa": transformers.MixtralConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_local_experts=3,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
    ),
    "mixtral-4experts-tied": transformers.MixtralConfig(
        vocab_size=V,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
    ),
    "qwen2-gqa-qkv-bias-tied": transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "qwen2-sliding-upper-layers": transformers.Qwen2Config(  # layers ≥ max_window_layers slide (window 8)
        vocab_size=V,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    ),
    # local, local, global, local: two RoPE bases, linear scaling on the global one only, head_dim 24 ≠ 64/4,
    # query_pre_attn_scalar 20 ≠ head_dim
    "gemma3-local-global-linear-rope": transformers.Gemma3TextConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=64,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=20,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
    ),
    "gemma3-5to1-mqa-untied": transformers.Gemma3TextConfig(  # Gemma 3's default pattern: 5 local, 1 global
        vocab_size=V,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=8,
        query_pre_attn_scalar=16,
        tie_word_embeddings=False,
    ),
}


def hf_model(name):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name], dtype=torch.float32)
    return scramble(model, seed=1, std=0.1).eval()


def ids(batch=2, length=33):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
@torch.no_grad()
def test_imported_logits_equal_transformers(name):
    theirs = hf_model(name)
    ours = from_hf_model(theirs)
    expected = theirs(ids()).logits
    assert expected.std() > 0.1, "test model too flat to compare"
    torch.testing.assert_close(ours(ids()), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
@torch.no_grad()
def test_export_through_folders_loads_in_transformers(tmp_path, name):
    theirs = hf_model(name)
    theirs.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-import", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 0
    ours = load_model(tmp_path / "ck")
    torch.testing.assert_close(ours(ids()), theirs(ids()).logits, atol=1e-5, rtol=0)
    assert main(["convert", "hf-export", str(tmp_path / "ck"), str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(back(ids()).logits, ours(ids()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "tiny-moe", "tiny-gemma"])
@torch.no_grad()
def test_our_presets_export_to_transformers(tmp_path, preset):
    ours = scramble(build_model(get_preset(preset, vocab_size=V, block_size=64), seed=0), std=0.1).eval()
    save_checkpoint(ours, tmp_path / "ck")
    assert main(["convert", "hf-export", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(theirs(ids()).logits, ours(ids()), atol=1e-5, rtol=0)
    assert (
        type(theirs).__name__
        == {
            "tiny": "GPT2LMHeadModel",
            "tiny-llama": "LlamaForCausalLM",
            "tiny-moe": "MixtralForCausalLM",
            "tiny-gemma": "Gemma3ForCausalLM",
        }[preset]
    )


def test_real_model_presets_map_onto_their_released_hf_configs():
    """The gemma3-270m and qwen2-0.5b presets export to the configs google/gemma-3-270m and Qwen/Qwen2-0.5B
    publish, and import back unchanged."""
    gemma = to_hf_config(get_preset("gemma3-270m"))
    assert (gemma.model_type, gemma.hidden_size, gemma.num_hidden_layers) == ("gemma3_text", 640, 18)
    assert (gemma.num_attention_heads, gemma.num_key_value_heads, gemma.head_dim) == (4, 1, 256)
    assert gemma.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3 and gemma.sliding_window == 512
    assert gemma.query_pre_attn_scalar == 256 and gemma.hidden_activation == "gelu_pytorch_tanh"
    assert gemma.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert gemma.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    qwen = to_hf_config(get_preset("qwen2-0.5b"))
    assert (qwen.model_type, qwen.hidden_size, qwen.num_key_value_heads) == ("qwen2", 896, 2)
    assert not qwen.use_sliding_window and qwen.tie_word_embeddings
    for name in ("gemma3-270m", "qwen2-0.5b"):
        assert from_hf_config(to_hf_config(get_preset(name))) == get_preset(name)


@pytest.mark.parametrize("preset,message", [("tiny-gpt3", "locally banded"), ("tiny-gpt1", "post-LN")])
def test_architectures_without_an_hf_family_are_refused(preset, message):
    with pytest.raises(InteropError, match=message):
        to_hf_model(build_model(get_preset(preset, vocab_size=V), seed=0))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(norm_offset=0.0), "the nearest, gemma3, needs norm_offset=1.0"),
        (dict(mlp="swiglu", qk_norm=False), "the nearest, gemma3, needs mlp='geglu', qk_norm=True"),
        (dict(embed_scale=1.0), "Gemma 3 scales embeddings by √n_embd = 11.31371"),
        (dict(attn_scale=0.3), "integer query_pre_attn_scalar"),
    ],
)
def test_models_no_family_represents_are_refused_by_name(overrides, message):
    with pytest.raises(InteropError, match=message):
        to_hf_config(get_preset("tiny-gemma", **overrides))


@pytest.mark.parametrize(
    "config,message",
    [
        (transformers.Gemma3TextConfig(final_logit_softcapping=30.0), "final_logit_softcapping=30.0 is not supported"),
        (transformers.Gemma3TextConfig(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0 is not supported"),
        (transformers.Gemma3Config(), "model_type 'gemma3' .*only the text model, gemma3_text"),
        (
            transformers.Qwen2Config(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
            "RoPE type 'dynamic' is not supported",
        ),
        (
            transformers.Gemma3TextConfig(rope_parameters={
                "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            }),
            "RoPE type 'yarn' on full-attention layers is not supported",
        ),
    ],
)  # fmt: skip
def test_hf_configs_we_cannot_represent_are_refused_by_name(config, message):
    with pytest.raises(InteropError, match=message):
        from_hf_config(config)


def test_import_of_a_non_model_folder_fails_clearly(tmp_path, capsys):
    assert main(["convert", "hf-import", str(tmp_path), str(tmp_path / "ck")]) == 2
    assert "is not a transformers model folder" in capsys.readouterr().err


def test_generate_on_an_imported_checkpoint_needs_a_fitting_tokenizer(tmp_path, capsys):
    hf_model("llama-gqa-3to1-theta500").save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-import", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 0
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "hi"]) == 2
    assert "names no tokenizer: pass --tokenizer" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "hi", "--tokenizer", "bytes"]) == 2
    assert "tokenizer bytes has 261 tokens, the model only 101" in capsys.readouterr().err
