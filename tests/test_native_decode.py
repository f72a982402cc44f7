"""Native batch-1 decoding (issue 20, infer/native.py over transforms/csrc/decode.c): each of the step's linear
kernels equals its PyTorch definition in transforms/kernels.py; the whole step's logits equal the PyTorch
forward's; greedy tokens equal the plain forward loop for fp32, int8, int4 and a Q8_0 token table with its tied
head; models the step cannot run are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, scramble

from gptstack.infer.generate import generate
from gptstack.infer.kvcache import KVCache
from gptstack.infer.native import NativeDecoder, linear, supports
from gptstack.infer.sampling import SamplingParams
from gptstack.model import build_model
from gptstack.transforms import kernels
from gptstack.transforms.quantize import QuantizedEmbedding, QuantizedLinear, TiedHead, quantize


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
