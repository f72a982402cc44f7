"""Supervised fine-tuning on chat data (InstructGPT step 1).

Rows of a JSONL file, either {"prompt": str, "response": str[, "system": str]} or
{"messages": [{"role": "system|user|assistant", "content": str}, …]}, render with the tokenizer's
chat template. The loss is on the assistant's tokens only, including each turn's closing <|end|>,
which the model thereby learns to emit (so generation stops). Examples are packed into rows of the
context length with per-document attention masks and positions, so no token sees another
conversation and packing changes nothing but speed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.model import GPT
from gptstack.posttrain.common import (
    SkipRow,
    StageConfig,
    StageRun,
    load_start,
    max_len_of,
    maybe_lora,
    optimize,
    read_jsonl,
    split,
)


@dataclass
class SFTConfig(StageConfig):
    """supervised fine-tuning on chat JSONL: assistant-only loss, packing without cross-document attention"""

    pack: bool = True  # several conversations per row, attention kept within each
    lr: float = 5e-5


def messages_of(row: dict) -> list[dict]:
    """The conversation a row describes; SkipRow when it has no assistant turn to learn from."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise SkipRow("messages is not a list of objects")
    elif "prompt" in row or "response" in row:
        msgs = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
            {"role": "user", "content": row.get("prompt")},
            {"role": "assistant", "content": row.get("response")},
        ]
    else:
        raise SkipRow("neither messages nor prompt/response")
    if not any(m.get("role") == "assistant" and isinstance(m.get("content"), str) and m["content"] for m in msgs):
        raise SkipRow("no assistant turn")
    return msgs


def encode_example(tokenizer, row: dict, max_len: int, encode_chat=None) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one conversation; targets are -1 where the loss does not apply.
    `encode_chat(messages) -> (ids, assistant mask)`: another encoding (images: vision.encode_image_chat)."""
    try:
        ids, mask = (encode_chat or tokenizer.encode_chat)(messages_of(row))
    except ValueError as e:
        raise SkipRow(f"bad message ({str(e).split(':')[0]})") from None
    if len(ids) - 1 > max_len:
        raise SkipRow("longer than the context")
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]
    return ids[:-1], targets


def pack(examples: list[tuple[list[int], list[int]]], max_len: int, pack: bool = True) -> list[tuple]:
    """Rows (inputs, targets, segments) of at most max_len tokens, filled best-fit decreasing (each
    example, longest first, goes to the fullest row it still fits). Without packing, one example per
    row, in order."""
    if not pack:
        return [(inp, tgt, [0] * len(inp)) for inp, tgt in examples]
    bins: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(examples)), key=lambda j: -len(examples[j][0])):
        n = len(examples[i][0])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
            bins[row].append(i)
            bisect.insort(free, (room - n, row))
        else:
            bins.append([i])
            bisect.insort(free, (max_len - n, len(bins) - 1))
    rows = []
    for members in bins:
        inp, tgt, seg = [], [], []
        for k, i in enumerate(members):
            inp, tgt, seg = inp + examples[i][0], tgt + examples[i][1], seg + [k] * len(examples[i][0])
        rows.append((inp, tgt, seg))
    return rows


def collate(rows: list[tuple], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad rows to (B, T): padding gets target -1 and a segment of its own."""
    T = max(len(r[0]) for r in rows)
    idx = torch.tensor([r[0] + [0] * (T - len(r[0])) for r in rows], device=device)
    tgt = torch.tensor([r[1] + [-1] * (T - len(r[1])) for r in rows], device=device)
    seg = torch.tensor([r[2] + [max(r[2]) + 1] * (T - len(r[2])) for r in rows], device=device)
    return idx, tgt, seg


def sft_loss(model: GPT, rows: list[tuple], embeds=None) -> tuple[torch.Tensor, float, dict[str, float]]:
    """Summed cross-entropy over the assistant tokens of the rows, their count, and metrics. `embeds`
    (where, rows): rows spliced in at the collated batch's placeholder positions (image features)."""
    idx, tgt, seg = collate(rows, model.lm_head.weight.device)
    logits = model(idx, segments=seg, embeds=embeds)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-1, reduction="sum")
    n = int((tgt >= 0).sum())
    correct = ((logits.argmax(-1) == tgt) & (tgt >= 0)).sum()
    return loss, n, {"loss": float(loss.detach()), "acc": float(correct)}


def stop_rate(model: GPT, rows: list[dict], max_tokens: int = 64) -> float:
    """The fraction of held-out prompts whose greedy reply ends with <|end|> within max_tokens (or
    what the context leaves)."""
    tok = model.tokenizer
    prompts = []
    for row in rows:
        msgs = messages_of(row)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(tok.encode_chat(msgs[:last], add_generation_prompt=True)[0])
    prompts = [p for p in prompts if len(p) < model.config.block_size]
    if not prompts:
        return float("nan")
    max_tokens = min(max_tokens, model.config.block_size - max(len(p) for p in prompts))
    engine = Engine(model, EngineConfig(max_seqs=min(32, len(prompts))), tokenizer=tok)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return sum(o.finish_reason == "stop" for o in outs) / len(outs)


def sft(cfg: SFTConfig) -> dict:
    """Run SFT; returns the summary (also in the checkpoint's config.json and the report)."""
    model = load_start(cfg)
    max_len = max_len_of(cfg, model)
    raw, skipped = read_jsonl(cfg.data, lambda row: (row, encode_example(model.tokenizer, row, max_len)))
    train_rows, eval_rows = split(raw, cfg.eval_fraction, cfg.seed)
    train = pack([ex for _, ex in train_rows], max_len, cfg.pack)
    held = pack([ex for _, ex in eval_rows], max_len, cfg.pack)
    maybe_lora(model, cfg)
    run = StageRun(cfg, "sft", model)

    def evaluate() -> dict[str, float]:
        total, n = 0.0, 0
        for i in range(0, len(held), cfg.batch_size):
            loss, k, _ = sft_loss(model, held[i : i + cfg.batch_size])
            total, n = total + float(loss), n + k
        return {"loss": total / max(n, 1)}

    steps = optimize(model, train, lambda rows: sft_loss(model, rows), run, evaluate if held else None)
    last = run.records[-1]
    summary = {
        "train_examples": len(train_rows), "eval_examples": len(eval_rows), "packed_rows": len(train),
        "skipped": sum(skipped.values()), **{f"skipped: {k}": v for k, v in skipped.items()}, "steps": steps,
        "train_loss": last["loss"], "eval_loss": last.get("eval_loss", float("nan")),
        "eval_stop_rate": stop_rate(model, [r for r, _ in eval_rows][:32]) if eval_rows else float("nan"),
    }  # fmt: skip
    run.finish(summary, plots=[("loss", ["loss", "eval_loss"])])
    return summary
