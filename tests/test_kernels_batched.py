"""Batched decode (issue 20): the register-tiled kernels of csrc/gemm.c equal their PyTorch definitions for every
row count and ragged shape; the paged decode-attention kernel equals gather + SDPA; batched sampling draws the
same tokens as per-row sampling for the same seeds; and the engine's greedy output under continuous batching,
with every kernel (fp32, int8, int4), equals the plain forward loop run through the PyTorch definitions."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, scramble

from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.generate import generate
from gptstack.infer.sampling import Sampler, SamplingParams, sample_rows
from gptstack.model import attend, build_model
from gptstack.transforms import kernels
from gptstack.transforms.decode import decode_layout
from gptstack.transforms.quantize import QuantizedLinear, quantize


@torch.no_grad()
@pytest.mark.parametrize("method", ["fp32", "int8", "int8g", "int4"])
def test_tiled_kernels_equal_their_definitions_at_every_row_count(method):
    assert kernels.gemm_library() is not None, "gcc could not build csrc/gemm.c"
    g = torch.Generator().manual_seed(0)
    K = 100 if method in ("fp32", "int8") else 96  # K % 8 != 0 exercises the tail; int4/int8g need K % 32 == 0
    N = 37  # not a multiple of any tile width
    lin = torch.nn.Linear(K, N)
    lin.weight.copy_(torch.randn(N, K, generator=g))
    for M in (2, 5, 7, 13, kernels.SMALL_M):
        x = torch.randn(M, K, generator=g)
        if method == "fp32":
            got, ref = kernels.gemm(x, lin.weight), x @ lin.weight.t()
        elif method == "int8g":
            q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
            scales = torch.rand(N, K // 32, generator=g)
            got, ref = kernels.gemm_int8g(x, q, scales), kernels.gemm_int8g_ref(x, q, scales)
        else:
            ql = QuantizedLinear.from_linear(lin, method, 32)
            args = (ql.qweight, ql.scales) if method == "int8" else (ql.qweight, ql.scales, ql.mins)
            got = getattr(kernels, f"gemm_{method}")(x, *args)
            ref = getattr(kernels, f"gemv_{method}_ref")(x, *args)
            torch.testing.assert_close(ref, x @ ql.dequantize().t(), atol=1e-3, rtol=1e-5)
        assert got.shape == (M, N)
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("window", [None, 3])
def test_paged_decode_attention_equals_gather_and_sdpa(window):
    g = torch.Generator().manual_seed(0)
    nb, bs, kv, hd, h = 20, 4, 2, 16, 6  # GQA: 3 query heads per kv head
    k, v = torch.randn(nb, bs, kv, hd, generator=g), torch.randn(nb, bs, kv, hd, generator=g)
    lens = torch.tensor([1, 5, 13, 16])
    table = torch.tensor([[3, 0, 0, 0], [7, 2, 0, 0], [1, 4, 9, 11], [5, 6, 8, 10]])
    q = torch.randn(4, h, hd, generator=g)
    got = kernels.paged_decode_attention(q, k, v, table, lens, window, 0.3)
    keys, vals = (p[table].view(4, -1, kv, hd).transpose(1, 2) for p in (k, v))  # (B, kv, 16, hd)
    j = torch.arange(16)[None]
    mask = j < lens[:, None]
    if window is not None:
        mask &= lens[:, None] - 1 - j < window
    ref = attend(q[:, :, None], keys, vals, mask[:, None, None], scale=0.3)[:, :, 0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert kernels.paged_decode_attention(q.double(), k.double(), v.double(), table, lens, window, 0.3) is None


def test_batched_sampling_draws_what_each_row_draws_alone():
    V = 300
    logits = torch.randn(9, V, generator=torch.Generator().manual_seed(0)) * 3
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=1.0, seed=2),
        SamplingParams(temperature=0.7, top_k=20, seed=3),
        SamplingParams(temperature=0.7, top_k=20, seed=4),
        SamplingParams(temperature=1.1, top_p=0.8, min_p=0.01, seed=5),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=6),  # penalised: sampled alone
        SamplingParams(temperature=0, presence_penalty=0.5, seed=7),
    ]
    prompt = [1, 2, 3]
    for _ in range(3):  # successive draws keep each generator in step
        alone = [Sampler(p, prompt, V, "cpu") for p in params]
        together = [Sampler(p, prompt, V, "cpu") for p in params]
        for step in range(4):
            expected = [s.sample(row) for s, row in zip(alone, logits + step, strict=True)]
            assert sample_rows(together, logits + step) == expected
        logits = logits.roll(7, dims=1)


def fp32_model(name: str):
    return scramble(build_model(VARIANTS[name], seed=0), seed=0).eval()


@torch.no_grad()
@pytest.mark.parametrize("kernel", ["fp32", "int8", "int4"])
def test_batched_greedy_with_every_kernel_equals_the_forward_loop(kernel):
    model = fp32_model("llama-gqa")
    model = decode_layout(model) if kernel == "fp32" else quantize(model, kernel, 32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (8,), generator=g)]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    kernels.ENABLED = False  # the reference: the plain forward loop through the PyTorch definitions
    try:
        expected = [list(generate(model, p, greedy)) for p in prompts]
    finally:
        kernels.ENABLED = True
    for max_seqs in (1, 3, 8):  # one at a time, ragged batches, all at once
        engine = Engine(model, EngineConfig(kv_block_size=4, max_seqs=max_seqs))
        assert [c.token_ids for c in engine.generate(prompts, greedy)] == expected, max_seqs
