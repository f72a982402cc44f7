"""`gptstack generate` and `gptstack chat`: a completion or a conversation, streamed token by token.

Both sample at temperature 0.8 by default (the library's SamplingParams default is 1.0): the
interactive defaults are the two SamplingParams instances below, which the CLI's options show.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from gptstack.infer.engine import Engine
from gptstack.infer.sampling import SamplingParams

GENERATE_SAMPLING = SamplingParams(temperature=0.8, max_tokens=64)
CHAT_SAMPLING = replace(GENERATE_SAMPLING, max_tokens=256)


def complete(engine: Engine, prompt: str, params: SamplingParams, out: TextIO, err: TextIO) -> int:
    """Stream `prompt` and its completion to `out`; token log-probabilities (when params.logprobs is
    set) and a timing line go to `err`. Returns the number of generated tokens."""
    out.write(prompt)
    start, n = time.perf_counter(), 0
    for piece in engine.stream(engine.tokenizer.encode(prompt), params):
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
        turn = replace(params, max_tokens=min(params.max_tokens, max(1, room)))
        out.write("assistant> ")
        for piece in engine.stream(ids, turn):
            reply.append(piece.text)
            out.write(piece.text)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages
