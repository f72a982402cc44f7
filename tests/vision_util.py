"""Helpers for the image-serving tests: a tiny LM with a small ViT tower (random, or trained in seconds
to name an image's colour), images as PNG bytes and data URLs."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from gptstack.config import ModelConfig
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.model import build_model
from gptstack.tokenizer import get_tokenizer
from gptstack.vision import VisionConfig, VisionTower, choose_image_token_id, preprocess, render_image_chat

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}
QUESTION = "What colour is it?"


def png(colour=(200, 0, 0), size=(24, 24), noise: int = 0, seed: int = 0) -> bytes:
    """A PNG of one colour (plus uniform noise of ±noise per channel)."""
    rgb = np.broadcast_to(np.array(colour, dtype=np.int16), (size[1], size[0], 3))
    if noise:
        rgb = rgb + np.random.default_rng(seed).integers(-noise, noise + 1, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def tiny_vision(seed: int = 0, n_embd: int = 64, context: int = 256, n_image_tokens: int = 4):
    """A random LM over the byte tokenizer (its vocabulary padded, so the placeholder is a padding id) and
    a random ViT tower: (model, (tower, vision config), tokenizer)."""
    tok = get_tokenizer("bytes")
    vocab = 320
    cfg = ModelConfig(vocab_size=vocab, block_size=context, n_layer=2, n_head=2, n_embd=n_embd)
    model = build_model(cfg, seed=seed)
    vcfg = VisionConfig(image_size=16, patch_size=8, width=32, depth=1, heads=2, n_image_tokens=n_image_tokens,
                        n_embd=n_embd, image_token_id=choose_image_token_id(tok, vocab))  # fmt: skip
    torch.manual_seed(seed)
    return model, (VisionTower(vcfg).eval(), vcfg), tok


def vision_engine(seed: int = 0, parts=None, context: int = 256, **config) -> Engine:
    """An Engine over tiny_vision (or the given (model, vision, tokenizer)); `config`: EngineConfig fields."""
    model, vision, tok = parts or tiny_vision(seed, context=context)
    return Engine(model, EngineConfig(**config), tokenizer=tok, vision=vision)


def shades(colour, k: int, g: torch.Generator) -> list[Image.Image]:
    """k noisy pictures of a colour, each shifted by up to ±25 per channel."""
    out = []
    for j in range(k):
        shade = tuple(int(c) + int(torch.randint(-25, 26, (), generator=g)) for c in colour)
        out.append(Image.open(io.BytesIO(png(shade, noise=20, seed=j))))
    return out


def train_colours(steps: int = 60, seed: int = 0, lr: float = 1e-2):
    """tiny_vision trained (LM and tower together, loss on the answer only) to answer QUESTION about a red
    or a blue picture with its colour's name: a few seconds on one core."""
    model, (tower, vcfg), tok = tiny_vision(seed)
    rows = []
    for name, colour in COLOURS.items():
        prompt, _ = render_image_chat(tok, image_message("x"), vcfg)
        answer = [*tok.encode(name), tok.end_of_turn_id]
        rows.append((prompt, answer, colour))
    # a pool of noisy shades per colour, preprocessed once: (2, K, 3, S, S)
    g = torch.Generator().manual_seed(seed)
    pool = torch.stack([preprocess(shades(colour, 8, g), vcfg) for _, _, colour in rows])
    T = max(len(p) + len(a) - 1 for p, a, _ in rows)  # right-padded: padding after the answer changes nothing
    idx = torch.tensor([(p + a)[:-1] + [0] * (T - len(p) - len(a) + 1) for p, a, _ in rows])
    tgt = torch.tensor([[-1] * (len(p) - 1) + a + [-1] * (T - len(p) - len(a) + 1) for p, a, _ in rows])
    where = idx == vcfg.image_token_id
    params = list(model.parameters()) + list(tower.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train(), tower.train()
    for _step in range(steps):
        pick = torch.randint(0, pool.size(1), (2,), generator=g)
        feats = tower(pool[torch.arange(2), pick])  # (2, n_image_tokens, D)
        _, loss = model(idx, tgt, embeds=(where, feats.reshape(-1, feats.size(-1))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval(), tower.eval()
    return model, (tower, vcfg), tok, loss.item()
