"""Pretraining speed and quality against a `transformers` loop: nanoGPT's README CPU recipe on Tiny
Shakespeare, character level (4 layers, 4 heads, 128 wide, context 64, batch 12, lr 1e-3 with 100
warm-up iterations and cosine decay to 1e-4, β2 0.99, no dropout).

Both loops run in this process on the same batches (our TokenLoader, first 90% of the text for
training as nanoGPT splits it) and are scored on the same validation windows (the last 10%).

    python benchmarks/bench_pretrain.py                 # 2000 iterations, 2 threads (the CI machine's cores)
    python benchmarks/bench_pretrain.py --iters 300     # quick look
    python benchmarks/bench_pretrain.py --compile       # also a torch.compile run of ours
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptstack.data.loader import TokenLoader
from gptstack.data.shards import write_token_arrays
from gptstack.tokenizer import train_chars
from gptstack.train.config import TrainConfig
from gptstack.train.loop import Trainer
from gptstack.train.metrics import read_metrics
from gptstack.train.optim import lr_at

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False, dropout=0.0)
B, T, LR, MIN_RATIO, WARMUP_ITERS, BETAS, WD = 12, 64, 1e-3, 0.1, 100, (0.9, 0.99), 0.1


def make_shards(folder: Path) -> tuple[Path, int]:
    text = SHAKESPEARE.read_text()
    tok = train_chars([text], name="shakespeare-chars")
    ids = np.array(tok.encode(text), dtype=np.int64)
    n = int(0.9 * len(ids))
    write_token_arrays(folder, tok, {"train": ids[:n], "val": ids[n:]})
    return folder, tok.n_vocab


def val_windows(shards: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every full (B, T) window of the val split: the same for both loops."""
    loader = TokenLoader(shards, B, T, "val")
    return [loader.next_batch() for _ in range((loader.total - 1) // (B * T))]


@torch.no_grad()
def val_loss(forward, windows) -> float:
    total = 0.0
    for x, y in windows:
        total += F.cross_entropy(forward(x).flatten(0, 1), y.flatten()).item()
    return total / len(windows)


def run_ours(shards: Path, vocab: int, iters: int, out: Path, compile_: bool, seed: int = 1337) -> dict:
    cfg = TrainConfig(seed=seed,
        data=str(shards), out=str(out), model={"vocab_size": vocab, **SHAPE}, batch_size=B, seq_len=T,
        max_steps=iters, lr=LR, min_lr_ratio=MIN_RATIO, warmup_tokens=WARMUP_ITERS * B * T,
        decay_tokens=iters * B * T, beta2=BETAS[1], weight_decay=WD, grad_clip=1.0, compile=compile_,
        eval_every=0, eval_batches=1, sample_prompts=[], checkpoint_every=0, checkpoint_minutes=0,
        progress=False, tensorboard=False,
    )  # fmt: skip
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    records = read_metrics(out / "metrics.jsonl")
    step_s = [r["batch_tokens"] / r["tokens_per_s"] for r in records[10:]]  # skip warm-up / compilation
    model = trainer.base.eval()
    return {"step_s": statistics.median(step_s), "wall_s": wall, "final_loss": records[-1]["loss"],
            "val_loss": val_loss(model, val_windows(shards)), "mfu": statistics.median(r["mfu"] for r in records[10:]),
            "peak": trainer.peak_source}  # fmt: skip


def run_transformers(shards: Path, vocab: int, iters: int, seed: int = 1337) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=T, n_embd=SHAPE["n_embd"], n_layer=SHAPE["n_layer"],
                        n_head=SHAPE["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    loader = TokenLoader(shards, B, T, "train")
    times, loss = [], float("nan")
    t_start = time.perf_counter()
    for it in range(iters):
        t0 = time.perf_counter()
        lr = lr_at((it + 1) * B * T, LR, WARMUP_ITERS * B * T, iters * B * T, MIN_RATIO)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = loader.next_batch()
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    model.eval()
    score = val_loss(lambda x: model(input_ids=x).logits, val_windows(shards))
    return {"step_s": statistics.median(times[10:]), "wall_s": wall, "final_loss": loss.item(), "val_loss": score,
            "mfu": math.nan}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also run ours with torch.compile")
    ap.add_argument("--seeds", type=int, default=1, help="repeat both loops with this many init seeds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards, vocab = make_shards(Path(tmp) / "shards")
        print(f"Tiny Shakespeare, {vocab} character ids, {args.iters} iterations of {B}×{T} tokens, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}", file=sys.stderr)  # fmt: skip
        for seed in range(1337, 1337 + args.seeds):
            runs.setdefault("transformers GPT2LMHeadModel", []).append(
                run_transformers(shards, vocab, args.iters, seed)
            )
            out = Path(tmp) / f"eager-{seed}"
            runs.setdefault("gptstack (eager)", []).append(run_ours(shards, vocab, args.iters, out, False, seed))
            if args.compile:
                out = Path(tmp) / f"compiled-{seed}"
                runs.setdefault("gptstack (torch.compile)", []).append(
                    run_ours(shards, vocab, args.iters, out, True, seed)
                )
    rows = {name: {k: statistics.median(r[k] for r in rs) if k != "peak" else rs[0][k] for k in rs[0]}
            for name, rs in runs.items()}  # fmt: skip
    if args.seeds > 1:
        for name, rs in runs.items():
            print(f"{name}: val loss per seed " + ", ".join(f"{r['val_loss']:.3f}" for r in rs), file=sys.stderr)
    base = rows["transformers GPT2LMHeadModel"]["step_s"]
    print(f"medians over {args.seeds} seed(s)")
    print("| loop | ms/iter (median) | tokens/s | × transformers | wall s | final train loss | val loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {1000 * r['step_s']:.1f} | {B * T / r['step_s']:,.0f} | {base / r['step_s']:.2f} "
              f"| {r['wall_s']:.0f} | {r['final_loss']:.3f} | {r['val_loss']:.3f} |")  # fmt: skip
    ours = rows["gptstack (eager)"]
    print(f"\nMFU of gptstack (eager): {ours['mfu']:.1%} of {ours['peak']}")


if __name__ == "__main__":
    main()
