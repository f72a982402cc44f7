"""Post-training: SFT, LoRA, reward models, DPO, PPO and GPT-1 fine-tuning, on tiny real models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gptstack.checkpoint import load_model, save_checkpoint
from gptstack.cli import main
from gptstack.config import ModelConfig
from gptstack.model import build_model
from gptstack.posttrain import demo
from gptstack.posttrain.common import DataError, StageConfig, StageRun, accumulate, optimize, split
from gptstack.posttrain.dpo import DPOConfig, attach_reference, dpo, dpo_losses, pair_logprobs
from gptstack.posttrain.finetune import Example, FinetuneConfig, GPT1Classifier, finetune, load_classifier, special_ids
from gptstack.posttrain.ppo import KLController, PPOConfig, PPOTrainer, gae, ppo
from gptstack.posttrain.reward import RewardConfig, build_reward, load_reward_model, parse_pair, train_reward
from gptstack.posttrain.sft import SFTConfig, collate, encode_example, pack, sft, sft_loss
from gptstack.tokenizer import byte_tokenizer
from gptstack.transforms.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter, unmerge_lora

TOK = byte_tokenizer()


def tiny(block: int = 96, seed: int = 0, **kw):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=320, block_size=block, pos="rope", **kw)
    m = build_model(cfg, seed=seed)
    m.tokenizer = TOK
    return m


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def params_digest(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny model SFT-trained on the demo task (the starting point of the later stages)."""
    root = tmp_path_factory.mktemp("pt")
    save_checkpoint(tiny(), root / "init", tokenizer=TOK)
    data = write_jsonl(root / "sft.jsonl", demo.sft_rows(1200, seed=0))
    summary = sft(
        SFTConfig(init=str(root / "init"), data=str(data), out=str(root), lr=3e-3, batch_size=16, epochs=2,
                  warmup_steps=5, progress=False)
    )  # fmt: skip
    return root, summary


# ---- SFT -----------------------------------------------------------------------------------------


def test_sft_loss_is_on_assistant_tokens_only():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}  # fmt: skip
    inp, tgt = encode_example(TOK, row, 100)
    learned = TOK.decode_bytes([t for t in tgt if t >= 0 and t < 256])
    assert learned == b"yook"
    end = TOK.special_tokens["<|end|>"]
    assert sum(t == end for t in tgt) == 2  # each assistant turn's <|end|> is a target
    assert sum(t >= 0 for t in tgt) == 6
    assert len(inp) == len(tgt)


def test_packing_matches_unpacked_loss():
    model = tiny().eval()
    rows = demo.sft_rows(6, seed=3)
    examples = [encode_example(TOK, r, 96) for r in rows]
    packed = pack(examples, 96)
    assert len(packed) < len(examples)  # several conversations share a row
    with torch.no_grad():
        loss_p, n_p, _ = sft_loss(model, packed)
        loss_u, n_u, _ = sft_loss(model, pack(examples, 96, pack=False))
    assert n_p == n_u
    assert loss_p.item() == pytest.approx(loss_u.item(), rel=1e-5)
    _idx, _tgt, seg = collate(packed, "cpu")
    assert seg[0].unique().numel() >= 2


def test_sft_learns_to_stop_and_checkpoint_loads_everywhere(sft_run):
    root, summary = sft_run
    assert summary["eval_stop_rate"] == 1.0  # the learned <|end|> ends every greedy reply
    assert summary["eval_loss"] < 2.5  # from ln(320) = 5.8 at init
    log = [json.loads(line) for line in (root / "sft" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    from gptstack.eval.scorer import Scorer
    from gptstack.infer.load import LoadConfig, load_engine

    engine = load_engine(LoadConfig(str(root / "sft")))
    prompt = TOK.encode_chat([{"role": "user", "content": demo.PROMPT.format(n=42)}], add_generation_prompt=True)[0]
    from gptstack.infer.sampling import SamplingParams

    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=32))[0]
    assert out.finish_reason == "stop"
    m = load_model(root / "sft")
    assert Scorer(m, m.tokenizer).loglikelihood([(TOK.encode("Write"), TOK.encode(" a"))])[0][0] < 0
    assert "## sft" in (root / "report.md").read_text()


def test_sft_bad_rows_are_skipped_and_counted(tmp_path):
    save_checkpoint(tiny(block=64), tmp_path / "init", tokenizer=TOK)
    bad_rows = [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"prompt": "p", "response": "x" * 200},
        {"foo": 1},
    ]
    rows = [*demo.sft_rows(40, seed=1), *bad_rows]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    s = sft(SFTConfig(init=str(tmp_path / "init"), data=str(data), out=str(tmp_path), max_steps=1, progress=False))
    assert s["skipped: no assistant turn"] == 1
    assert s["skipped: longer than the context"] == 1
    assert s["skipped"] == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(rows[0]), "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        sft(SFTConfig(init=str(tmp_path / "init"), data=str(bad), out=str(tmp_path), progress=False))


def grads_after(model, items, micro, loss_fn) -> list[torch.Tensor]:
    params = list(model.parameters())
    accumulate(params, items, micro, loss_fn)
    return [p.grad.clone() for p in params]


def test_grad_accumulation_equals_full_batch(tmp_path):
    rows = pack([encode_example(TOK, r, 96) for r in demo.sft_rows(8, seed=2)], 96, pack=False)
    model = tiny(seed=1)
    full = grads_after(model, rows, 8, lambda b: sft_loss(model, b))
    model.zero_grad(set_to_none=True)
    accumulated = grads_after(model, rows, 2, lambda b: sft_loss(model, b))
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(full, accumulated, strict=True))
    # and optimize() reports the same batch loss whichever the micro-batch size
    results = []
    for micro in (0, 2):
        m = tiny(seed=1)
        cfg = StageConfig(out=str(tmp_path / str(micro)), batch_size=8, micro_batch_size=micro, max_steps=1, lr=1e-3,
                          progress=False)  # fmt: skip
        run = StageRun(cfg, "sft", m)
        optimize(m, rows, lambda b, m=m: sft_loss(m, b), run)
        results.append(run.records[0]["loss"])
    assert results[0] == pytest.approx(results[1], rel=1e-6)


# ---- LoRA ------------------------------------------------------------------------------------------


def test_lora_merge_unmerge_and_adapter_alone(tmp_path):
    model = tiny().eval()
    x = torch.randint(0, 256, (2, 20))
    base_out = model(x).detach()
    base_weights = params_digest(model)
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(wrapped) == 2 * 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in each of 2 layers
    assert torch.allclose(model(x), base_out)  # B = 0: starts at the base model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    unmerged = model(x).detach()
    assert not torch.allclose(unmerged, base_out, atol=1e-4)
    merge_lora(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    frozen = [p for n, p in model.named_parameters() if ".lora_" not in n]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(frozen, base_weights, strict=True))
    folder = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert (folder / "adapter.safetensors").stat().st_size < 0.2 * sum(p.numel() * 4 for p in base_weights)
    fresh = tiny().eval()
    load_adapter(fresh, folder)
    torch.testing.assert_close(fresh(x), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"match no nn\.Linear"):
        apply_lora(tiny(), LoRAConfig(targets=("nope",)))


def test_sft_with_lora_saves_merged_checkpoint_and_adapter(tmp_path):
    save_checkpoint(tiny(), tmp_path / "init", tokenizer=TOK)
    data = write_jsonl(tmp_path / "d.jsonl", demo.sft_rows(64, seed=4))
    sft(SFTConfig(init=str(tmp_path / "init"), data=str(data), out=str(tmp_path), lr=1e-2, max_steps=3, batch_size=8,
                  lora_rank=4, progress=False))  # fmt: skip
    merged = load_model(tmp_path / "sft")  # a plain checkpoint: the adapters are folded in
    adapted = load_model(tmp_path / "init")
    load_adapter(adapted, tmp_path / "sft" / "adapter")
    x = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged(x), load_model(tmp_path / "init")(x), atol=1e-4)


# ---- reward models -----------------------------------------------------------------------------------


def test_reward_model_separates_separable_pairs(tmp_path):
    save_checkpoint(tiny(), tmp_path / "init", tokenizer=TOK)
    rows = []
    for i in range(240):
        word = f"w{i % 37}"
        rows.append({"prompt": f"say {word}", "chosen": f"{word} good", "rejected": f"{word} bad"})
    rows += [{"prompt": "x", "chosen": "same", "rejected": "same"}, {"prompt": "x", "chosen": "a"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    s = train_reward(RewardConfig(init=str(tmp_path / "init"), data=str(data), out=str(tmp_path), lr=3e-3,
                                  batch_size=16, epochs=2, eval_fraction=0.2, progress=False))  # fmt: skip
    assert s["eval_acc"] >= 0.98
    assert s["skipped: equal responses"] == 1 and s["skipped: missing response"] == 1
    rm = load_reward_model(tmp_path / "reward")
    good = rm.score_texts(["say w1", "say w2"], ["w1 good", "w2 good"])
    bad = rm.score_texts(["say w1", "say w2"], ["w1 bad", "w2 bad"])
    assert (good > bad).all()
    rule = "rule:gptstack.posttrain.demo:judge"
    r = build_reward(f"0.5*rm:{tmp_path / 'reward'}+2*{rule}")
    prompts, responses = ["Write a Python expression equal to 12."] * 2, ["6*2", "oops"]
    ids = [TOK.encode_chat([{"role": "user", "content": p}, {"role": "assistant", "content": q}])[0]
           for p, q in zip(prompts, responses, strict=True)]  # fmt: skip
    total, parts = r(prompts, responses, ids)
    rm_scores = rm(ids)
    torch.testing.assert_close(total, 0.5 * rm_scores + 2 * torch.tensor([1.0, 0.0]), atol=1e-5, rtol=1e-5)
    assert set(parts) == {f"rm:{tmp_path / 'reward'}", rule}
    with pytest.raises(ValueError, match="expected rm:PATH"):
        build_reward("model:foo")
    with pytest.raises(ValueError, match="cannot import"):
        build_reward("rule:gptstack.nope:f")


def test_bradley_terry_margin():
    from gptstack.posttrain.reward import RewardModel, bt_loss

    rm = RewardModel(tiny())
    p = parse_pair(TOK, {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5}, 96)
    p0 = parse_pair(TOK, {"prompt": "q", "chosen": "a", "rejected": "b"}, 96)
    with torch.no_grad():
        rc, rr = rm([p.chosen, p.rejected])
        loss, n, _ = bt_loss(rm, [p])
        loss0, _, _ = bt_loss(rm, [p0])
    assert n == 1
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(rc - rr - 1.5).item(), rel=1e-5)
    assert loss0.item() == pytest.approx(-torch.nn.functional.logsigmoid(rc - rr).item(), rel=1e-5)


# ---- DPO ----------------------------------------------------------------------------------------------


def test_dpo_starts_at_ln2_and_chance_then_learns(sft_run, tmp_path):
    root, _ = sft_run
    policy = load_model(root / "sft")
    prompts = [r["prompt"] for r in demo.prompt_rows(300, seed=9)]
    rows = demo.preference_rows(policy, prompts, seed=2)
    data = write_jsonl(tmp_path / "pref.jsonl", rows)
    before = params_digest(load_model(root / "sft"))
    s = dpo(DPOConfig(init=str(root / "sft"), data=str(data), out=str(tmp_path), lr=3e-4, batch_size=16, epochs=2,
                      eval_fraction=0.2, progress=False))  # fmt: skip
    assert s["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert s["initial_eval_reward_acc"] == pytest.approx(0.5, abs=0.1)
    assert s["eval_reward_acc"] > 0.65 and s["eval_loss"] < s["initial_eval_loss"]  # held out
    assert same(before, params_digest(load_model(root / "sft")))  # the reference checkpoint is untouched


def test_dpo_loss_variants():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    h = (pc - rc) - (pr - rr)  # 1.5
    loss, wc, wr = dpo_losses(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(0.1 * h).item())
    assert wc.item() == pytest.approx(0.1) and wr.item() == pytest.approx(-0.05)
    ipo, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.1, loss="ipo")
    assert ipo.item() == pytest.approx((1.5 - 5.0) ** 2)
    cdpo, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    ls = torch.nn.functional.logsigmoid
    assert cdpo.item() == pytest.approx((-0.8 * ls(0.1 * h) - 0.2 * ls(-0.1 * h)).item())
    with pytest.raises(ValueError, match="loss must be"):
        DPOConfig(loss="hinge2")


def test_dpo_grad_accumulation_equals_full_batch(sft_run):
    root, _ = sft_run
    policy = load_model(root / "sft")
    rows = [{"prompt": demo.PROMPT.format(n=n), "chosen": f"{n - 1}+1", "rejected": f"{n}*{n}"} for n in range(10, 18)]
    pairs = [parse_pair(TOK, r, 96) for r in rows]
    attach_reference(policy, pairs)
    from gptstack.posttrain.dpo import dpo_loss

    cfg = DPOConfig(progress=False)
    model = load_model(root / "sft")
    full = grads_after(model, pairs, 8, lambda b: dpo_loss(model, b, cfg))
    model.zero_grad(set_to_none=True)
    accumulated = grads_after(model, pairs, 4, lambda b: dpo_loss(model, b, cfg))
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(full, accumulated, strict=True))
    c, _r = pair_logprobs(policy, pairs[:2])
    assert c.shape == (2,) and (c < 0).all()


# ---- PPO ----------------------------------------------------------------------------------------------


def test_gae_matches_direct_sum():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.5, 0.3, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.1, 0.4, 0.0], [0.0, -0.1, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    gamma, lam = 1.0, 0.95
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(2):
        n = int(mask[b].sum())
        v = torch.cat([values[b, :n], torch.zeros(1)])
        deltas = [rewards[b, t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(float(want), abs=1e-6)
        assert adv[b, n:].abs().sum() == 0
    torch.testing.assert_close(ret, adv + values)


def test_adaptive_kl_controller():
    kl = KLController(0.1, target=6.0, horizon=100)
    kl.update(12.0, 10)  # KL above target: β up by the clipped error 0.2 × 10/100
    assert kl.beta == pytest.approx(0.1 * 1.02)
    kl.update(0.0, 10)
    assert kl.beta == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = KLController(0.1, target=None, horizon=100)
    fixed.update(50.0, 10)
    assert fixed.beta == 0.1


def test_ppo_steps_log_and_keep_reference_and_reward_frozen(sft_run, tmp_path):
    root, _ = sft_run
    rm_dir = tmp_path / "rmrun"
    rows = demo.preference_rows(load_model(root / "sft"), [r["prompt"] for r in demo.prompt_rows(120, seed=4)], seed=3)
    train_reward(RewardConfig(init=str(root / "sft"), data=str(write_jsonl(tmp_path / "p.jsonl", rows)),
                              out=str(rm_dir), max_steps=2, progress=False))  # fmt: skip
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [*demo.prompt_rows(64, seed=6), {"nothing": 1}])
    cfg = PPOConfig(init=str(root / "sft"), data=str(prompts), out=str(tmp_path),
                    reward=f"0.1*rm:{rm_dir / 'reward'}+rule:gptstack.posttrain.demo:judge",
                    track="rule:gptstack.posttrain.demo:judge", batch_size=32, minibatch_size=8, max_steps=2,
                    lr=1e-4, max_tokens=10, adaptive_kl=True, kl_target=1.0, kl_horizon=100,
                    progress=False)  # fmt: skip
    trainer = PPOTrainer(cfg)
    ref_before, rm_before = params_digest(trainer.ref), params_digest(trainer.reward.models[0])
    policy_before = params_digest(trainer.model.policy)
    from gptstack.posttrain.ppo import read_prompts

    ps, skipped = read_prompts(str(prompts), TOK, 80)
    assert skipped == {"no prompt": 1}
    stats = [trainer.step(ps[:32]), trainer.step(ps[32:64])]
    for key in ("reward", "kl", "entropy", "clip_frac", "response_len", "eos_rate", "tracked", "beta", "vf_loss"):
        assert all(math.isfinite(s[key]) for s in stats), key
    assert stats[1]["beta"] != cfg.kl_coef  # the adaptive controller moved β
    assert same(ref_before, params_digest(trainer.ref))
    assert same(rm_before, params_digest(trainer.reward.models[0]))
    assert not same(policy_before, params_digest(trainer.model.policy))
    s = ppo(cfg)  # the whole stage: checkpoint, log and report
    assert s["steps"] == 2 and "tracked_last" in s
    from gptstack.infer.load import LoadConfig, load_engine
    from gptstack.infer.sampling import SamplingParams

    engine = load_engine(LoadConfig(str(tmp_path / "ppo")))
    assert engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8))[0].token_ids
    assert "## ppo" in (tmp_path / "report.md").read_text()


def test_ppo_ptx_mixes_pretraining_loss(sft_run, tmp_path):
    from gptstack.data.shards import write_texts

    root, _ = sft_run
    write_texts(tmp_path / "shards", TOK, ["def f(x):\n    return x + 1\n" * 20] * 8, val_fraction=0.2)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", demo.prompt_rows(16, seed=6))
    judge = "rule:gptstack.posttrain.demo:judge"
    cfg = PPOConfig(init=str(root / "sft"), data=str(prompts), out=str(tmp_path), reward=judge, batch_size=16,
                    minibatch_size=8, ppo_epochs=1, max_steps=1, max_tokens=8, ptx_coef=1.0,
                    ptx_data=str(tmp_path / "shards"), missing_eos_penalty=-1.0, progress=False)  # fmt: skip
    trainer = PPOTrainer(cfg)
    from gptstack.posttrain.ppo import read_prompts

    ps, _ = read_prompts(str(prompts), TOK, 80)
    stats = trainer.step(ps)
    assert math.isfinite(stats["ptx_loss"]) and stats["ptx_loss"] > 0
    # every response was cut at 8 tokens or ended: a cut one gets the penalty as its reward
    assert stats["reward"] >= -1.0


def test_ppo_config_errors():
    with pytest.raises(ValueError, match="--reward is required"):
        PPOConfig(init="x", data="y")
    with pytest.raises(ValueError, match="ptx"):
        PPOConfig(init="x", data="y", reward="rule:a:b", ptx_coef=0.5)


# ---- GPT-1 fine-tuning ----------------------------------------------------------------------------------


def test_gpt1_transforms_and_similarity_symmetry():
    model = tiny()
    sp = special_ids(TOK)
    clf = GPT1Classifier(model, "similarity", 2, sp).eval()
    ex = Example([["a cat", "a dog"], ["a dog", "a cat"]], 1)
    seqs = clf.encode(TOK, ex, 96)
    assert seqs[0][0] == sp["start"] and seqs[0][-1] == sp["extract"] and sp["delim"] in seqs[0]
    assert TOK.decode(seqs[0][1 : seqs[0].index(sp["delim"])]) == "a cat"
    swapped = clf.encode(TOK, Example([["a dog", "a cat"], ["a cat", "a dog"]], 1), 96)
    with torch.no_grad():
        torch.testing.assert_close(clf([seqs])[0], clf([swapped])[0])  # both orderings, summed
    long = clf.encode(TOK, Example([["x" * 500 + " the question?"]], 0), 64)[0]
    assert len(long) == 64 and TOK.decode(long[1:-1]).endswith("the question?")  # cut from the left


def test_finetune_classification_learns_and_loads(tmp_path):
    save_checkpoint(tiny(block=64), tmp_path / "init", tokenizer=TOK)
    rows = [{"text": f"item {i} is {'great' if i % 2 else 'awful'}", "label": i % 2} for i in range(200)]
    rows.append({"text": "no label"})
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    s = finetune(FinetuneConfig(init=str(tmp_path / "init"), data=str(data), out=str(tmp_path), lr=3e-3,
                                batch_size=16, epochs=3, progress=False))  # fmt: skip
    assert s["transform"] == "classification" and s["skipped"] == 1
    assert s["finetuned_acc"] >= 0.95
    clf = load_classifier(tmp_path / "finetune")
    seqs = clf.encode(TOK, Example([["item 7 is great"]], 1), 64)
    with torch.no_grad():
        assert clf([seqs])[0].argmax().item() == 1
    load_model(tmp_path / "finetune")  # also a plain checkpoint for eval/generate/serve


def test_finetune_on_eval_task_reports_zero_shot(sft_run, tmp_path):
    root, _ = sft_run
    s = finetune(FinetuneConfig(init=str(root / "sft"), task="copa", out=str(tmp_path), limit=40, batch_size=8,
                                epochs=1, progress=False))  # fmt: skip
    assert s["transform"] == "multiple_choice" and s["heldout_examples"] == 8
    assert 0 <= s["zero_shot_acc"] <= 1 and 0 <= s["finetuned_acc"] <= 1
    with pytest.raises(DataError, match="unknown task"):
        finetune(FinetuneConfig(init=str(root / "sft"), task="nope", out=str(tmp_path), progress=False))


# ---- CLI -------------------------------------------------------------------------------------------------


def test_cli_sft_and_errors(sft_run, tmp_path, capsys):
    root, _ = sft_run
    data = write_jsonl(tmp_path / "d.jsonl", demo.sft_rows(32, seed=8))
    args = ["sft", "--init", str(root / "sft"), "--data", str(data), "--out", str(tmp_path), "--max-steps", "2",
            "--batch-size", "8", "--no-progress", "--warmup-steps", "1"]  # fmt: skip
    assert main(args) == 0
    assert "eval_stop_rate" in capsys.readouterr().out
    assert load_model(tmp_path / "sft").config.block_size == 96
    assert main(["dpo", "--init", str(root / "sft"), "--data", str(tmp_path / "missing.jsonl"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["sft", "--init", str(root / "sft"), "--data", str(data), "--nope", "1"]) == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err
    assert main(["sft", "--init", str(root / "sft"), "--data", str(data), "--lora-rank", "two"]) == 2
    assert "lora_rank='two' is not a valid int" in capsys.readouterr().err


def test_split_is_seeded_and_disjoint():
    a, b = split(list(range(50)), 0.2, seed=3)
    assert len(b) == 10 and not set(a) & set(b) and split(list(range(50)), 0.2, seed=3) == (a, b)
