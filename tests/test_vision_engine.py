"""Images through the inference engine (issue 21): features spliced at the placeholders, cached decode
equal to uncached, the prefix cache keyed by the image, preemption that keeps the images."""

from __future__ import annotations

import io

import pytest
import torch
from cli_util import gptstack
from PIL import Image
from vision_util import COLOURS, QUESTION, image_message, png, train_colours, vision_engine

from gptstack.checkpoint import save_checkpoint
from gptstack.config import ModelConfig
from gptstack.infer.chat import chat, read_images
from gptstack.infer.engine import Engine, EngineConfig, ImageInput, block_digest, place_images
from gptstack.infer.generate import generate
from gptstack.infer.sampling import SamplingParams
from gptstack.model import build_model
from gptstack.vision import ImageError, preprocess, render_image_chat

V, D, SPAN, IMAGE_ID = 96, 32, 12, 95  # vocabulary, width, image tokens per image, placeholder id
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(vocab_size=V, block_size=128, n_layer=2, n_head=2, n_embd=D), seed=0)


def image(seed: int, offset: int) -> ImageInput:
    """An image as precomputed features (SPAN, D): what a VisionTower would give."""
    g = torch.Generator().manual_seed(seed)
    return ImageInput(digest=seed.to_bytes(16, "little"), offset=offset, features=torch.randn(SPAN, D, generator=g))


def prompt_with(offsets: list[int], length: int = 40) -> list[int]:
    ids = [(7 * i + 3) % (V - 1) for i in range(length)]
    for at in offsets:
        ids[at : at + SPAN] = [IMAGE_ID] * SPAN
    return ids


def reference(model, prompt, images, use_cache) -> list[int]:
    """generate() over the contiguous cache (or none): the engine's reference."""
    where = torch.zeros(len(prompt), dtype=torch.bool)
    for im in images:
        where[im.offset : im.offset + SPAN] = True
    rows = torch.cat([im.features for im in images])
    return list(generate(model, prompt, GREEDY, use_cache=use_cache, embeds=(where, rows)))


@pytest.mark.parametrize("max_step_tokens", [512, 7])  # whole prefill, and chunks that cut through the images
def test_cached_decode_equals_uncached_with_images(model, max_step_tokens):
    prompt, images = prompt_with([3, 20]), [image(1, 3), image(2, 20)]
    engine = Engine(model, EngineConfig(num_blocks=16, kv_block_size=8, max_step_tokens=max_step_tokens))
    [out] = engine.generate([prompt], GREEDY, images=[images])
    uncached = reference(model, prompt, images, use_cache=False)
    assert out.token_ids == uncached == reference(model, prompt, images, use_cache=True)
    scored = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0)
    with_image = engine.generate([prompt], scored, images=[images])[0].logprobs[0][0]
    plain = engine.generate([prompt], scored)[0].logprobs[0][0]  # the placeholders' own embeddings
    assert with_image != plain  # the image rows were used


def test_image_rows_land_at_the_placeholders(model):
    """Prompt log-probabilities of two requests that differ only by the image: equal before the image's
    first placeholder, different from it on."""
    prompt = prompt_with([16])
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    engine = Engine(model, EngineConfig(num_blocks=16, kv_block_size=8))
    a, b = engine.generate([prompt, prompt], params, images=[[image(1, 16)], [image(2, 16)]])
    lp_a = [e[0] for e in a.prompt_logprobs[1:]]  # entry j predicts prompt token j + 1 from positions <= j
    lp_b = [e[0] for e in b.prompt_logprobs[1:]]
    assert lp_a[:16] == lp_b[:16]  # positions 0..15 see no image
    assert all(x != y for x, y in zip(lp_a[16:], lp_b[16:], strict=True))  # position 16 on sees it


def test_different_images_share_no_block_and_the_same_image_is_a_prefix_hit(model):
    prompt = prompt_with([2], length=48)
    engine = Engine(model, EngineConfig(num_blocks=32, kv_block_size=8))
    first = engine.generate([prompt], GREEDY, images=[[image(1, 2)]])[0]
    named = set(engine.pool.by_hash)
    other = engine.generate([prompt], GREEDY, images=[[image(2, 2)]])[0]
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0  # 0 shared KV blocks
    assert len(engine.pool.by_hash) == 2 * len(named)  # the second image's blocks are all new names
    again = engine.generate([prompt], GREEDY, images=[[image(1, 2)]])[0]
    assert again.num_cached_tokens == 40  # every full block of the prompt but the last token's (47 // 8 * 8)
    assert again.token_ids == first.token_ids
    plain = engine.generate([prompt], GREEDY)[0]  # the same ids without an image share nothing either
    assert plain.num_cached_tokens == 0
    # the first block's three names: its tokens alone, and with each image's digest and offset (2, int64)
    tokens = tuple(prompt[:8])
    names = [block_digest(b"", tokens, extra) for extra in (b"", image(1, 2).digest, image(2, 2).digest)]
    assert len(set(names)) == 3
    offset = (2).to_bytes(8, "little")
    assert {names[0], block_digest(b"", tokens, image(1, 2).digest + offset)} <= set(engine.pool.by_hash)
    assert block_digest(b"", tokens, image(2, 2).digest + offset) in engine.pool.by_hash


def test_preemption_keeps_the_images(model):
    prompts = [prompt_with([4 + i], length=40) for i in range(4)]
    images = [[image(10 + i, 4 + i)] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = [Engine(model, EngineConfig(num_blocks=16, kv_block_size=8)).generate([p], params, images=[im])[0]
             for p, im in zip(prompts, images, strict=True)]  # fmt: skip
    tight = Engine(model, EngineConfig(num_blocks=14, kv_block_size=8, prefix_caching=False))
    got = tight.generate(prompts, params, images=images)
    assert tight.stats["preemptions"] > 0
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert tight.pool.used == 0


def test_bad_images_are_refused_before_anything_is_queued(model):
    engine = Engine(model, EngineConfig(num_blocks=16, kv_block_size=8))
    prompt = prompt_with([4])
    with pytest.raises(ValueError, match="leave the prompt"):
        engine.add_request(prompt, GREEDY, images=[image(1, 35)])
    with pytest.raises(ValueError, match="overlap"):
        engine.add_request(prompt, GREEDY, images=[image(1, 4), image(2, 10)])
    with pytest.raises(ValueError, match="features must be"):
        engine.add_request(prompt, GREEDY, images=[ImageInput(b"x" * 16, 4, features=torch.zeros(SPAN, D + 1))])
    with pytest.raises(ValueError, match="no vision tower"):
        engine.add_request(prompt, GREEDY, images=[ImageInput(b"x" * 16, 4, pixels=torch.zeros(3, 8, 8))])
    assert not engine.has_unfinished() and engine.pool.used == 0


# ---- the pixel path (a real VisionTower), `gptstack chat --image` -------------------------------------------


def test_the_tower_runs_once_per_image_and_chat_keeps_the_image_across_turns(tmp_path):
    engine = vision_engine(num_blocks=64, kv_block_size=4)
    (tmp_path / "red.png").write_bytes(png((220, 30, 30)))
    images = read_images(engine, [str(tmp_path / "red.png")])
    turns = iter(["What colour is it?", "And now?"])
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    messages = chat(engine, params, lambda: next(turns, None), io.StringIO(), images=images)
    assert messages[0]["content"][0]["type"] == "image_url" and len(messages) == 4
    assert engine.stats["images"] == 2 and engine.stats["images_encoded"] == 1  # the second turn: no tower run
    assert engine.stats["prefix_hits"] >= 4 * 4  # the second turn reused the image's blocks
    text_only = Engine(engine.model, EngineConfig(num_blocks=8), tokenizer=engine.tokenizer)
    with pytest.raises(ImageError, match=r"red\.png: this model has no vision tower"):
        read_images(text_only, [str(tmp_path / "red.png")])
    with pytest.raises(ValueError, match=r"pixels must be \(3, 16, 16\)"):
        engine.add_request([1, 2], GREEDY, images=[ImageInput(b"x" * 16, 0, pixels=torch.zeros(3, 8, 8))])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match=r"bad\.png: not an image"):
        read_images(engine, [str(tmp_path / "bad.png")])


def test_pixels_through_the_tower_equal_generate_with_its_features():
    engine = vision_engine(num_blocks=64, kv_block_size=4, max_step_tokens=5)  # chunks cut the image
    vcfg, tok = engine.vision_config, engine.tokenizer
    ids, _ = render_image_chat(tok, image_message("unused", "hi"), vcfg)
    pixels = preprocess([Image.open(io.BytesIO(png((30, 60, 90), noise=30)))], vcfg)  # (1, 3, 16, 16)
    [im] = place_images(ids, [(b"d" * 16, pixels[0])], vcfg)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = engine.generate([ids], params, images=[[im]])[0]
    with torch.no_grad():
        rows = engine.vision(pixels)[0]  # (n_image_tokens, D)
    where = torch.tensor(ids) == vcfg.image_token_id
    reference = list(generate(engine.model, ids, params, use_cache=False, embeds=(where, rows)))
    assert out.token_ids == reference
    assert engine.stats["images_encoded"] == 1


@pytest.mark.slow
def test_gptstack_chat_image_answers_about_the_image(tmp_path):
    """`gptstack chat CKPT --image PATH` on a checkpoint trained in the test to name an image's colour."""
    model, (tower, _), _, _ = train_colours()
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer="bytes", vision=tower)
    answers = {}
    for name, colour in COLOURS.items():
        (tmp_path / f"{name}.png").write_bytes(png(colour))
        run = gptstack("chat", ckpt, "--image", tmp_path / f"{name}.png", "--temperature", "0", "--max-tokens", "8",
                       stdin=QUESTION + "\n")  # fmt: skip
        answers[name] = run.stdout.strip()
    assert answers == {"red": "assistant> red", "blue": "assistant> blue"}
    bad = gptstack("chat", ckpt, "--image", tmp_path / "no.png", stdin="hi\n", ok=False)
    assert bad.returncode != 0 and "no.png" in bad.stderr and "Traceback" not in bad.stderr


def test_the_feature_cache_is_bounded():
    engine = vision_engine(num_blocks=64, kv_block_size=4, image_cache=1, prefix_caching=False)
    vcfg = engine.vision_config
    ids, _ = render_image_chat(engine.tokenizer, image_message("unused"), vcfg)
    pictures = {c: preprocess([Image.open(io.BytesIO(png(c)))], vcfg)[0] for c in ((200, 0, 0), (0, 0, 200))}
    params = SamplingParams(temperature=0.0, max_tokens=1)
    for colour in [(200, 0, 0), (200, 0, 0), (0, 0, 200), (200, 0, 0)]:  # hit, then evicted by the other
        engine.generate([ids], params, images=[place_images(ids, [(bytes(colour) * 6, pictures[colour])], vcfg)])
    assert engine.stats["images_encoded"] == 3 and len(engine.image_features) == 1
