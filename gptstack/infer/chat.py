"""`gptstack chat`: an interactive conversation through the chat template, streamed token by token."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from gptstack.infer.engine import Engine
from gptstack.infer.sampling import SamplingParams


def chat(engine: Engine, params: SamplingParams, read: Callable[[], str | None], out: TextIO, system: str = "") -> list:
    """Read user turns with `read()` (None ends), stream each assistant reply to `out`. The history
    is re-sent each turn (the prefix cache keeps it from being recomputed). Returns the messages."""
    tok = engine.tokenizer
    messages = [{"role": "system", "content": system}] if system else []
    while (line := read()) is not None:
        if not line.strip():
            continue
        if line.strip() in ("/reset", "/clear"):
            messages = messages[:1] if system else []
            out.write("(history cleared)\n")
            continue
        messages.append({"role": "user", "content": line})
        ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
        room = engine.context - len(ids)
        while room < 2 and len(messages) > 1 + bool(system):  # drop the oldest turns to fit the context
            messages.pop(1 if system else 0)
            ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
            room = engine.context - len(ids)
        reply = []
        turn = SamplingParams(**{**params.__dict__, "max_tokens": min(params.max_tokens, max(1, room))})
        out.write("assistant> ")
        for piece in engine.stream(ids, turn):
            reply.append(piece.text)
            out.write(piece.text)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages
