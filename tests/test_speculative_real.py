"""Speculative decoding on real text: SmolLM2-135M-Instruct answering a question about a real passage
(a BoolQ item). Prompt lookup and a draft model must give exactly plain greedy decoding's tokens; the
greedy argmax rule (speculative.accept_greedy) is checked against the general rejection rule."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_file

from gptstack.config import ModelConfig
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.infer.speculative import accept, accept_greedy
from gptstack.model import build_model

INSTRUCTION = "Answer the question in one or two sentences, quoting the passage."


def test_accept_greedy_is_the_rejection_rule_with_one_hot_distributions():
    V, g = 10, torch.Generator().manual_seed(0)
    for draft, targets in [([1, 2, 3], [1, 2, 3, 4]), ([1, 2, 3], [1, 5, 3, 4]), ([7], [2, 9]), ([], [6])]:
        p = torch.zeros(len(targets), V).scatter_(1, torch.tensor(targets)[:, None], 1.0)  # (k+1, V) one-hot
        assert accept_greedy(draft, targets) == accept(draft, None, p, g)
    assert accept_greedy([1, 2, 3], [1, 5, 3, 4]) == ([1, 5], 1)  # the prefix, then the target's correction


def passage_prompt(tok, chars: int = 300) -> list[int]:
    rec = json.loads(shared_file("eval/boolq.jsonl").open().readline())
    passage, question = rec["query"].split("\nQuestion:")
    text = f"{passage[:chars]}\nQuestion:{question}\n{INSTRUCTION}"
    ids, _ = tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    return ids


@pytest.mark.slow  # ~5-10 s on 2 cores: 3 prefills and 3 x 12 tokens of SmolLM2
def test_prompt_lookup_and_a_draft_keep_smollm2_greedy_output_on_a_passage(smollm2):
    tok = smollm2.tokenizer
    prompt = passage_prompt(tok)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    c = smollm2.config  # a 1-layer random draft sharing the vocabulary: mostly wrong, never harmful
    draft_cfg = ModelConfig(vocab_size=c.vocab_size, block_size=c.block_size, n_layer=1, n_head=2, n_kv_head=1,
                            n_embd=32, d_ff=64, mlp="swiglu", norm="rmsnorm", pos="rope", bias=False)  # fmt: skip
    draft = build_model(draft_cfg, seed=0).eval()
    base = dict(max_seqs=1, kv_memory="64MiB", num_speculative=4)
    plain = Engine(smollm2, EngineConfig(**base), tokenizer=tok).generate([prompt], params)[0].token_ids
    lookup = Engine(smollm2, EngineConfig(**base, speculative="ngram"), tokenizer=tok)
    drafted = Engine(smollm2, EngineConfig(**base, speculative="draft"), tokenizer=tok, draft=draft)
    assert lookup.generate([prompt], params)[0].token_ids == plain
    assert drafted.generate([prompt], params)[0].token_ids == plain
    assert lookup.stats["spec_proposed"] > 0 and drafted.stats["spec_proposed"] > 0
    assert len(plain) == 12 and tok.decode(plain).strip()  # a real answer, not stop tokens


def test_draft_confidence_shortens_rounds_and_keeps_greedy_output():
    """A draft that stops below a top probability proposes fewer tokens, the output unchanged."""
    cfg = ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, mlp="swiglu",
                      norm="rmsnorm", pos="rope", bias=False)  # fmt: skip
    target, draft = build_model(cfg, seed=0).eval(), build_model(cfg.replace(n_layer=1), seed=1).eval()
    ps = [[1, 2, 3, 4, 5] * 2, [7, 8, 9]]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    plain = [c.token_ids for c in Engine(target, EngineConfig(max_seqs=2)).generate(ps, params)]
    proposed = {}
    for floor in (0.0, 0.05):
        spec = EngineConfig(max_seqs=2, speculative="draft", num_speculative=4, draft_confidence=floor)
        engine = Engine(target, spec, draft=draft)
        assert [c.token_ids for c in engine.generate(ps, params)] == plain
        proposed[floor] = engine.stats["spec_proposed"]
    assert 0 <= proposed[0.05] < proposed[0.0]
    sampled = Engine(target, EngineConfig(speculative="draft", draft_confidence=0.05), draft=draft)
    done = sampled.generate(ps, SamplingParams(max_tokens=16, temperature=1.0, seed=0))
    assert [len(c.token_ids) for c in done] == [16, 16]
    with pytest.raises(ValueError, match="draft_confidence"):
        EngineConfig(draft_confidence=1.0)
