"""Draft distillation (posttrain/distill.py): the teacher's greedy answers train a tiny draft that then
speeds nothing up wrongly: speculative output stays identical, and the draft agrees with the teacher far
more often than before training."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gptstack.checkpoint import load_model
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.posttrain.distill import (
    DistillConfig,
    build_draft,
    cached_answers,
    chat_prompt,
    distill,
    make_batch,
    projected_embedding,
    read_prompts,
)

SMALL = dict(n_layer=1, n_embd=64, n_head=2, n_kv_head=1, d_ff=64, answer_tokens=24, teacher_batch=8)


def test_projected_embedding_keeps_the_principal_directions():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 16, generator=g)
    E = (torch.randn(200, 3, generator=g) * torch.tensor([5.0, 3.0, 2.0])) @ basis  # rank 3
    E = E + 0.01 * torch.randn(200, 16, generator=g)
    P = projected_embedding(E, 3, std=0.05)
    assert P.shape == (200, 3) and abs(float(P.std()) - 0.05) < 1e-3
    # distances between tokens survive the projection up to the scale: nothing but noise was dropped
    d_full, d_proj = torch.cdist(E - E.mean(0), E - E.mean(0)), torch.cdist(P, P)
    assert torch.corrcoef(torch.stack([d_full.flatten(), d_proj.flatten()]))[0, 1] > 0.999


def test_make_batch_scores_every_answer_position_and_a_share_of_the_prompt():
    rows = [([1, 2, 3, 4], [5, 6]), ([7, 8], [9, 10, 11])]
    idx, where, targets = make_batch(rows, share=0.0, rng=random.Random(0))
    assert idx.shape == (2, 5)
    # position t predicts token t+1: the last prompt token and every answer token but the last
    assert where.tolist() == [3, 4, 6, 7, 8] and targets.tolist() == [5, 6, 9, 10, 11]
    _, where_all, targets_all = make_batch(rows, share=1.0, rng=random.Random(0))
    assert targets_all.tolist() == [2, 3, 4, 5, 6, 8, 9, 10, 11] and idx.flatten()[where_all].tolist()[0] == 1


def test_bad_config_and_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="prompt_share"):
        DistillConfig(teacher="t", data="d", out="o", prompt_share=1.5)
    with pytest.raises(ValueError, match="n_embd"):
        DistillConfig(teacher="t", data="d", out="o", n_embd=30, n_head=4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_prompts(bad, 4)
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.jsonl", 4)


def test_teacher_answers_cache_is_used_only_for_the_same_prompts(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"prompt": [1, 2], "answer": [3, 4], "tokens": 8}) + "\n")
    assert cached_answers(str(path), [[1, 2]], 8) == [[3, 4]]
    assert cached_answers(str(path), [[1, 5]], 8) is None  # other prompts: the teacher answers again
    assert cached_answers(str(path), [[1, 2]], 16) is None  # another answer length
    assert cached_answers(None, [[1, 2]], 8) is None and cached_answers(str(tmp_path / "no"), [[1, 2]], 8) is None


def agreement(engine: Engine, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    done = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0))
    return engine.acceptance_rate, [c.token_ids for c in done]


@pytest.mark.slow  # 3-7 s (40 training steps, three engines), plus the shared trained_run fixture
def test_distilled_draft_agrees_with_its_teacher_and_keeps_greedy_output(trained_run, tmp_path):
    """The Shakespeare byte model answers 8 prompts; a 1-layer draft trained 40 steps on those answers
    is accepted far more often than the same draft untrained, and outputs equal plain decoding."""
    text = trained_run.held_out.decode(errors="ignore")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": text[i * 200 : i * 200 + 64]}) + "\n" for i in range(8)))
    cfg = DistillConfig(teacher=str(trained_run.checkpoint), data=str(data), out=str(tmp_path / "draft"), items=8,
                        steps=40, batch_size=8, lr=1e-2, **SMALL)  # fmt: skip
    summary = distill(cfg)
    assert summary["loss_last"] < summary["loss_first"] - 1.0
    teacher = load_model(trained_run.checkpoint)
    tok = teacher.tokenizer
    prompts = [chat_prompt(tok, t) for t in read_prompts(data, 8)]
    draft = load_model(cfg.out, tokenizer=tok)
    assert draft.config.vocab_size == teacher.config.vocab_size and draft.config.tie_embeddings
    plain = Engine(teacher, EngineConfig(max_seqs=8), tokenizer=tok).generate(
        prompts, SamplingParams(max_tokens=24, temperature=0.0)
    )
    spec = EngineConfig(max_seqs=1, speculative="draft", num_speculative=3)
    trained_rate, trained_out = agreement(Engine(teacher, spec, tokenizer=tok, draft=draft), prompts, 24)
    assert trained_out == [c.token_ids for c in plain]
    untrained = build_draft(teacher, cfg).eval()
    untrained_rate, untrained_out = agreement(Engine(teacher, spec, tokenizer=tok, draft=untrained), prompts, 24)
    assert untrained_out == trained_out
    assert trained_rate > 0.5 and trained_rate > untrained_rate + 0.3, (trained_rate, untrained_rate)


@torch.no_grad()
def test_a_truncated_teacher_draft_starts_from_its_first_blocks_with_the_table_frozen():
    """init_layers: the draft is the teacher's first blocks, final norm and tied table; only the blocks and norms
    train; a teacher it cannot truncate is refused."""
    from dataclasses import replace

    from conftest import VARIANTS

    from gptstack.model import build_model

    teacher = build_model(replace(VARIANTS["llama-gqa"], n_layer=3, tie_embeddings=True), seed=1).eval()
    cfg = DistillConfig(teacher="t", data="d", out="o", init_layers=2)
    draft = build_draft(teacher, cfg).eval()
    assert draft.config.n_layer == 2 and draft.config.n_embd == teacher.config.n_embd
    for name, value in draft.state_dict().items():
        assert torch.equal(value, teacher.state_dict()[name]), name
    assert not draft.transformer.wte.weight.requires_grad and draft.transformer.h[0].mlp.c_fc.weight.requires_grad
    with pytest.raises(ValueError, match="init_layers must be in"):
        build_draft(teacher, DistillConfig(teacher="t", data="d", out="o", init_layers=3))
    with pytest.raises(ValueError, match="tied"):
        build_draft(build_model(replace(VARIANTS["llama-gqa"], n_layer=3), seed=1), cfg)
    with pytest.raises(ValueError, match="init_layers must be >= 0"):
        DistillConfig(teacher="t", data="d", out="o", init_layers=-1)
