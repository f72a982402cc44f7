"""`gptstack generate` and `gptstack chat`: a completion or a conversation, streamed token by token.

Both sample at temperature 0.8 by default (the library's SamplingParams default is 1.0): the
interactive defaults are the two SamplingParams instances below, which the CLI's options show. Both
run one sequence (`ENGINE`), so the KV pool holds at most one context rather than the server's
`max_seqs` of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams

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


def chat(engine: Engine, params: SamplingParams, read: Callable[[], str | None], out: TextIO, system: str = "") -> list:
    """Read user turns with `read()` (None ends), stream each assistant reply to `out`. The conversation
    (a `system` message first when given) is rendered by the tokenizer's chat template, the checkpoint's
    own for an imported model, and re-sent each turn (the prefix cache keeps it from being recomputed);
    the oldest turns are dropped when it outgrows what the engine holds. Returns the messages."""
    keep = [{"role": "system", "content": system}] if system else []
    messages = list(keep)
    while (line := read()) is not None:
        if not line.strip():
            continue
        if line.strip() in ("/reset", "/clear"):
            messages = list(keep)
            out.write("(history cleared)\n")
            continue
        messages.append({"role": "user", "content": line.rstrip("\r\n")})  # the line, not its terminator
        ids, room = fit(engine, messages, len(keep))
        if room < 1:
            messages.pop()
            out.write(f"(that message takes {len(ids)} tokens; this engine holds {engine.capacity})\n")
            continue
        reply = []
        out.write("assistant> ")
        for piece in engine.stream(ids, replace(params, max_tokens=min(params.max_tokens, room))):
            reply.append(piece.text)
            out.write(piece.text)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages


def fit(engine: Engine, messages: list[dict], keep: int) -> tuple[list[int], int]:
    """Drop the oldest turns after the first `keep` messages (in place) until the rendered prompt leaves
    room for at least two new tokens, or only the last message is left; whole turns go, so the
    conversation still opens with a user message (templates such as Gemma's insist). Returns (ids, room)."""
    while True:
        ids, _ = engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
        room = engine.capacity - len(ids)
        if room >= 2 or len(messages) <= keep + 1:
            return ids, room
        messages.pop(keep)
        while len(messages) > keep + 1 and messages[keep]["role"] != "user":  # a turn starts with the user
            messages.pop(keep)
