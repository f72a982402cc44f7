"""Native batch-1 decoding (issue 20, infer/native.py over transforms/csrc/decode.c): each of the step's linear
kernels equals its PyTorch definition in transforms/kernels.py; the whole step's logits equal the PyTorch
forward's; greedy tokens equal the plain forward loop for fp32, int8, int4 and a Q8_0 token table with its tied
head; models the step cannot run are refused with the reason. The opt-in w8a8 step (`act_int8`): its products
equal exact integer block dots, and on the real SmolLM2 it follows the forward under `int8_activations`. The
engine's native step (PagedDecoder over the paged pool): bit-equal to the contiguous step over a shuffled block
table; the engine's greedy tokens with it equal the batched path and the forward loop (tiny fp32/int8/int4, SmolLM2
fp32 and Q4_1 kept), seeded samples equal, and a request joining mid-decode leaves both outputs as alone. The
batched native step (`step_batch`, rows over their own block tables) equals each row stepped alone, prompt chunks
through it (rows of one sequence, attending causally) equal the forward, and concurrent requests, joining mid-decode
with their prefills in the same native step, decode through it as each alone. The batched w8a8 kernels
(gemm_a8.c) equal the batch-1 ones bit for bit, so w8a8 batched steps equal each row alone."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, scramble, smollm2_file
from torch import Tensor

from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.generate import generate
from gptstack.infer.kvcache import KVCache
from gptstack.infer.native import NativeDecoder, PagedDecoder, library, linear, linear_rows, make_lin, supports
from gptstack.infer.sampling import SamplingParams
from gptstack.model import build_model
from gptstack.transforms import kernels
from gptstack.transforms.quantize import QuantizedEmbedding, QuantizedLinear, TiedHead, int8_activations, quantize


def q8_0_table(model) -> None:
    """In place: the token table as int8g codes (groups of 32) and the head tied to them, as --keep-quantized."""
    w = model.transformer.wte.weight.detach()  # (V, D)
    table = QuantizedEmbedding(*w.shape, group_size=32)
    scales = (w.view(w.size(0), -1, 32).abs().amax(-1) / 127).clamp(min=1e-12)  # (V, D/32)
    table.qweight.copy_((w.view(w.size(0), -1, 32) / scales[..., None]).round().to(torch.int8).view_as(w))
    table.scales.copy_(scales)
    model.transformer.wte, model.lm_head = table, TiedHead(table)


def llama(kernel: str):
    model = scramble(build_model(VARIANTS["llama-gqa"], seed=0), seed=0).eval()
    if kernel == "q8_0 table":
        q8_0_table(model)
    elif kernel != "fp32":
        quantize(model, kernel, 32)
    return model


@torch.no_grad()
@pytest.mark.parametrize("method", ["fp32", "int8", "int4", "int8g"])
def test_native_linear_equals_its_definition(method):
    g = torch.Generator().manual_seed(0)
    K, N = 96, 75  # N: not a multiple of the 4-row or 32-column tiles, so the tails run too
    lin = torch.nn.Linear(K, N, bias=method == "int8")
    lin.weight.copy_(torch.randn(N, K, generator=g))
    module = lin if method == "fp32" else QuantizedLinear.from_linear(lin, method if method != "int8g" else "int4", 32)
    if method == "int8g":
        module = QuantizedLinear(K, N, False, "int8g", 32)
        module.qweight.copy_(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g))
        module.scales.copy_(torch.rand(N, K // 32, generator=g))
    x = torch.randn(K, generator=g)
    kernels.ENABLED = False  # the PyTorch definitions
    try:
        ref = module(x[None])[0]
    finally:
        kernels.ENABLED = True
    for threads in (1, 2):
        torch.testing.assert_close(linear(module, x, threads), ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("kernel", ["fp32", "int8", "int4", "q8_0 table"])
def test_native_greedy_equals_the_forward_loop(kernel):
    model = llama(kernel)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 7, 19)]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    kernels.ENABLED = False  # the reference: the plain forward loop through the PyTorch definitions
    try:
        expected = [list(generate(model, p, greedy)) for p in prompts]
    finally:
        kernels.ENABLED = True
    decoder = NativeDecoder(model, max_len=48)
    assert [list(decoder.greedy(p, 24)) for p in prompts] == expected


@torch.no_grad()
def test_native_step_logits_equal_the_forward_and_fill_the_same_cache():
    model = llama("fp32")
    decoder = NativeDecoder(model, max_len=32)
    tokens = [5, 17, 3, 88, 41, 9, 60]
    decoder.prefill(tokens[:2])
    cache = KVCache(model.config, 1, 32)
    model(torch.tensor([tokens[:2]]), kv_cache=cache)
    for t in tokens[2:]:
        got = decoder.step(t).clone()
        ref = model(torch.tensor([[t]]), kv_cache=cache)[0, -1]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    n = len(tokens)
    torch.testing.assert_close(decoder.cache.k[:, :, :, :n], cache.k[:, :, :, :n], rtol=1e-4, atol=1e-5)


def test_native_decoding_refuses_what_it_cannot_run():
    gpt2 = build_model(VARIANTS["gpt2"], seed=0)
    assert "rmsnorm" in supports(gpt2) and "rotary" in supports(gpt2)
    with pytest.raises(ValueError, match="native decoding needs"):
        NativeDecoder(gpt2)
    decoder = NativeDecoder(llama("fp32"), max_len=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decoder.step(97)
    with pytest.raises(ValueError, match="exceed the cache"):
        list(decoder.greedy([1, 2, 3], 6))
    with pytest.raises(ValueError, match="1 to 7 tokens"):
        decoder.prefill([])


@torch.no_grad()
def test_decode_linear_picks_gemv_or_blas_per_shape_and_both_give_the_product():
    from gptstack.transforms import decode

    lin = torch.nn.Linear(96, 75, bias=True)
    fast, x = decode.DecodeLinear(lin), torch.randn(1, 96)
    decode.gemv_wins(x, lin.weight)
    assert isinstance(decode._GEMV_WINS[(75, 96)], bool)  # measured once, then remembered for the shape
    try:
        for wins in (True, False):
            decode._GEMV_WINS[(75, 96)] = wins
            torch.testing.assert_close(fast(x), lin(x), rtol=1e-5, atol=1e-5)
    finally:
        del decode._GEMV_WINS[(75, 96)]


# ---- int8 activations (w8a8) ---------------------------------------------------------------------------------


def w8a8_ref(module: QuantizedLinear, x: Tensor) -> Tensor:
    """module · x as the w8a8 kernels define it: x's int8 blocks of 32 (kernels.quantize_act_ref) times the weight
    codes, one exact integer dot per block and output, then the blocks' float terms summed (float64 here)."""
    q, d = kernels.quantize_act_ref(x)  # (K,) int8, (B,)
    (B,), K, N = d.shape, module.in_features, module.out_features
    qb, per = q.long().view(B, 32), module.group_size // 32
    if module.method == "int4":
        codes = torch.stack([module.qweight & 15, module.qweight >> 4], dim=1).view(K, N).long()  # (K, N)
        dots = (codes.view(B, 32, N) * qb[..., None]).sum(1).double()  # (B, N)
        s, m = (t.repeat_interleave(per, 0).double() for t in (module.scales, module.mins))  # (B, N)
        sd = d.double() * qb.sum(1).double()  # d · (sum of the block's codes): the minimum's term
        return (dots * d.double()[:, None] * s + sd[:, None] * m).sum(0)
    dots = (module.qweight.long().view(N, B, 32) * qb).sum(-1).double()  # (N, B)
    if module.method == "int8":  # one scale per row: applied to the row's total
        return (dots * d.double()).sum(1) * module.scales.double()
    return (dots * d.double() * module.scales.repeat_interleave(per, 1).double()).sum(1)


@torch.no_grad()
@pytest.mark.parametrize("K, N", [(192, 75), (128, 33), (576, 100)])
@pytest.mark.parametrize(
    "method, group",
    [("int8", 0), ("int4", 32), ("int4", 64), ("int4 f16", 32), ("int4 f16", 64), ("int8g", 32), ("int8g", 64)],
)
def test_native_w8a8_linear_equals_exact_integer_block_dots(method, group, K, N):
    """int4 f16: scales and minimums that are fp16 values, as a GGUF file's, which the kernel reads as fp16."""
    g = torch.Generator().manual_seed(K + N + group)
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.copy_(torch.randn(N, K, generator=g))
    if method == "int8g":
        module = QuantizedLinear(K, N, False, "int8g", group)
        module.qweight.copy_(torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g))  # -128 too
        module.scales.copy_(torch.rand(N, K // group, generator=g))
    else:
        module = QuantizedLinear.from_linear(lin, method.split()[0], group or 32)
    if method == "int4 f16":
        module.scales.copy_(module.scales.half().float())
        module.mins.copy_(module.mins.half().float())
    assert make_lin(module, [], act_int8=True).f16 == (method == "int4 f16")
    x = torch.randn(K, generator=g) * torch.rand(K, generator=g) ** 3 * 4  # uneven blocks, a few large values
    x[:32] = 0  # an all-zero block: scale 0
    ref = w8a8_ref(module, x).float()
    for threads in (1, 2):
        got = linear(module, x, threads, act_int8=True)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # and the same as the weight-only product of the values the activation codes stand for
    torch.testing.assert_close(got, module(kernels.fake_quantize_act(x)[None])[0], rtol=1e-4, atol=1e-4)


needs_a8_batched = pytest.mark.skipif(
    library() is None or not library().a8_batched(), reason="the batched w8a8 kernels need AVX-512 VNNI"
)


@torch.no_grad()
@needs_a8_batched
@pytest.mark.parametrize("method", ["int4", "int4 f16", "int8", "int8g"])
def test_native_w8a8_batched_rows_equal_the_batch1_kernel_bit_for_bit(method):
    """gemm_a8.c's batched kernels on the repacked layouts: every row equals the batch-1 w8a8 kernel's product bit for
    bit (1, 5 and 9 rows: the 4-row tiles and their tails; 48 outputs: a pair of 16-output panels and a single one;
    40 outputs: no batched layout, each row through the batch-1 kernel)."""
    g = torch.Generator().manual_seed(3)
    K = 96
    for N in (48, 40):
        if method == "int8g":
            module = QuantizedLinear(K, N, False, "int8g", 32)
            module.qweight.copy_(torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g))  # -128 too
            module.scales.copy_(torch.rand(N, K // 32, generator=g))
        else:
            lin = torch.nn.Linear(K, N, bias=False)
            lin.weight.copy_(torch.randn(N, K, generator=g))
            module = QuantizedLinear.from_linear(lin, method.split()[0], 32)
        if method == "int4 f16":
            module.scales.copy_(module.scales.half().float())
            module.mins.copy_(module.mins.half().float())
        assert bool(make_lin(module, [], act_int8=True, batched=True).pw) == (N % 16 == 0)
        for B in (1, 5, 9):
            x = torch.randn(B, K, generator=g) * torch.rand(B, K, generator=g) ** 3 * 4
            x[0, :32] = 0  # an all-zero block
            alone = torch.stack([linear(module, row, 2, act_int8=True) for row in x])
            assert torch.equal(linear_rows(module, x, 2, act_int8=True), alone), (N, B)


def test_native_w8a8_refuses_widths_off_the_32_blocks():
    module = QuantizedLinear.from_linear(torch.nn.Linear(48, 8), "int8")
    with pytest.raises(ValueError, match="multiples of 32"):
        linear(module, torch.randn(48), act_int8=True)
    assert linear(module, torch.randn(48)).shape == (8,)  # fp32 activations take any width


@pytest.fixture(scope="module")
def smol_w8a8(smollm2_gguf, smollm2):
    """The real SmolLM2 as the file keeps it (int4 layers from Q4_1, a Q8_0 token table and its tied head) and
    int8 per row, with the file's tokenizer."""
    from gptstack.interop import gguf

    kept = gguf.gguf_model(*smollm2_gguf, keep_quantized=True)
    return {"Q4_1 kept": kept, "int8": quantize(gguf.gguf_model(*smollm2_gguf), "int8")}, smollm2.tokenizer


SMOL_TEXT = (
    "Photosynthesis turns light into chemical energy: chlorophyll in the leaves absorbs sunlight, and the plant uses"
    " it to split water and fix carbon dioxide into sugars, releasing oxygen."
)


@torch.no_grad()
def teacher_forced(model, tokens: list[int], decoder: NativeDecoder | None) -> Tensor:
    """Next-token logits (len(tokens) - 4, V) after each of tokens[3:-1], the first 4 prefilled: the native step's,
    or the PyTorch forward's under int8_activations."""
    if decoder is not None:
        first = decoder.prefill(tokens[:4]).clone()
        return torch.stack([first] + [decoder.step(t).clone() for t in tokens[4:-1]])
    cache = KVCache(model.config, 1, len(tokens))
    with int8_activations(model):
        first = model(torch.tensor([tokens[:4]]), kv_cache=cache)[0, -1]
        return torch.stack([first] + [model(torch.tensor([[t]]), kv_cache=cache)[0, -1] for t in tokens[4:-1]])


@torch.no_grad()
@pytest.mark.parametrize("variant", ["Q4_1 kept", "int8"])
def test_smollm2_w8a8_step_follows_the_int8_activation_forward(smol_w8a8, variant):
    """Exact greedy identity with the PyTorch forward is out of reach: an activation a float ulp from a rounding
    boundary takes the other int8 code, and one such flip moves every later activation by a quantization step
    (the forward itself, its inputs perturbed by 1e-6 relative noise, moves SmolLM2's logits by ~5%). So: every
    quantized layer of the step runs w8a8; its greedy tokens are deterministic (run twice, 1 and 2 threads); and
    teacher-forced, its top-1 token agrees with the forward under `int8_activations` (measured: 1.0 for the kept
    file, 0.91 for int8 over 67 positions; two such forwards 1e-6 apart agree about as often)."""
    models, tok = smol_w8a8
    model = models[variant]
    tokens = tok.encode(SMOL_TEXT)
    decoder = NativeDecoder(model, max_len=len(tokens) + 24, threads=1, act_int8=True)
    d = decoder.desc
    assert all(lin.a8 for name in ("qkv", "proj", "fc", "down") for lin in getattr(d, name)[: d.n_layer])
    assert d.head.a8
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):")]
    runs = [[list(dec.greedy(p, 24)) for p in prompts] for dec in (decoder, decoder)]
    two = NativeDecoder(model, max_len=len(tokens) + 24, threads=2, act_int8=True)
    assert runs[0] == runs[1] == [list(two.greedy(p, 24)) for p in prompts]
    native, ref = teacher_forced(model, tokens, decoder), teacher_forced(model, tokens, None)
    agree = (native.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.85, f"top-1 agreement {agree:.2f} over {len(ref)} positions"


# ---- the engine's native step (infer/engine.py over native.PagedDecoder: the paged block pool) ----------------


def engine_run(model, prompts: list[list[int]], params: SamplingParams, native: bool, **config) -> list[list[int]]:
    """Each prompt's tokens through an Engine, one request at a time (batch 1: where the native step runs)."""
    engine = Engine(model, EngineConfig(kv_block_size=4, native=native, **config))
    assert (engine.native is not None) == native, engine.native_off
    out = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert (engine.stats["native_steps"] > 0) == native and engine.pool.used == 0
    return out


@torch.no_grad()
def test_paged_step_over_a_shuffled_block_table_equals_the_contiguous_step():
    """The same arithmetic over the engine's pool layout: blocks in any order give the contiguous cache's logits
    bit for bit, and each position's K/V lands in its table slot."""
    model = llama("int4")
    cfg = model.config
    tokens = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = NativeDecoder(model, max_len=32)
    bs, nb = 4, 11
    k, v = (torch.zeros(cfg.n_layer, nb, bs, cfg.n_kv_head, cfg.head_dim) for _ in range(2))
    paged = PagedDecoder(model, k, v)
    table = torch.randperm(nb, generator=torch.Generator().manual_seed(3))[:6].tolist()
    for pos, t in enumerate(tokens):
        assert torch.equal(paged.step(t, pos, table), ref.step(t))
    slots = [table[p // bs] * bs + p % bs for p in range(len(tokens))]
    assert torch.equal(
        k.view(cfg.n_layer, -1, cfg.n_kv_head, cfg.head_dim)[:, slots], ref.cache.k[:, 0, :, :23].transpose(1, 2)
    )
    with pytest.raises(ValueError, match="past the 6 blocks"):
        paged.step(0, 24, table)
    with pytest.raises(ValueError, match="block ids must be in"):
        paged.step(0, 0, [nb])
    with pytest.raises(ValueError, match="KV pool k"):
        PagedDecoder(model, k.double(), v)


@torch.no_grad()
@pytest.mark.parametrize("kernel", ["fp32", "int4", "q8_0 table"])
def test_native_batched_step_equals_each_row_stepped_alone(kernel):
    """step_batch (decode.c's decode_batch over gemm.c's tiled products): rows at different positions over their own
    block tables give the logits and K/V slots of each row through the batch-1 step (to float rounding: the tiled
    products sum in another order); bad batches are refused."""
    model = llama(kernel)
    cfg = model.config
    bs, nb = 4, 16
    k, v = (torch.zeros(cfg.n_layer, nb, bs, cfg.n_kv_head, cfg.head_dim) for _ in range(2))
    paged = PagedDecoder(model, k, v, threads=2)
    tables, lens = [[3, 9, 1], [0, 12], [5, 2, 14, 7, 11]], [9, 5, 18]
    g = torch.Generator().manual_seed(6)
    for table, n in zip(tables, lens, strict=True):
        for pos, t in enumerate(torch.randint(0, 97, (n,), generator=g).tolist()):
            paged.step(t, pos, table)
    before = k.clone(), v.clone()
    tokens = [4, 50, 96]
    got = paged.step_batch(tokens, lens, tables).clone()  # (3, V)
    after = k.clone(), v.clone()
    k.copy_(before[0]), v.copy_(before[1])
    want = torch.stack([paged.step(t, n, table).clone() for t, n, table in zip(tokens, lens, tables, strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(after[0], k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after[1], v, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one position and one block table per token"):
        paged.step_batch(tokens, lens[:2], tables)
    with pytest.raises(ValueError, match="past the 2 blocks"):
        paged.step_batch([1, 2], [3, 8], tables[:2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        paged.step_batch([1, cfg.vocab_size], lens[:2], tables[:2])


@torch.no_grad()
def test_engine_decodes_concurrent_requests_in_native_batched_steps_as_each_alone():
    """Five requests at once (max_seqs 5): their decode steps run natively as one batch; each request's greedy tokens
    equal its plain forward loop."""
    model = llama("int4")
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 8, 1, 13, 6)]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (20, 9, 25, 14, 17)]
    alone = [list(generate(model, p, sp)) for p, sp in zip(prompts, params, strict=True)]
    engine = Engine(model, EngineConfig(kv_block_size=4, max_seqs=5))
    assert [c.token_ids for c in engine.generate(prompts, params)] == alone
    assert engine.native.batches and engine.stats["native_steps"] >= 20  # a prefill step, then native steps only
    assert engine.stats["steps"] - engine.stats["native_steps"] <= 2


@torch.no_grad()
@pytest.mark.parametrize("kernel", ["fp32", "int8", "int4"])
def test_engine_native_step_equals_the_batched_path_and_the_forward_loop(kernel):
    model = llama(kernel)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 7, 19)]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    expected = [list(generate(model, p, greedy)) for p in prompts]
    assert engine_run(model, prompts, greedy, True) == engine_run(model, prompts, greedy, False) == expected
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_tokens=24)
    assert engine_run(model, prompts, sampled, True) == engine_run(model, prompts, sampled, False)


@torch.no_grad()
@pytest.mark.parametrize("b_path", ["native", "pytorch"])
def test_a_request_joining_mid_native_decode_continues_both_exactly(b_path):
    """A runs alone (native steps) for 9 tokens, then B arrives: its 13-token prefill runs with A's next token in one
    native batched step (rows of one sequence attend causally to each other) or, when B asks for prompt logprobs, on
    the PyTorch path, reading A's native K/V; then both decode in native batched steps over the blocks either path
    wrote, and once B ends A decodes alone again; each equals its output alone."""
    model = llama("int8")
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randint(0, 97, (n,), generator=g).tolist() for n in (6, 13))
    alone = [list(generate(model, p, SamplingParams(temperature=0, max_tokens=n))) for p, n in ((a, 40), (b, 12))]
    engine = Engine(model, EngineConfig(kv_block_size=4))
    got = {engine.add_request(a, SamplingParams(temperature=0, max_tokens=40)): []}
    b_params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=1 if b_path == "pytorch" else None)
    steps = 0
    while engine.has_unfinished():
        if steps == 10:
            got[engine.add_request(b, b_params)] = []
        for out in engine.step():
            got[out.request_id] += out.token_ids
        steps += 1
    assert list(got.values()) == alone
    # A's prefill 1, A alone 9, B's prefill with A 1 (native only), A and B 11, A alone 18
    assert engine.stats["native_steps"] == 1 + 9 + (b_path == "native") + 11 + 18


@torch.no_grad()
@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_speculative_rounds_run_natively_and_keep_the_plain_greedy_output(kind):
    """Prompt lookup and a draft model (the same weights in fp32 against the int4 target: mostly accepted; its own
    native step over its own pool): each round's (k+1)-row verification and the draft's steps are native steps,
    and the greedy tokens are the forward loop's."""
    model = llama("int4")
    g = torch.Generator().manual_seed(8)
    ps = [torch.randint(0, 97, (n,), generator=g).tolist() * 3 for n in (3, 5, 8)]  # repeats: n-gram matches
    greedy = SamplingParams(temperature=0, max_tokens=20)
    expected = [list(generate(model, p, greedy)) for p in ps]
    cfg = EngineConfig(kv_block_size=4, speculative=kind, num_speculative=3)
    engine = Engine(model, cfg, draft=llama("fp32") if kind == "draft" else None)
    assert [c.token_ids for c in engine.generate(ps, greedy)] == expected
    stats = engine.stats
    assert stats["spec_accepted"] > 0.3 * stats["spec_proposed"] > 0
    assert stats["native_steps"] == stats["steps"]  # the joint prefill, then every round's verification
    assert (stats["draft_native_steps"] > 0) == (kind == "draft")


@torch.no_grad()
@pytest.mark.parametrize("kernel", ["fp32", "int4"])
def test_native_prefill_rows_equal_the_forward_and_fill_the_same_cache(kernel):
    """A 10-token prompt through step_batch as 10 rows of one block table (positions 0..9), then 3 more tokens as a
    second chunk: the logits of every row equal the PyTorch forward's, and a decode step after it equals the
    forward's next position, so the keys and values the rows wrote are the ones the forward computes."""
    model = llama(kernel)
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 97, (14,), generator=g).tolist()
    cfg = model.config
    k, v = (torch.zeros(cfg.n_layer, 8, 4, cfg.n_kv_head, cfg.head_dim) for _ in range(2))
    step = PagedDecoder(model, k, v, threads=2)
    blocks = [5, 2, 7, 0]  # scrambled, so a row that read the wrong block would differ
    expected = model(torch.tensor([tokens]))[0]  # (14, V)
    first = step.step_batch(tokens[:10], list(range(10)), [blocks] * 10).clone()  # (10, V)
    second = step.step_batch(tokens[10:13], [10, 11, 12], [blocks] * 3, want=[2]).clone()  # (1, V)
    last = step.step(tokens[13], 13, blocks)
    torch.testing.assert_close(first, expected[:10], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second[0], expected[12], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, expected[13], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"rows 0\.\.3 of logits asked of a batch of 3"):
        step.step_batch(tokens[:3], [0, 1, 2], [blocks] * 3, want=[0, 3])


@pytest.fixture(scope="module")
def smol_kept(smollm2_gguf):
    from gptstack.interop import gguf

    return gguf.gguf_model(*smollm2_gguf, keep_quantized=True)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["fp32", "Q4_1 kept"])
def test_smollm2_engine_native_step_equals_the_batched_path_and_the_forward_loop(smollm2, smol_kept, variant):
    model = smollm2 if variant == "fp32" else smol_kept
    prompts = [smollm2.tokenizer.encode("The capital of France is")]
    greedy = SamplingParams(temperature=0, max_tokens=32)
    expected = [list(generate(model, p, greedy)) for p in prompts]
    assert engine_run(model, prompts, greedy, True) == engine_run(model, prompts, greedy, False) == expected


@torch.no_grad()
def test_smollm2_engine_act_int8_is_deterministic_and_follows_the_int8_activation_forward(smol_kept, smollm2):
    """The engine's w8a8 step: greedy tokens the same on every run; teacher-forced over the paged pool, its top-1
    agrees with the forward under `int8_activations` as the contiguous step does."""
    tok = smollm2.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):")]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    runs = [engine_run(smol_kept, prompts, greedy, True, act_int8=True) for _ in range(2)]
    assert runs[0] == runs[1]
    cfg = smol_kept.config
    tokens = tok.encode(SMOL_TEXT)
    bs, nb = 16, -(-len(tokens) // 16) + 2
    k, v = (torch.zeros(cfg.n_layer, nb, bs, cfg.n_kv_head, cfg.head_dim) for _ in range(2))
    paged, table = PagedDecoder(smol_kept, k, v, threads=1, act_int8=True), list(range(nb))[::-1]
    native = torch.stack([paged.step(t, pos, table).clone() for pos, t in enumerate(tokens[:-1])])[3:]
    ref = teacher_forced(smol_kept, tokens, None)
    agree = (native.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.85, f"top-1 agreement {agree:.2f} over {len(ref)} positions"


@torch.no_grad()
@needs_a8_batched
def test_smollm2_act_int8_batched_steps_equal_each_row_alone(smol_kept, smollm2):
    """The w8a8 step batches (gemm_a8.c): prompt chunks and decode rows of three sequences in one step_batch call give
    each row's logits bit for bit as step() alone; and concurrent requests through the engine (max_seqs 4, every step
    native, several rows each) decode each request's greedy tokens exactly as it alone."""
    tok = smollm2.tokenizer
    cfg = smol_kept.config
    k, v = (torch.zeros(cfg.n_layer, 6, 16, cfg.n_kv_head, cfg.head_dim) for _ in range(2))
    paged = PagedDecoder(smol_kept, k, v, threads=2, act_int8=True)
    assert paged.batches
    seqs = [tok.encode(s) for s in ("The capital of France is", "def fibonacci(n):", "Water boils at")]
    tables = [[4, 1], [0, 5], [3, 2]]
    alone = [[paged.step(t, p, tb).clone() for p, t in enumerate(s)] for s, tb in zip(seqs, tables, strict=True)]
    rows = [(t, p, tb) for s, tb in zip(seqs, tables, strict=True) for p, t in enumerate(s[:-1])]  # prompt chunks
    first = paged.step_batch(*map(list, zip(*rows, strict=True))).clone()
    last = paged.step_batch([s[-1] for s in seqs], [len(s) - 1 for s in seqs], tables).clone()  # decode rows
    assert torch.equal(first, torch.stack([x for a in alone for x in a[:-1]]))
    assert torch.equal(last, torch.stack([a[-1] for a in alone]))
    prompts = [*seqs, tok.encode("Once upon a time")]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    one = engine_run(smol_kept, prompts, greedy, True, act_int8=True)
    engine = Engine(smol_kept, EngineConfig(kv_block_size=4, max_seqs=4, act_int8=True))
    assert [c.token_ids for c in engine.generate(prompts, greedy)] == one
    assert engine.stats["native_steps"] == engine.stats["steps"] < sum(map(len, one))


@torch.no_grad()
def test_smollm2_decode_layout_runs_natively_and_a_w4a8_self_draft_keeps_its_greedy_output(smollm2, smol_kept):
    """The fp32 decode layout (transforms.decode's DecodeLinear, what `gptstack generate` loads an fp32 model as)
    runs on the native step; the file kept at its Q4_1/Q8_0 codes, its step with int8 activations
    (`draft_act_int8`), drafts for it: the greedy tokens are plain decoding's, most proposals are accepted, the
    draft's steps are native w8a8 ones, and the draft reads the prompt in the prefill step (its first round starts
    caught up)."""
    from gptstack.checkpoint import load_model
    from gptstack.transforms.decode import decode_layout

    target = decode_layout(load_model(smollm2_file()))  # a fresh copy: the layout is applied in place
    prompt = smollm2.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    greedy = SamplingParams(temperature=0, max_tokens=24)
    plain = Engine(target, EngineConfig(kv_block_size=4))
    assert plain.native is not None, plain.native_off
    expected = plain.generate([prompt], greedy)[0].token_ids
    cfg = EngineConfig(kv_block_size=4, speculative="draft", num_speculative=4, draft_act_int8=True)
    engine = Engine(target, cfg, draft=smol_kept)
    assert engine.draft_native.act_int8 and engine.draft_native.batches
    engine.add_request(prompt, greedy)
    got = [t for out in engine.step() for t in out.token_ids]  # the prefill: the draft reads the prompt too
    assert engine.running[0].draft_computed == len(prompt) and engine.stats["draft_native_steps"] == 1
    while engine.has_unfinished():
        got += [t for out in engine.step() for t in out.token_ids]
    assert got == expected
    stats = engine.stats
    assert stats["spec_accepted"] > 0.7 * stats["spec_proposed"] > 0


def test_draft_act_int8_needs_a_draft_and_the_native_step():
    with pytest.raises(ValueError, match="draft_act_int8 needs the native step"):
        EngineConfig(draft_act_int8=True, speculative="draft", native=False)
    for mode in (None, "ngram"):
        with pytest.raises(ValueError, match=r"draft_act_int8 needs a draft model \(speculative='draft'\)"):
            Engine(llama("int4"), EngineConfig(draft_act_int8=True, speculative=mode))


def test_engine_act_int8_needs_the_native_step():
    with pytest.raises(ValueError, match="act_int8 needs the native step"):
        EngineConfig(native=False, act_int8=True)
    with pytest.raises(ValueError, match="act_int8 needs the native step"):
        Engine(llama("fp32").double(), EngineConfig(act_int8=True))
    engine = Engine(llama("fp32").double())  # float64: the batched path, and the reason
    assert engine.native is None and "fp32 on CPU" in engine.native_off
    assert Engine(llama("fp32"), EngineConfig(speculative="ngram")).native is not None  # verification rows batch
