"""SFT packing against one-conversation-per-row padding, in the same process: the time of one epoch of
forward+backward over the same conversations, and the fraction of computed positions that are padding.
Packing keeps attention inside each conversation (GPT.forward(segments=)), so both compute the same loss;
the script checks that first.

    python benchmarks/bench_sft_packing.py --rows 512 --max-turns 5 --reps 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from gptstack.config import ModelConfig
from gptstack.model import build_model
from gptstack.posttrain import demo
from gptstack.posttrain.common import chunks
from gptstack.posttrain.sft import encode_example, pack, sft_loss
from gptstack.tokenizer import byte_tokenizer


def conversations(n: int, max_turns: int) -> list[dict]:
    """Multi-turn chats of the demo task with 1..max_turns exchanges: lengths that vary as real data does."""
    rng = random.Random(0)
    turns = demo.sft_rows(n * max_turns, seed=0)
    out = []
    for _ in range(n):
        k = rng.randint(1, max_turns)
        msgs = []
        for t in (turns.pop() for _ in range(k)):
            msgs += [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["response"]}]
        out.append({"messages": msgs})
    return out


def epoch(model, rows: list, batch: int) -> float:
    start = time.perf_counter()
    for group in chunks(rows, batch):
        loss, n, _ = sft_loss(model, group)
        (loss / n).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-turns", type=int, default=5, help="conversations have 1..max-turns exchanges")
    args = ap.parse_args()
    tok = byte_tokenizer()
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=320, block_size=args.context, pos="rope")
    model = build_model(cfg, seed=0)
    examples = [encode_example(tok, r, args.context) for r in conversations(args.rows, args.max_turns)]
    variants = {
        "padded (one per row)": pack(examples, args.context, pack=False),
        "packed": pack(examples, args.context),
    }
    with torch.no_grad():
        losses = {k: sum(float(sft_loss(model, g)[0]) for g in chunks(v, args.batch)) for k, v in variants.items()}
    a, b = losses.values()
    assert abs(a - b) / abs(a) < 1e-4, losses  # the same sum of losses either way
    times = {k: [] for k in variants}
    for _ in range(args.reps):  # alternate the two every repetition
        for k, rows in variants.items():
            times[k].append(epoch(model, rows, args.batch))
    tokens = sum(len(x) for x, _ in examples)
    print(f"{args.rows} conversations, {tokens:,} tokens, context {args.context}, batch {args.batch} rows, "
          f"median of {args.reps}\n")  # fmt: skip
    print("| layout | rows | padding | epoch (s) | tokens/s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = statistics.median(times["padded (one per row)"])
    for k, rows in variants.items():
        computed = sum(max(len(r[0]) for r in g) * len(g) for g in chunks(rows, args.batch))
        t = statistics.median(times[k])
        print(f"| {k} | {len(rows)} | {1 - tokens / computed:.0%} | {t:.2f} | {tokens / t:,.0f} | {base / t:.2f}× |")


if __name__ == "__main__":
    main()
