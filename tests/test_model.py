"""The model: cached decoding (contiguous and paged) equals uncached for every variant; MoE, banded
attention, the Gemma/Qwen variants and init do what their definitions say; bad input fails clearly."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL, VARIANTS, scramble

from gptstack.config import ModelConfig, get_preset
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.generate import generate
from gptstack.infer.kvcache import KVCache
from gptstack.infer.sampling import SamplingParams
from gptstack.model import GPT, MoE, OffsetRMSNorm, build_model, count_params


def make(cfg: ModelConfig, seed: int = 0) -> GPT:
    return scramble(build_model(cfg, seed=seed), seed=seed).eval()


@torch.no_grad()
def test_cached_logits_equal_uncached(variant):
    model = make(variant)
    idx = torch.randint(0, variant.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    full = model(idx)  # (2, 40, V)
    cache = KVCache(variant, batch_size=2)
    # prefill 20, one chunk of 7 (chunked prefill: T > 1 at pos > 0), then one token at a time
    pieces = [model(idx[:, :20], kv_cache=cache), model(idx[:, 20:27], kv_cache=cache)]
    pieces += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(27, 40)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos == 40


def test_cached_greedy_decoding_equals_the_uncached_loop(variant):
    model = make(variant, seed=3)
    prompt = [5, 17, 42, 8]
    params = SamplingParams(temperature=0, max_tokens=50)
    cached = list(generate(model, prompt, params))
    uncached = list(generate(model, prompt, params, use_cache=False))
    assert cached == uncached
    assert len(set(cached)) > 3, f"degenerate test model: greedy output {cached}"


@pytest.mark.parametrize("name", ["gemma3-local-global", "qwen2-qkv-bias"])
@torch.no_grad()
def test_paged_engine_decodes_the_new_variants_like_the_full_forward(name):
    """Prompts shorter and longer than the band (5), chunked prefill (6 tokens a step) and batched
    decoding: the tokens of the uncached loop, and each chosen token's log-probability from one full
    forward over prompt + output (a float64 model, so a near-tie cannot flip a greedy choice; the engine
    reports log-probabilities in fp32)."""
    model = make(VARIANTS[name]).double()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 9, 17, 26)]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1)
    engine = Engine(model, EngineConfig(kv_block_size=4, max_seqs=4, max_step_tokens=6))
    for prompt, c in zip(prompts, engine.generate(prompts, params), strict=True):
        assert c.token_ids == list(generate(model, prompt, params, use_cache=False))
        logprobs = model(torch.tensor([prompt + c.token_ids]))[0].float().log_softmax(-1)  # (T, V), as the engine
        expected = [logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(c.token_ids)]
        assert [lp for lp, _ in c.logprobs] == pytest.approx(expected, abs=1e-6)


@torch.no_grad()
def test_offset_norm_and_embed_scale_are_reparametrisations():
    """(1+w) norms equal plain RMSNorm with weight 1+w; × embed_scale equals a scaled embedding table;
    attn_scale=1/√hd equals the default; a second RoPE base equal to the first changes nothing."""
    gemma = VARIANTS["gemma3-local-global"].replace(tie_embeddings=False, rope_scaling=1.0)
    model = make(gemma)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    plain = build_model(gemma.replace(norm_offset=0.0, embed_scale=1.0), seed=0).eval()
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, OffsetRMSNorm):
            state[name + ".weight"] = 1.0 + module.weight
    state["transformer.wte.weight"] = state["transformer.wte.weight"] * torch.tensor(gemma.embed_scale)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(idx), model(idx), atol=2e-5, rtol=1e-5)
    for change in (dict(attn_scale=gemma.head_dim**-0.5), dict(rope_local_theta=gemma.rope_theta)):
        base = {k: None for k in change}
        a, b = make(gemma.replace(**change)), make(gemma.replace(**base))
        torch.testing.assert_close(a(idx), b(idx), atol=1e-6, rtol=0)
    other_base = make(gemma.replace(rope_local_theta=gemma.rope_theta * 10))
    assert (other_base(idx) - model(idx)).abs().max() > 1e-3


@torch.no_grad()
def test_qk_norm_sandwich_and_qkv_bias_parameters():
    """Gemma: (head_dim,) q/k norms and two output norms per block, initialised to a unit scale (w = 0
    with the (1+w) offset), no biases; Qwen2: biases on c_attn only."""
    gemma = build_model(get_preset("tiny-gemma", vocab_size=97), seed=0)
    block = gemma.transformer.h[0]
    assert block.attn.q_norm.weight.shape == block.attn.k_norm.weight.shape == (32,)
    norms = [m for m in gemma.modules() if isinstance(m, OffsetRMSNorm)]
    assert len(norms) == 6 * 6 + 1 and all((m.offset + m.weight == 1).all() for m in norms)
    assert not any(n.endswith("bias") for n, _ in gemma.named_parameters())
    assert [b.attn.window for b in gemma.transformer.h] == [64] * 5 + [None]
    assert not torch.equal(gemma.rope_local_cos, gemma.rope_cos)  # bases 1e4 and 1e6
    qwen = build_model(get_preset("tiny-llama", qkv_bias=True), seed=0)
    biases = [n for n, _ in qwen.named_parameters() if n.endswith("bias")]
    assert biases == [f"transformer.h.{i}.attn.c_attn.bias" for i in range(4)]


@torch.no_grad()
def test_moe_equals_its_per_token_definition():
    """Dropless top-k routing: every token gets Σ_k gate_k · expert_k(x), gates renormalised."""
    cfg = VARIANTS["moe-swiglu"]
    moe = scramble(build_model(cfg, seed=0)).transformer.h[0].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(3, 11, cfg.n_embd, generator=torch.Generator().manual_seed(0))
    out, _ = moe(x)
    for b in range(3):
        for t in range(11):
            probs = F.softmax(moe.router.weight @ x[b, t], dim=-1)
            top = probs.topk(cfg.n_expert_active)
            expected = torch.zeros(cfg.n_embd)
            for gate, e in zip(top.values / top.values.sum(), top.indices, strict=True):
                gate_h, up_h = (moe.w_fc[e] @ x[b, t]).chunk(2)
                expected += gate * (moe.w_proj[e] @ (F.silu(gate_h) * up_h))
            torch.testing.assert_close(out[b, t], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_moe_aux_losses_follow_their_definitions():
    cfg = ModelConfig(**SMALL, n_expert=4, n_expert_active=1, moe_aux_loss_coef=0.5, moe_z_loss_coef=0.1)
    model = build_model(cfg, seed=0).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    for block in model.transformer.h:  # uniform router: P_e = 1/E, so balance = Σ f_e = 1; z = log(E)²
        block.mlp.router.weight.zero_()
    logits, loss = model(idx, targets=idx)
    lm = F.cross_entropy(logits.view(-1, cfg.vocab_size), idx.view(-1))
    torch.testing.assert_close(loss - lm, torch.tensor(0.5 * 1.0 + 0.1 * math.log(4) ** 2))
    x = torch.randn(64, cfg.n_embd).abs()
    moe = model.transformer.h[0].mlp
    moe.router.weight.zero_()
    moe.router.weight[0] = 100.0  # every token picks expert 0 with probability ≈ 1: balance → E
    _, aux = moe(x[None])
    assert aux[0].item() == pytest.approx(4.0, rel=1e-3)


@torch.no_grad()
def test_banded_layer_sees_exactly_its_window():
    window = 4
    cfg = ModelConfig(**{**SMALL, "n_layer": 1}, attn_pattern="local", attn_window=window)
    model = make(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    j = 10
    changed[0, j] = (idx[0, j] + 1) % cfg.vocab_size
    diff = (model(idx) - model(changed)).abs().amax(dim=-1)[0]  # (T,)
    affected = (diff > 1e-6).nonzero().flatten().tolist()
    assert affected == list(range(j, j + window)), f"positions affected by token {j}: {affected}"


def test_init_follows_gpt2():
    cfg = get_preset("tiny", n_layer=8, n_embd=256, vocab_size=1000)
    model = build_model(cfg, seed=0)
    h = model.transformer.h
    resid = torch.cat([b.attn.c_proj.weight.flatten() for b in h] + [b.mlp.c_proj.weight.flatten() for b in h])
    other = torch.cat([b.attn.c_attn.weight.flatten() for b in h] + [b.mlp.c_fc.weight.flatten() for b in h])
    assert resid.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.03)
    assert other.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert all((b.attn.c_attn.bias == 0).all() and (b.ln_1.weight == 1).all() for b in h)
    # built on the meta device and materialised: the tied head still shares the embedding's storage
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.lm_head.weight.device.type == "cpu"


def test_meta_construction_touches_no_memory():
    counts = count_params(get_preset("gpt3-175b"))  # 700 GB of fp32 if it were materialised
    assert counts["total"] > 174e9


def test_rope_buffers_are_derived_not_saved():
    model = build_model(VARIANTS["llama-gqa"], seed=0)
    assert "rope_cos" not in model.state_dict()
    assert torch.isfinite(model.rope_cos).all() and model.rope_cos[0].eq(1).all()


def test_loss_ignores_targets_of_minus_one():
    model = make(VARIANTS["gpt2"])
    idx = torch.randint(0, 97, (2, 10))
    targets = idx.clone()
    targets[:, :5] = -1
    logits, loss = model(idx, targets=targets)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 97), idx[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_bad_input_fails_clearly():
    model = make(VARIANTS["gpt2"])
    with pytest.raises(ValueError, match="sequence of 65 tokens exceeds the context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) integer tensor"):
        model(torch.zeros(65))
    cache = KVCache(model.config, 1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match=r"sequence of 9 tokens exceeds|KV cache full"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceed the context of 64 tokens"):
        list(generate(model, [1] * 60, SamplingParams(max_tokens=10)))
    with pytest.raises(ValueError, match="prompt is empty"):
        list(generate(model, [], SamplingParams(max_tokens=10)))
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = make(VARIANTS["llama-gqa"])
    a = list(generate(model, [1, 2, 3], SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20)))
    b = list(generate(model, [1, 2, 3], SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20)))
    greedy = list(generate(model, [1, 2, 3], SamplingParams(temperature=0, max_tokens=20)))
    top1 = list(generate(model, [1, 2, 3], SamplingParams(temperature=1.3, top_k=1, seed=1, max_tokens=20)))
    assert a == b and top1 == greedy


def test_generation_never_samples_ids_the_tokenizer_cannot_decode():
    from gptstack.tokenizer import byte_tokenizer

    model = make(VARIANTS["gpt2"])  # 97 ids, of which the tokenizer below can decode only 0..49
    allowed = torch.arange(97) < 50
    for seed in range(5):
        out = list(generate(model, [1, 2], SamplingParams(temperature=2.0, seed=seed, max_tokens=40), allowed=allowed))
        assert max(out) < 50
    mask = byte_tokenizer().decodable_mask(300)  # the model may be larger than the tokenizer
    assert mask[:261].all() and not mask[261:].any()  # 256 bytes, <|endoftext|>, 4 chat role tokens


@torch.no_grad()
def test_decode_layout_gives_the_same_logits_and_tokens(variant):
    from gptstack.transforms.decode import DecodeLinear, decode_layout

    model = make(variant, seed=4)
    fast = decode_layout(make(variant, seed=4))
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    assert any(isinstance(m, DecodeLinear) for m in fast.modules())
    idx = torch.randint(0, variant.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fast(idx), model(idx), atol=1e-5, rtol=0)
    params = SamplingParams(temperature=0, max_tokens=30)
    assert list(generate(fast, [3, 1, 4], params)) == list(generate(model, [3, 1, 4], params))
