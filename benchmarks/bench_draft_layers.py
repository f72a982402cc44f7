"""Can part of SmolLM2 be its own draft? Teacher-forced agreement of layer-subset drafts, untrained and distilled.

A speculative draft pays only when its greedy token is the target's on most proposals (about 70% for a draft
that costs half a target step, see docs/BENCHMARKS.md). This script measures that agreement before building
a draft into the engine: SmolLM2-135M-Instruct (fp32) answers BoolQ passages greedily (the prompts of
bench_speculative.py), and for each answer position the draft's argmax is compared with the target's, the
answer given as context (teacher forcing: the acceptance of a one-token proposal).

1. Untrained subsets of the target's 30 blocks, with its final norm and head (early exit, layer skipping).
2. Cached-prefix distillation: the target's first P blocks frozen (their output is cached once per sequence),
   then T trainable blocks (copies of the target's last T), a trainable final norm and the frozen tied head,
   trained on the KL divergence to the target's next-token distribution at every answer position and a sample
   of the passage's positions, on the target's answers to other BoolQ items (from item 212 on; the held-out
   items are 200..211, none of them evaluated by bench_speculative.py, which takes the first ones).

    python benchmarks/bench_draft_layers.py                          # both parts: P = 8, 12; T = 2; 300 steps
    python benchmarks/bench_draft_layers.py --parts subsets          # part 1 only (about 1 minute)
    python benchmarks/bench_draft_layers.py --quick                  # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time

import torch
import torch.nn.functional as F
from bench_speculative import BOOLQ, INSTRUCTION, smollm2_path
from torch import Tensor

from gptstack.checkpoint import load_model
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.model import GPT
from gptstack.posttrain.distill import chat_prompt, read_prompts

SUBSETS = {
    "all 30 (the target)": list(range(30)),
    "first 4": list(range(4)),
    "first 8": list(range(8)),
    "first 15": list(range(15)),
    "first 20": list(range(20)),
    "every other (15)": list(range(0, 30, 2)),
    "first 10 + last 5": list(range(10)) + list(range(25, 30)),
    "first 8 + last 4": list(range(8)) + list(range(26, 30)),
    "first 12 + last 8": list(range(12)) + list(range(22, 30)),
    "two of every three (20)": [i for i in range(30) if i % 3 != 1],
}


def answers(model: GPT, skip: int, items: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, the target's greedy answer of up to 64 tokens) for BoolQ items [skip, skip + items)."""
    prompts = [chat_prompt(model.tokenizer, t, INSTRUCTION) for t in read_prompts(BOOLQ, items, skip=skip)]
    engine = Engine(model, EngineConfig(max_seqs=16, kv_memory="1GiB"), tokenizer=model.tokenizer)
    done = engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0))
    return [(p, c.token_ids) for p, c in zip(prompts, done, strict=True)]


def run_blocks(model: GPT, blocks, x: Tensor) -> Tensor:
    """x (B, L, D) through `blocks` at positions 0..L-1 → (B, L, D)."""
    rope = model.rope_at(torch.arange(x.size(1)))
    for block in blocks:
        x, _ = block(x, rope, None, None)
    return x


@torch.no_grad()
def subset_agreement(model: GPT, rows, keep: list[int]) -> float:
    """Share of answer positions where the subset's argmax (blocks `keep`, the final norm, the head) is the target's."""
    hit = n = 0
    for p, a in rows:
        x = run_blocks(model, [model.transformer.h[i] for i in keep], model.transformer.wte(torch.tensor([p + a[:-1]])))
        pred = model.lm_head(model.transformer.ln_f(x[0, len(p) - 1 :])).argmax(-1)  # (len(a),)
        hit, n = hit + int((pred == torch.tensor(a)).sum()), n + len(a)
    return hit / n


@torch.no_grad()
def cache_rows(model: GPT, rows, P: int) -> list[tuple[Tensor, Tensor, int]]:
    """Per sequence: the input of block P (L, D) and the target's final normalised features (L, D), bf16, and the
    prompt length."""
    out = []
    for p, a in rows:
        x = model.transformer.wte(torch.tensor([p + a[:-1]]))
        xp = run_blocks(model, model.transformer.h[:P], x)
        h = model.transformer.ln_f(run_blocks(model, model.transformer.h[P:], xp))
        out.append((xp[0].bfloat16(), h[0].bfloat16(), len(p)))
    return out


@torch.no_grad()
def top_agreement(model: GPT, top, ln, rows) -> float:
    W, hit, n = model.transformer.wte.weight, 0, 0
    for xp, h, lp in rows:
        f = ln(run_blocks(model, top, xp[None].float()))[0, lp - 1 :]
        hit += int(((f @ W.T).argmax(-1) == (h[lp - 1 :].float() @ W.T).argmax(-1)).sum())
        n += f.size(0)
    return hit / n


def distill_top(model: GPT, train, held, P: int, T: int, steps: int, lr: float, prompt_positions: int) -> list:
    """Train T top blocks over the cached first P; returns [(step, loss, held-out agreement, seconds)]."""
    top = torch.nn.ModuleList([copy.deepcopy(model.transformer.h[i]) for i in range(30 - T, 30)])
    ln = copy.deepcopy(model.transformer.ln_f)
    params = [q.requires_grad_(True) for q in [*top.parameters(), *ln.parameters()]]
    opt, rng, W = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95)), random.Random(0), model.transformer.wte.weight
    log, t0 = [(0, float("nan"), top_agreement(model, top, ln, held), 0.0)], time.perf_counter()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        batch = rng.sample(train, 4)
        x = torch.zeros(len(batch), max(r[0].size(0) for r in batch), W.size(1))  # (B, L, D), right-padded
        for i, (xp, _, _) in enumerate(batch):
            x[i, : xp.size(0)] = xp.float()
        f = ln(run_blocks(model, top, x))
        sel = [  # sampled passage positions and every answer position, per sequence
            torch.cat([torch.randperm(lp - 1)[:prompt_positions], torch.arange(lp - 1, xp.size(0))])
            for xp, _, lp in batch
        ]
        student = torch.cat([f[i, s] for i, s in enumerate(sel)]) @ W.T  # (n, V)
        with torch.no_grad():
            teacher = torch.cat([h[s].float() for (_, h, _), s in zip(batch, sel, strict=True)]) @ W.T
        loss = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % max(1, steps // 6) == 0 or step == steps:
            log.append((step, float(loss.detach()), top_agreement(model, top, ln, held), time.perf_counter() - t0))
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="subsets,distill")
    ap.add_argument("--train-items", type=int, default=96)
    ap.add_argument("--held-items", type=int, default=12)
    ap.add_argument("--prefix", default="8,12", help="frozen blocks P of the distilled drafts")
    ap.add_argument("--top", type=int, default=2, help="trained blocks T")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--prompt-positions", type=int, default=160, help="passage positions scored per sequence")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.train_items, args.held_items, args.steps, args.prefix = 8, 2, 6, "8"
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = load_model(str(smollm2_path()), require_tokenizer=True)
    held = answers(model, 200, args.held_items)
    print(f"held out: {len(held)} items, {sum(len(a) for _, a in held)} answer tokens")
    if "subsets" in args.parts:
        print("\n| draft (blocks of the target, its final norm and head) | blocks | agreement |\n| --- | ---: | ---: |")
        for name, keep in SUBSETS.items():
            print(f"| {name} | {len(keep)} | {subset_agreement(model, held, keep):.3f} |", flush=True)
    if "distill" in args.parts:
        train = answers(model, 212, args.train_items)
        print(f"\ntraining: {len(train)} items, {sum(len(a) for _, a in train)} answer tokens")
        print("\n| P frozen + T trained | step | KL (train batch) | held-out agreement | train s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for P in map(int, args.prefix.split(",")):
            tr, he = cache_rows(model, train, P), cache_rows(model, held, P)
            log = distill_top(model, tr, he, P, args.top, args.steps, args.lr, args.prompt_positions)
            for step, loss, agree, sec in log:
                print(f"| {P} + {args.top} | {step} | {loss:.3f} | {agree:.3f} | {sec:.0f} |", flush=True)


if __name__ == "__main__":
    main()
