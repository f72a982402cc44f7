"""ModelConfig: presets match the papers' parameter counts; JSON round-trips; bad configs fail clearly."""

import pytest

from gptstack.config import PRESETS, ConfigError, ModelConfig, get_preset, load_config, parse_overrides
from gptstack.model import count_params, flops_per_token, kv_cache_bytes_per_token


@pytest.mark.parametrize(
    "name,expected",
    [  # exact counts of the released GPT-2 checkpoints (tied embeddings)
        ("gpt2-small", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_gpt2_parameter_counts_are_exact(name, expected):
    assert count_params(get_preset(name))["total"] == expected


@pytest.mark.parametrize(
    "name,published,tolerance",
    [
        ("gpt1", 117e6, 0.01),  # GPT-1 paper: 117M
        ("gpt3-small", 125e6, 0.01),  # GPT-3 Table 2.1
        ("gpt3-medium", 350e6, 0.02),
        ("gpt3-large", 760e6, 0.01),
        ("gpt3-xl", 1.3e9, 0.02),
        ("gpt3-2.7b", 2.7e9, 0.02),
        ("gpt3-6.7b", 6.7e9, 0.01),
        ("gpt3-13b", 13.0e9, 0.02),
        ("gpt3-175b", 175e9, 0.01),
        ("llama3-8b", 8.03e9, 0.01),  # Llama 3 paper
    ],
)
def test_parameter_counts_match_the_papers(name, published, tolerance):
    total = count_params(get_preset(name))["total"]
    assert abs(total - published) / published < tolerance, f"{name}: {total:,} vs published {published:,.0f}"


def test_real_model_presets_have_the_released_shapes():
    # Qwen2-0.5B: the released checkpoint holds 494,032,768 parameters (tied), 0.36B of them outside the
    # embedding (Qwen2.5 report, Table 1, same shape).
    qwen = get_preset("qwen2-0.5b")
    assert count_params(qwen)["total"] == 494_032_768
    assert round((494_032_768 - qwen.vocab_size * qwen.n_embd) / 1e9, 2) == 0.36
    # Gemma 3 270M (Google's model card): ~170M embedding and ~100M transformer-block parameters.
    gemma = get_preset("gemma3-270m")
    embedding = gemma.vocab_size * gemma.n_embd
    assert round(embedding / 1e6, -1) == 170 and round((count_params(gemma)["total"] - embedding) / 1e6, -1) == 100
    assert gemma.attn_kinds.count("local") == 15 and gemma.attn_kinds[5::6] == ["dense"] * 3
    assert gemma.qkv_bias is False and qwen.qkv_bias is True and not qwen.bias  # None resolves from bias


def test_moe_preset_counts_total_and_active_parameters():
    # Mixtral 8x7B (Jiang et al. 2024): 46.7B total, 12.9B active with top-2 of 8 experts.
    counts = count_params(get_preset("moe-8x7b"))
    assert abs(counts["total"] - 46.7e9) / 46.7e9 < 0.005
    assert abs(counts["active"] - 12.9e9) / 12.9e9 < 0.005


def test_gpt3_training_compute_matches_the_paper():
    # GPT-3 Table D.1: 175B trained on 300B tokens = 3.14e23 FLOPs (6N; attention adds ~1.6%).
    flops = flops_per_token(get_preset("gpt3-175b"))["train"] * 300e9
    assert abs(flops - 3.14e23) / 3.14e23 < 0.02


def test_kv_cache_bytes_per_token():
    # Llama 3 8B: 32 layers × 8 KV heads × 128 × (K, V) × 2 bytes = 128 KiB per token in bf16.
    assert kv_cache_bytes_per_token(get_preset("llama3-8b"), 2) == 128 * 1024
    # GQA/MQA shrink the cache by n_head / n_kv_head.
    mha = get_preset("tiny-llama", n_kv_head=4)
    mqa = get_preset("tiny-llama", n_kv_head=1)
    assert kv_cache_bytes_per_token(mha) == 4 * kv_cache_bytes_per_token(mqa)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    cfg = get_preset(name)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_gpt3_presets_alternate_dense_and_local_layers():
    assert get_preset("gpt3-175b").attn_kinds[:4] == ["dense", "local", "dense", "local"]


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(n_embd=100, n_head=3), "does not divide n_embd"),
        (dict(n_head=6, n_kv_head=4), "n_kv_head=4 does not divide n_head=6"),
        (dict(pos="alibi"), "pos='alibi' is not one of"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(attn_pattern="dense,sparse"), "unknown kind 'sparse'"),
        (dict(n_expert=4, n_expert_active=5), "n_expert_active=5"),
        (dict(pos="rope", n_embd=60, n_head=4), "even head_dim"),
        (dict(mlp="reglu"), "mlp='reglu' is not one of gelu, swiglu, geglu"),
        (dict(qk_norm=True), "qk_norm and norm_offset need norm='rmsnorm'"),
        (dict(norm_offset=1.0), "qk_norm and norm_offset need norm='rmsnorm'"),
        (dict(norm="rmsnorm", norm_offset=float("nan")), "norm_offset must be a finite number"),
        (dict(sandwich_norm=True, prenorm=False), "sandwich_norm needs prenorm blocks"),
        (dict(qkv_bias="yes"), "qkv_bias must be true or false"),
        (dict(embed_scale=0.0), "embed_scale must be a positive number, got 0.0"),
        (dict(attn_scale=-0.1), "attn_scale must be a positive number"),
        (dict(pos="rope", rope_local_theta=float("inf")), "rope_local_theta must be a positive number"),
        (dict(rope_local_theta=1e4), "rope_local_theta needs pos='rope'"),
    ],
)
def test_inconsistent_configs_fail_with_a_clear_message(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


def test_unknown_field_and_preset_get_suggestions():
    with pytest.raises(ConfigError, match=r"unknown config field 'n_layers' .*did you mean 'n_layer'"):
        ModelConfig.from_dict({"n_layers": 4})
    with pytest.raises(ConfigError, match="unknown preset 'gpt2-smal'; did you mean gpt2-small"):
        get_preset("gpt2-smal")


def test_overrides_are_typed_by_field(tmp_path):
    assert parse_overrides(["n_layer=3", "bias=false", "rope_theta=5e5", "n_kv_head=none"]) == {
        "n_layer": 3,
        "bias": False,
        "rope_theta": 5e5,
        "n_kv_head": None,
    }
    with pytest.raises(ConfigError, match="n_layer='x' is not a valid int"):
        parse_overrides(["n_layer=x"])
    path = tmp_path / "cfg.json"
    path.write_text(get_preset("tiny").to_json())
    assert load_config(path, n_layer=2).n_layer == 2
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)
