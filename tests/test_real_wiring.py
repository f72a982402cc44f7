"""Real tokenizers through every stage: BOS where the model's tokenizer adds one (Gemma 3) in `generate`,
/v1/completions and evaluation, measured against transformers and lm-eval's HF backend on the real file;
reward training and PPO scoring the same ids (SmolLM2's ChatML); exact bytes per id for bits per byte;
`--tokenizer` taking a GGUF file or a checkpoint (`data prepare`, `init`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from cli_util import gptstack
from conftest import gemma3_file, need, smollm2_file

from gptstack.checkpoint import InitConfig, init_checkpoint, load_model, resolve_tokenizer
from gptstack.config import ModelConfig
from gptstack.data.shards import open_shards, read_manifest
from gptstack.eval.perplexity import perplexity
from gptstack.eval.scorer import Scorer, encode_pair, prefix_id
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.model import build_model
from gptstack.posttrain.reward import RewardModel, render
from gptstack.serve.app import create_app
from gptstack.serve.config import ServeConfig
from gptstack.tokenizer import byte_tokenizer, tokenizer_from_gguf
from gptstack.train.loop import token_byte_counts
from tests.serve_util import LiveServer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TEXT = (
    "The old lighthouse keeper climbed the stairs every evening at dusk. He trimmed the wick, polished the "
    "lens and watched the ships pass on the dark water until morning came."
)
PROMPT = "The capital of France is"
GREEDY = 12  # tokens of greedy continuation compared


# ---- SmolLM2's tokenizer (49,152 ids, ChatML, no BOS) -----------------------------------------------------
@pytest.fixture(scope="module")
def smol_meta(smollm2_gguf) -> dict:
    return smollm2_gguf[0]


@pytest.fixture(scope="module")
def smol_tok(smol_meta):
    return tokenizer_from_gguf(smol_meta)


def test_reward_ids_end_where_a_ppo_rollout_ends(smol_tok):
    """A ChatML rendering ends "<|im_end|>\\n"; the reward model must read its score at <|im_end|>, the
    stop token a PPO rollout ends with (the generation prompt's ids + the sampled reply)."""
    tok = smol_tok
    full = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])[0]
    assert tok.decode(full[-2:]) == "<|im_end|>\n"  # what render used to hand the reward model
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=1, n_head=2, n_embd=32)
    backbone = build_model(cfg, seed=0).eval()
    backbone.tokenizer = tok
    rm = RewardModel(backbone).eval()
    cases = [("What is 2 + 2?", "4."), ([{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Name a colour."}], "Blue, like the sea."), ("Say nothing.", "")]  # fmt: skip
    for prompt, reply in cases:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        rollout = tok.encode_chat(msgs, add_generation_prompt=True)[0] + tok.encode(reply) + [tok.end_of_turn_id]
        ids, mask = render(tok, prompt, reply)
        assert ids == rollout, (prompt, tok.decode(ids[-4:]), tok.decode(rollout[-4:]))
        assert ids[-1] in tok.stop_ids and mask[-1]
        assert sum(mask) == len(tok.encode(reply)) + 1  # the reply and its end-of-turn, nothing else
        with torch.no_grad():
            assert rm.score_texts([prompt] if isinstance(prompt, str) else [msgs], [reply]).item() == pytest.approx(
                rm([rollout]).item(), abs=1e-6
            )
    ours = byte_tokenizer()  # the built-in template ends at <|end|>: nothing to cut
    ids, _ = render(ours, "hi", "yo")
    assert ids == ours.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])[0]


def test_token_bytes_are_exact_for_every_id(smol_tok):
    tok = smol_tok
    counts = token_byte_counts(tok, tok.n_vocab + 64)  # a model vocabulary padded past the tokenizer's
    assert counts.shape == (tok.n_vocab + 64,) and counts[tok.n_vocab :].sum() == 0
    assert all(counts[i] == 0 for i in tok.special_ids)
    text = "Bits per byte: naïve café, 東京, 🦙\n\n\tdone  "
    assert counts[tok.encode(text)].sum() == len(text.encode())
    bt = byte_tokenizer()
    assert token_byte_counts(bt, bt.n_vocab)[:256].eq(1).all() and token_byte_counts(bt, bt.n_vocab)[256:].sum() == 0


def test_a_tokenizer_with_bos_prefixes_prompts_and_eval_contexts(smol_meta, smol_tok):
    """SmolLM2's vocabulary told to add its BOS (<|im_start|>, id 1): what Gemma's tokenizer does."""
    tok = tokenizer_from_gguf({**smol_meta, "tokenizer.ggml.add_bos_token": True})
    bos = tok.bos_id
    assert tok.bos_prefix == [bos] and smol_tok.bos_prefix == []
    assert tok.encode_prompt("Hello") == [bos, *tok.encode("Hello")]
    assert tok.encode_prompt("<|im_start|>Hi", allow_special=True) == tok.encode("<|im_start|>Hi", True)  # not twice
    assert tok.encode_prompt("") == [bos] and smol_tok.encode_prompt("") == []
    ctx, cont = encode_pair(tok, "Question: why? Answer:", " Because.")
    assert ctx == [bos, *tok.encode("Question: why? Answer:")] and ctx[1:] + cont == tok.encode(
        "Question: why? Answer: Because."
    )
    assert encode_pair(tok, "", "Hi") == ([bos], tok.encode("Hi"))
    assert encode_pair(smol_tok, "", "Hi") == ([smol_tok.eot_id], smol_tok.encode("Hi"))
    assert (prefix_id(tok), prefix_id(smol_tok)) == (bos, smol_tok.eot_id)


@pytest.mark.slow
def test_data_prepare_and_init_take_a_gguf_file_as_the_tokenizer(smol_tok, tmp_path):
    docs = {"a.txt": "Hello world, this is a short document.\n", "b.txt": "Another one: naïve café 東京 🦙.\n",
            "c.md": "# Title\n\nSome *markdown* text with numbers 12345.\n"}  # fmt: skip
    (tmp_path / "in").mkdir()
    for name, text in docs.items():
        (tmp_path / "in" / name).write_text(text)
    off = json.dumps({k: False for k in ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb")})
    shards = tmp_path / "shards"
    gptstack("data", "prepare", "--input", tmp_path / "in", "--out", shards, "--tokenizer", smollm2_file(),
             "--filters", off, "--dedup", "none", "--no-pii", "--val-fraction", "0", "--workers", "2")  # fmt: skip
    manifest = read_manifest(shards)
    assert manifest["tokenizer"]["n_vocab"] == 49152 and manifest["tokenizer"]["eot_id"] == smol_tok.eot_id
    tokens = np.concatenate(open_shards(shards, "train"))
    ends = np.flatnonzero(tokens == smol_tok.eot_id)  # each document is followed by EOS
    got = sorted(tokens[a + 1 : b].tolist() for a, b in zip([-1, *ends[:-1]], ends, strict=True))
    assert ends[-1] == len(tokens) - 1 and got == sorted(smol_tok.encode(t) for t in docs.values())  # the model's ids
    saved = resolve_tokenizer(shards / "tokenizer")
    assert saved.encode(docs["b.txt"]) == smol_tok.encode(docs["b.txt"])
    assert saved.chat_template == smol_tok.chat_template
    path, _ = init_checkpoint(InitConfig(model="tiny", out=str(tmp_path / "ckpt"), tokenizer=str(smollm2_file()),
                                         overrides={"n_layer": 1}))  # fmt: skip
    model = load_model(path)
    assert model.config.vocab_size == 49152 and model.tokenizer.encode(TEXT) == smol_tok.encode(TEXT)
    assert resolve_tokenizer(path).stop_ids == smol_tok.stop_ids  # a checkpoint names its tokenizer too


# ---- Gemma 3 270M: BOS through generate, serve and eval, against transformers ----------------------------
@pytest.fixture(scope="module")
def gemma_generate():
    """A running `gptstack generate` on the Gemma file, started before the session's models load."""
    cmd = [sys.executable, "-m", "gptstack.cli", "generate", str(gemma3_file()), "--prompt", PROMPT,
           "--temperature", "0", "--max-tokens", str(GREEDY)]  # fmt: skip
    generate = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    yield generate
    if generate.poll() is None:  # the test that reads it did not run
        generate.kill()
        generate.communicate()


@pytest.fixture(scope="module")
def gemma(gemma_generate, gemma3, gemma3_hf, gemma3_hf_tokenizer):
    """(our model, transformers' model, transformers' tokenizer, the running `gptstack generate`)."""
    return gemma3, gemma3_hf, gemma3_hf_tokenizer, gemma_generate


def hf_logprobs(hf, ids: list[int]) -> list[float]:
    """log p of ids[1:], each from the ids before it."""
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `ids`: n tokens, none of them EOS (which would end ours)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    new = out[0, len(ids) :].tolist()
    assert len(new) == n, f"transformers stopped after {len(new)} tokens; pick another prompt"
    return new


@pytest.mark.slow
def test_gemma_perplexity_and_logliks_equal_transformers_with_bos(gemma):
    ours, hf, hf_tok, _ = gemma
    tok = ours.tokenizer
    theirs_ids = hf_tok(TEXT).input_ids
    assert theirs_ids == [tok.bos_id, *tok.encode(TEXT)]  # transformers' tokenizer adds BOS: so do we
    want = hf_logprobs(hf, theirs_ids)
    scorer = Scorer(ours, tok)
    got = scorer.loglikelihood_rolling_batch([tok.encode(TEXT)])[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    ppl = perplexity(scorer, [TEXT])
    assert ppl["tokens"] == len(want) and ppl["perplexity"] == pytest.approx(math.exp(-np.mean(want)), rel=1e-4)
    without_bos = hf_logprobs(hf, tok.encode(TEXT))
    assert -np.mean(without_bos) > -np.mean(want) + 0.5  # BOS matters: the test would catch its absence
    context, continuation = "The old lighthouse keeper climbed the stairs every", " evening at dusk."
    ctx, cont = encode_pair(tok, context, continuation)
    whole = hf_tok(context + continuation).input_ids
    assert ctx + cont == whole
    (ll, _), (empty_ll, _) = scorer.loglikelihood([(ctx, cont), encode_pair(tok, "", TEXT)])
    assert ll == pytest.approx(sum(hf_logprobs(hf, whole)[len(ctx) - 1 :]), abs=1e-4 * len(cont))
    assert empty_ll == pytest.approx(sum(want), abs=1e-4 * len(want))  # an empty context is BOS


@pytest.mark.slow
def test_gemma_lm_eval_adapter_equals_lm_eval_hf_backend(gemma):
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        need(False, "the lm-eval package")
    from gptstack.eval.lm_eval_adapter import GPTStackLM

    ours, hf, hf_tok, _ = gemma
    pairs = [("The old lighthouse keeper climbed the", " stairs"), ("Paris is the capital of ", "France."),
             ("", "The old lighthouse keeper")]  # fmt: skip
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    theirs = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    got = GPTStackLM(scorer=Scorer(ours, ours.tokenizer)).loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb), p in zip(got, theirs, pairs, strict=True):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb, (p, a, b)


@pytest.mark.slow
def test_gptstack_generate_on_gemma_gives_transformers_greedy_continuation(gemma):
    _, hf, hf_tok, generate = gemma
    ids = hf_tok(PROMPT).input_ids
    new = hf_greedy(hf, ids, GREEDY)
    assert new != hf_greedy(hf, ids[1:], GREEDY)  # without BOS the model says something else
    stdout, stderr = generate.communicate(timeout=300)
    assert generate.returncode == 0, stderr
    assert stdout == PROMPT + hf_tok.decode(new) + "\n"


@pytest.mark.slow
def test_serve_completions_text_prompt_on_gemma_starts_with_bos(gemma):
    ours, hf, hf_tok, _ = gemma
    ids = hf_tok(PROMPT).input_ids
    new = hf_greedy(hf, ids, GREEDY)
    engine = Engine(ours, EngineConfig(max_seqs=2), tokenizer=ours.tokenizer)
    with LiveServer(create_app({"gemma": engine}, ServeConfig(exact_cache=False))) as server:
        body = {"model": "gemma", "prompt": PROMPT, "temperature": 0, "max_tokens": GREEDY}
        text = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
        body_ids = {**body, "prompt": ids[1:]}  # token ids are taken as given: no BOS added
        as_ids = httpx.post(f"{server.url}/v1/completions", json=body_ids, timeout=120).json()
    assert text["choices"][0]["text"] == hf_tok.decode(new)
    assert text["usage"]["prompt_tokens"] == len(ids) and as_ids["usage"]["prompt_tokens"] == len(ids) - 1
    assert as_ids["choices"][0]["text"] == hf_tok.decode(hf_greedy(hf, ids[1:], GREEDY))


@pytest.mark.slow
def test_gemma_token_bytes_count_ids_the_ranks_table_drops(gemma):
    tok = gemma[0].tokenizer
    start = time.perf_counter()
    counts = token_byte_counts(tok, tok.n_vocab)
    seconds = time.perf_counter() - start
    assert seconds < 5, f"{seconds:.1f} s for {tok.n_vocab:,} ids"
    dropped = [i for i in range(tok.n_vocab) if i not in tok.special_ids and tok.ranks.get(tok.decode_bytes([i])) != i]
    assert dropped and all(counts[i] == len(tok.decode_bytes([i])) > 0 for i in dropped)
    text = "Line one\n\n\n    indented 🦙 naïve 東京\t\tend"  # newline and space runs are Gemma's added tokens
    assert counts[tok.encode(text)].sum() == len(text.encode())


def test_gptstack_generate_with_the_file_as_its_own_w4a8_draft_prints_the_plain_greedy_text():
    """`--speculative FILE --draft-keep-quantized --draft-act-int8`: the fp32 SmolLM2 drafted by the same file at its
    Q4_1/Q8_0 codes with int8 activations prints plain greedy decoding's text and nearly every draft accepted."""
    path = str(smollm2_file())
    args = ["--prompt", "The capital of France is", "--max-tokens", "24", "--temperature", "0"]
    plain = gptstack("generate", path, *args)
    spec = gptstack("generate", path, *args, "--speculative", path, "--draft-keep-quantized", "--draft-act-int8")
    assert spec.stdout == plain.stdout and len(plain.stdout) > len("The capital of France is") + 10
    accepted = int(spec.stderr.split("% of drafts accepted")[0].rsplit(" ", 1)[-1])
    assert accepted >= 70, spec.stderr
