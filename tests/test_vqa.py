"""`gptstack eval --tasks vqa:FILE [--blind]`: the answer normalisation, chance, the generation against an
independent uncached greedy loop over the same model (so the accuracy of a model whose answers are known
is exact), the blind baseline, a small model trained here to name colours (it sees: far above blind and
chance), and the errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need, scramble

for _pkg in ("PIL", "sklearn"):
    need(importlib.util.find_spec(_pkg) is not None, f"the {_pkg} package (the vision extra)")

from PIL import Image  # noqa: E402

from gptstack import checkpoint  # noqa: E402
from gptstack.cli import main  # noqa: E402
from gptstack.config import ModelConfig  # noqa: E402
from gptstack.data.images import COLOURS, ImageDataConfig, load_images, read_image_rows, write_image_data  # noqa: E402
from gptstack.eval import vqa  # noqa: E402
from gptstack.eval.run import EvalConfig, evaluate  # noqa: E402
from gptstack.model import build_model  # noqa: E402
from gptstack.tokenizer import byte_tokenizer  # noqa: E402
from gptstack.vision import (  # noqa: E402
    VisionConfig,
    VisionTower,
    choose_image_token_id,
    encode_image_chat,
    image_positions,
    preprocess,
    render_image_chat,
)

VOCAB = 320  # the byte tokenizer's 261 ids padded: the placeholder is a padding id


def tiny(seed: int = 0, scrambled: bool = True):
    """A random 2-layer LM over bytes and a random one-block ViT tower (`scrambled`: noise large enough
    that greedy answers vary): (model, (tower, cfg), tokenizer)."""
    tok = byte_tokenizer()
    model = build_model(ModelConfig(vocab_size=VOCAB, block_size=128, n_layer=2, n_head=2, n_embd=64), seed=seed)
    vcfg = VisionConfig(image_size=16, patch_size=8, width=32, depth=1, heads=2, n_image_tokens=4, n_embd=64,
                        image_token_id=choose_image_token_id(tok, VOCAB))  # fmt: skip
    torch.manual_seed(seed)
    tower = VisionTower(vcfg)
    if scrambled:
        scramble(model, seed), scramble(tower, seed + 1)
    return model.eval(), (tower.eval(), vcfg), tok


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa") / "data"
    write_image_data(ImageDataConfig(out=str(out), families=("colour", "digits"), n=64, n_test=4, progress=False))
    return out


@torch.no_grad()
def reference(model, tok, ids: list[int], rows: torch.Tensor | None, where: torch.Tensor | None, n: int) -> str:
    """Greedy decoding without a KV cache or generate(): the whole sequence re-run for every token."""
    allowed, seq, out = tok.decodable_mask(VOCAB), list(ids), []
    for _ in range(n):
        x = torch.tensor([seq])
        embeds = (
            None
            if rows is None
            else (torch.cat([where, torch.zeros(len(seq) - len(ids), dtype=torch.bool)])[None], rows)
        )
        logits = model(x, embeds=embeds)[0, -1].float().masked_fill(~allowed, float("-inf"))
        t = int(logits.argmax())
        if t in tok.stop_ids:
            break
        out.append(t)
        seq.append(t)
    return tok.decode(out)


def test_normalize_answer():
    same = [("Three.", "3"), ("3.0", "3"), (" RED ", "red"), ("The circle!", "circle"), ('"cat"', "cat"),
            ("1,000", "1000"), ("$5", "5"), ("7\nbecause it is", "7"), ("a  square", "square")]  # fmt: skip
    for a, b in same:
        assert vqa.normalize_answer(a) == vqa.normalize_answer(b), (a, b)
    for a, b in [("red", "reed"), ("3", "30"), ("a", "an apple"), ("1,0", "10")]:
        assert vqa.normalize_answer(a) != vqa.normalize_answer(b), (a, b)


def test_chance_limit_and_specs(data):
    rows = read_image_rows(data / "train.jsonl")
    c = vqa.chance(rows)
    assert set(c) == {"colour", "digits"} and 1 / 8 <= c["colour"] < 0.5 and 1 / 10 <= c["digits"] < 0.5
    said = [{"family": "x", "messages": [{"role": "assistant", "content": a}]} for a in ("Red", "red.", "blue", "RED")]
    assert vqa.chance(said) == {"x": 0.75}
    limited = vqa.limit_rows(rows, 5)
    assert [r["family"] for r in limited] == ["colour"] * 5 + ["digits"] * 5
    assert vqa.split_specs(["vqa:a.jsonl", "copa", "vqa:b.jsonl"]) == (["a.jsonl", "b.jsonl"], ["copa"])
    with pytest.raises(vqa.TaskError, match="needs a file"):
        vqa.split_specs(["vqa:"])


def test_known_answers_and_blind(data, tmp_path):
    """The scorer's answers equal an independent uncached greedy loop's, with the images and blind; a file
    whose references are those answers for every other row scores exactly 1/2 in each family."""
    model, (tower, vcfg), tok = tiny()
    rows = read_image_rows(data / "test.jsonl")
    seeing, blind = [], []
    for r in rows:
        ids, _ = render_image_chat(tok, r["messages"][:-1], vcfg)
        feats = tower(preprocess(load_images(r), vcfg)).reshape(-1, vcfg.n_embd).detach()
        seeing.append(reference(model, tok, ids, feats, image_positions(ids, vcfg), 4))
        text = [{"role": "user", "content": r["messages"][0]["content"].replace("<image>\n", "")}]
        blind.append(reference(model, tok, tok.encode_chat(text, add_generation_prompt=True)[0], None, None, 4))
    assert seeing != blind  # the image changes what this model says
    for key, want in (("generation", seeing), ("blind_generation", blind)):
        known = tmp_path / f"{key}.jsonl"
        with open(known, "w") as f:  # references: the model's own answer on even rows, a wrong one on odd
            for i, (r, a) in enumerate(zip(read_image_rows(data / "test.jsonl"), want, strict=True)):
                r["messages"][-1]["content"] = a if i % 2 == 0 else a + "?!x"
                f.write(json.dumps(r) + "\n")
        tasks = vqa.VQATasks((tower, vcfg), {"vqa:known": read_image_rows(known)}, blind=True)
        results, items = vqa.run_vqa(model, tok, tasks, max_tokens=4)
        got = [it[key] for it in items["vqa:known"]]
        assert got == want
        fam = results["vqa:known"]["families"]
        score = "acc" if key == "generation" else "blind"
        assert {f: m[score] for f, m in fam.items()} == {"colour": 0.5, "digits": 0.5, "all": 0.5}
        assert fam["colour"]["items"] == 4 and fam["all"]["items"] == 8


def colour_file(folder: Path, split: str, n: int, seed: int) -> Path:
    """A VQA file in the documented format (bring your own data): noisy red or blue squares, "What colour
    is it?" → the colour's name."""
    g = np.random.default_rng(seed)
    (folder / split).mkdir(parents=True)
    with open(folder / f"{split}.jsonl", "w") as f:
        for i in range(n):
            name = ("red", "blue")[i % 2]
            shade = np.array(COLOURS[name]) + g.integers(-25, 26, 3)
            rgb = (shade + g.integers(-20, 21, (16, 16, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(folder / split / f"{i}.png")
            messages = [{"role": "user", "content": "<image>\nWhat colour is it?"},
                        {"role": "assistant", "content": name}]  # fmt: skip
            f.write(json.dumps({"images": [f"{split}/{i}.png"], "messages": messages, "family": "colour"}) + "\n")
    return folder / f"{split}.jsonl"


def train_colours(rows: list[dict], steps: int = 40):
    """tiny() (unscrambled) trained here, LM and tower together, with the loss on the answer only (SFT's
    mask): (model, tower, tokenizer, last loss)."""
    model, (tower, vcfg), tok = tiny(scrambled=False)
    enc = [encode_image_chat(tok, r["messages"], vcfg) for r in rows]
    T = max(len(ids) for ids, _, _ in enc) - 1
    idx = torch.tensor([ids[:-1] + [0] * (T + 1 - len(ids)) for ids, _, _ in enc])  # (B, T) right-padded
    tgt = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)] + [-1] * (T + 1 - len(ids))
                        for ids, mask, _ in enc])  # fmt: skip
    where = idx == vcfg.image_token_id
    pixels = preprocess([im for r in rows for im in load_images(r)], vcfg)  # (B, 3, S, S)
    opt = torch.optim.AdamW([*model.parameters(), *tower.parameters()], lr=1e-2, weight_decay=0.0)
    model.train(), tower.train()
    for _ in range(steps):
        feats = tower(pixels)  # (B, n_image_tokens, D)
        _, loss = model(idx, tgt, embeds=(where, feats.reshape(-1, feats.size(-1))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tower.eval(), tok, loss.item()


def test_trained_model_sees(tmp_path):
    """A model trained here to name an image's colour answers every held-out image right; blind, the
    questions are all the same prompt, so one answer for all: chance (1/2) at best."""
    model, tower, tok, loss = train_colours(read_image_rows(colour_file(tmp_path, "train", 16, seed=0)))
    ckpt = checkpoint.save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok, vision=tower)
    out, samples = tmp_path / "results.json", tmp_path / "samples.jsonl"
    argv = ["eval", str(ckpt), "--tasks", f"vqa:{colour_file(tmp_path, 'test', 12, seed=1)}", "--blind",
            "--out", str(out), "--log-samples", str(samples), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    fam = json.loads(out.read_text())["vqa"]["vqa:test"]["families"]["colour"]
    assert fam["acc"] == 1.0 and fam["blind"] <= fam["chance"] == 0.5, (fam, loss)
    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["generation"] for r in logged] == ["red", "blue"] * 6 and {r["task"] for r in logged} == {"vqa:test"}
    assert len({r["blind_generation"] for r in logged}) == 1  # no image: the same prompt, the same answer


def test_errors(data, tmp_path):
    model, _, tok = tiny()
    text_only = checkpoint.save_checkpoint(model, tmp_path / "text", tokenizer=tok)
    test = str(data / "test.jsonl")
    with pytest.raises(vqa.TaskError, match=r"has no vision tower .* or --blind for text only"):
        evaluate(EvalConfig(str(text_only), tasks=[f"vqa:{test}"], progress=False))
    r = evaluate(EvalConfig(str(text_only), tasks=[f"vqa:{test}"], blind=True, limit=2, progress=False))
    fam = r["vqa"]["vqa:test"]["families"]
    assert set(fam) == {"colour", "digits", "all"} and "acc" not in fam["all"] and fam["all"]["items"] == 4
    with pytest.raises(vqa.TaskError, match="--blind applies to vqa tasks"):
        evaluate(EvalConfig(str(text_only), tasks=["copa"], blind=True, progress=False))
    bad = tmp_path / "bad.jsonl"
    bad.write_text((data / "test.jsonl").read_text().replace("<image>", "", 1))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 0 <image> marker\(s\) in the messages but 1 image"):
        evaluate(EvalConfig(str(text_only), tasks=[f"vqa:{bad}"], blind=True, progress=False))
