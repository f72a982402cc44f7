"""`gptstack generate` and `gptstack chat`: a completion or a conversation, streamed token by token.

Both sample at temperature 0.8 by default (the library's SamplingParams default is 1.0): the
interactive defaults are the two SamplingParams instances below, which the CLI's options show. Both
run one sequence (`ENGINE`), so the KV pool holds at most one context rather than the server's
`max_seqs` of them. `chat --image PATH` shows images (a checkpoint with a vision tower) with the first
user message: they stay in the conversation until its turn is dropped or the history is cleared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from torch import Tensor

from gptstack.infer.engine import Engine, EngineConfig, ImageInput, place_images
from gptstack.infer.sampling import SamplingParams
from gptstack.vision import ImageError, image_digest, preprocess, read_image, render_image_chat

GENERATE_SAMPLING = SamplingParams(temperature=0.8, max_tokens=64)
CHAT_SAMPLING = replace(GENERATE_SAMPLING, max_tokens=256)
ENGINE = EngineConfig(max_seqs=1)  # one conversation: a pool of one context (within kv_memory)


def complete(
    engine: Engine, prompt: str, params: SamplingParams, out: TextIO, err: TextIO, allow_special: bool = False
) -> int:
    """Stream `prompt` and its completion to `out`; token log-probabilities (when params.logprobs is
    set) and a timing line go to `err`. `allow_special`: special-token text in the prompt (a hand-typed
    `<|im_start|>`) becomes that token, else it is encoded as plain text. The prompt's ids open with BOS
    where the model's tokenizer adds one (Gemma: `encode_prompt`). Returns the number of generated tokens."""
    out.write(prompt)
    start, n = time.perf_counter(), 0
    for piece in engine.stream(engine.tokenizer.encode_prompt(prompt, allow_special), params):
        out.write(piece.text)
        out.flush()
        n += len(piece.token_ids)
        if params.logprobs is not None:
            for token, (lp, _) in zip(piece.token_ids, piece.logprobs, strict=True):
                err.write(f"\n[{token} logprob {lp:.3f}]")
    out.write("\n")
    spec = f", {engine.acceptance_rate:.0%} of drafts accepted" if engine.config.speculative else ""
    err.write(f"[{n} tokens in {time.perf_counter() - start:.2f} s{spec}]\n")
    return n


def read_images(engine: Engine, paths: list[str]) -> list[tuple[bytes, Tensor]]:
    """Image files as (digest, pixels (3, H, W)) for the engine's tower; ImageError naming the file for
    one that is not an image, or for any image when the model has no vision tower."""
    if paths and engine.vision_config is None:
        raise ImageError(f"{paths[0]}: this model has no vision tower, so it takes no --image")
    return [(image_digest(Path(p).read_bytes()), preprocess([read_image(p)], engine.vision_config)[0]) for p in paths]


def chat(
    engine: Engine,
    params: SamplingParams,
    read: Callable[[], str | None],
    out: TextIO,
    system: str = "",
    images: list[tuple[bytes, Tensor]] = (),
) -> list:
    """Read user turns with `read()` (None ends), stream each assistant reply to `out`. The conversation
    (a `system` message first when given) is rendered by the tokenizer's chat template, the checkpoint's
    own for an imported model, and re-sent each turn (the prefix cache keeps it from being recomputed);
    the oldest turns are dropped when it outgrows what the engine holds. `images` (read_images) go with
    the first user message, as image parts before its text. Returns the messages."""
    keep = [{"role": "system", "content": system}] if system else []
    messages, pending = list(keep), list(images)
    while (line := read()) is not None:
        if not line.strip():
            continue
        if line.strip() in ("/reset", "/clear"):
            messages, pending = list(keep), []
            out.write("(history cleared)\n")
            continue
        text = line.rstrip("\r\n")  # the line, not its terminator
        parts = [{"type": "image_url", "digest": d, "pixels": p} for d, p in pending]
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text})
        pending = []
        ids, shown, room = fit(engine, messages, len(keep))
        if room < 1:
            messages.pop()
            out.write(f"(that message takes {len(ids)} tokens; this engine holds {engine.capacity})\n")
            continue
        reply = []
        out.write("assistant> ")
        for piece in engine.stream(ids, replace(params, max_tokens=min(params.max_tokens, room)), images=shown):
            reply.append(piece.text)
            out.write(piece.text)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages


def render(engine: Engine, messages: list[dict]) -> tuple[list[int], list[ImageInput]]:
    """The prompt ids of the conversation (the assistant turn opened) and its images' ImageInputs."""
    pictures = [(p["digest"], p["pixels"]) for m in messages if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image_url"]  # fmt: skip
    if not pictures:
        return engine.tokenizer.encode_chat(messages, add_generation_prompt=True)[0], []
    ids, _ = render_image_chat(engine.tokenizer, messages, engine.vision_config)
    return ids, place_images(ids, pictures, engine.vision_config)


def fit(engine: Engine, messages: list[dict], keep: int) -> tuple[list[int], list[ImageInput], int]:
    """Drop the oldest turns after the first `keep` messages (in place) until the rendered prompt leaves
    room for at least two new tokens, or only the last message is left; whole turns go, so the
    conversation still opens with a user message (templates such as Gemma's insist). Returns (ids,
    images, room)."""
    while True:
        ids, images = render(engine, messages)
        room = engine.capacity - len(ids)
        if room >= 2 or len(messages) <= keep + 1:
            return ids, images, room
        messages.pop(keep)
        while len(messages) > keep + 1 and messages[keep]["role"] != "user":  # a turn starts with the user
            messages.pop(keep)
