"""Chain of thought, controlled: the same small model trained from scratch on the same number of tokens of
synthetic multi-step arithmetic, once with the answer alone and once with the reasoning trace, then
scored on held-out problems with the eval's own math path (gptstack/eval/cot.py): greedy accuracy and
maj@16 / pass@16 over 16 samples.

A problem is a chain of 3-5 operations mod 10, applied left to right from a start digit:

    Question: 7+4*2+5
    Answer: #### 7                                                          (direct)
    Answer: Let's think step by step. 7+4=1 1*2=2 2+5=7 The answer is 7.   (chain of thought)

Each step is one of 180 facts (a+b, a*b mod 10, for a digit a and b in 1-9), but the direct answer
composes 3-5 of them in one forward pass. The held-out questions never occur in either training set.
Byte-level tokens, so every digit and operator is one token. On a shared CPU, run with `nice -n 10`
and OMP_NUM_THREADS=1 (two threads contending with other jobs ran 10-20x slower here).

    OMP_NUM_THREADS=1 python benchmarks/bench_cot.py --out runs/bench-cot --tokens 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

from gptstack.checkpoint import load_model
from gptstack.data.shards import write_texts
from gptstack.eval.cot import Sampling, cot_demonstration, run_cot
from gptstack.eval.scorer import Scorer
from gptstack.eval.tasks import Task, demonstration
from gptstack.tokenizer import byte_tokenizer
from gptstack.train.config import TrainConfig
from gptstack.train.loop import pretrain

OPS = {"+": lambda a, b: (a + b) % 10, "*": lambda a, b: (a * b) % 10}


def problem(rng: random.Random) -> dict:
    """One chain: a math task record (context, chain_of_thought, answer)."""
    x = rng.randrange(10)
    question, steps = str(x), []
    for _ in range(rng.randint(3, 5)):
        op, b = rng.choice("+*"), rng.randint(1, 9)
        y = OPS[op](x, b)
        question += f"{op}{b}"
        steps.append(f"{x}{op}{b}={y}")
        x = y
    return {"context": question, "chain_of_thought": " ".join(steps), "answer": str(x)}


def problems(n: int, seed: int) -> list[dict]:
    """n distinct problems."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        p = problem(rng)
        if p["context"] not in seen:
            out.append(p)
            seen.add(p["context"])
    return out


def documents(held_out: set[str], tokens: int, cot: bool, seed: int) -> list[str]:
    """Training documents of one format, about `tokens` bytes (+ one end-of-text each) in all."""
    direct = Task("arith", "math", [])
    texts, total, rng = [], 0, random.Random(seed)
    while total < tokens:
        p = problem(rng)
        if p["context"] in held_out:
            continue
        text = cot_demonstration(p) if cot else demonstration(direct, {**p, "chain_of_thought": ""})
        texts.append(text)
        total += len(text.encode()) + 1
    return texts


def train(out: Path, texts: list[str], tokens: int) -> tuple[Path, float]:
    """Pretrain the small model on `texts` for `tokens` tokens; the checkpoint and the wall time."""
    ckpt = out / "run" / "checkpoints" / "latest"
    if ckpt.exists():
        return ckpt, float("nan")
    shutil.rmtree(out, ignore_errors=True)
    write_texts(out / "data", byte_tokenizer(), texts)
    cfg = TrainConfig(
        data=str(out / "data"), out=str(out / "run"),
        model=dict(vocab_size=320, block_size=128, n_layer=4, n_head=4, n_embd=64, pos="rope"),
        batch_size=16, seq_len=128, max_tokens=tokens, lr=3e-3, warmup_tokens=tokens // 20, weight_decay=0.0,
        checkpoint_every=0, eval_every=0, sample_prompts=[], tensorboard=False, progress=False, device="cpu",
    )  # fmt: skip
    start = time.perf_counter()
    pretrain(cfg)
    return ckpt, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/bench-cot"))
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens of each model (the same budget)")
    p.add_argument("--items", type=int, default=200, help="held-out problems")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args()
    test = problems(args.items, seed=1)
    held_out = {r["context"] for r in test}
    task = Task("arith_chain", "math", test)
    rows = {}
    for name, cot in (("direct", False), ("chain of thought", True)):
        folder = args.out / ("cot" if cot else "direct")
        texts = documents(held_out, args.tokens, cot, seed=2 + cot)
        ckpt, wall = train(folder, texts, args.tokens)
        model = load_model(ckpt)
        start = time.perf_counter()
        sampling = Sampling(cot=cot, samples=args.samples, temperature=args.temperature)
        metrics, items = run_cot(Scorer(model, model.tokenizer), task, sampling, max_gen_tokens=64)
        rows[name] = metrics | {"problems_trained": len(texts), "train_s": wall, "eval_s": time.perf_counter() - start,
                                "load": os.getloadavg()[0]}  # fmt: skip
        (folder / "samples.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
        print(name, json.dumps(rows[name]), flush=True)
    k = args.samples
    print(f"\n{args.items} held-out chains of 3-5 ops mod 10; {args.tokens:,} training tokens per model; "
          f"{k} samples at temperature {args.temperature}\n")  # fmt: skip
    print(f"| training text | problems seen | greedy | maj@{k} | pass@1 | pass@{k} | no majority | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        print(f"| {name} | {m['problems_trained']:,} | {m['acc']:.3f} | {m[f'maj@{k}']:.3f} | {m['pass@1']:.3f} "
              f"| {m[f'pass@{k}']:.3f} | {m['no_majority']} | {m['train_s']:.0f} |")  # fmt: skip
    (args.out / "cot.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
