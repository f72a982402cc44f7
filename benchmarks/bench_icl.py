"""In-context learning, measured: train a small model on the synthetic episode mixture
(gptstack/eval/synthetic.py) on the CPU, with the mixture's own BPE tokenizer and 32-token training
windows, then score the unseen-rule task files at 0/1/2/4/8 shots with the task runner. Prints the
accuracy table next to the chance of each shot count containing the answer, and writes icl.png.

    python benchmarks/bench_icl.py --out runs/bench-icl --tokens 16000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from gptstack.checkpoint import list_checkpoints, load_model
from gptstack.data.shards import read_manifest, write_texts
from gptstack.eval.scorer import Scorer
from gptstack.eval.synthetic import FAMILIES, train_tokenizer, training_text, write_tasks
from gptstack.eval.tasks import EXAMPLE_SEP, load_task, run_task, shots_prefix
from gptstack.tokenizer import get_tokenizer
from gptstack.train.config import TrainConfig
from gptstack.train.loop import pretrain

SHOTS = (0, 1, 2, 4, 8)


def plot(table: dict[str, list[float]], ceilings: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accs in table.items():
        (line,) = ax.plot(SHOTS, accs, "o-", label=name)
        if name in ceilings and name != "icl_copy":
            ax.plot(SHOTS, ceilings[name], ":", color=line.get_color(), label=f"{name}: answer in the shots")
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
    ax.set_xlabel("in-context examples (k)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs shots on rules never seen in training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shown(task, k: int, seed: int = 1234) -> float:
    """Fraction of items whose input appears among their k shots (the runner's own shot draw): the
    accuracy of a model that copies every answer it has seen and guesses none."""
    lines = (shots_prefix(task, i, k, seed).split(EXAMPLE_SEP) for i in range(len(task.records)))
    hits = [any(line.startswith(r["context"] + " ") for line in ls) for r, ls in zip(task.records, lines, strict=True)]
    return sum(hits) / len(hits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/bench-icl"))
    p.add_argument("--tokens", type=int, default=16_000_000)
    p.add_argument("--seq-len", type=int, default=32, help="training window (the plateau grows with it)")
    p.add_argument("--items", type=int, default=200, help="items per task file")
    args = p.parse_args()
    if not (args.out / "data" / "manifest.json").is_file():
        texts = training_text(args.tokens // 25)  # ~37 tokens per episode: each one is seen about once
        write_texts(args.out / "data", train_tokenizer(texts[:20_000]), texts)
    tok = get_tokenizer(args.out / "data" / read_manifest(args.out / "data")["tokenizer"]["folder"])
    tasks = [load_task(t) for t in write_tasks(args.out / "tasks", items=args.items)]
    cfg = TrainConfig(
        data=str(args.out / "data"), out=str(args.out / "run"),
        model=dict(vocab_size=-(-tok.n_vocab // 64) * 64, block_size=128, n_layer=2, n_head=4, n_embd=64, pos="rope"),
        batch_size=2048 // args.seq_len, seq_len=args.seq_len, max_tokens=args.tokens, lr=3e-3,
        warmup_tokens=args.tokens // 20, checkpoint_every=0, eval_every=0, sample_prompts=[], tensorboard=False,
        progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    ckpts = args.out / "run" / "checkpoints"
    if not ckpts.is_dir() or not list_checkpoints(ckpts):
        shutil.rmtree(args.out / "run", ignore_errors=True)
        pretrain(cfg)
    train_s = time.perf_counter() - start
    model = load_model(args.out / "run" / "checkpoints" / "latest")
    scorer = Scorer(model, model.tokenizer)
    table = {t.name: [run_task(scorer, t, shots=k).metrics["acc"] for k in SHOTS] for t in tasks}
    table["mean"] = [sum(table[t.name][i] for t in tasks) / len(tasks) for i in range(len(SHOTS))]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: 2 layers x 64 (RoPE), {n_params:,} parameters, {args.tokens:,} training tokens in "
          f"{args.seq_len}-token windows ({train_s:.0f} s); task families: {', '.join(FAMILIES)}; "
          f"{args.items} items each\n")  # fmt: skip
    print("| task | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |")
    print("|---|" + "---:|" * len(SHOTS))
    for name, accs in table.items():
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    ceilings = {t.name: [shown(t, k) for k in SHOTS] for t in tasks}
    for name, row in ceilings.items():
        print(f"| {name}: answer in the shots | " + " | ".join(f"{a:.3f}" for a in row) + " |")
    plot(table, ceilings, args.out / "icl.png")
    (args.out / "icl.json").write_text(json.dumps({"shots": SHOTS, "accuracy": table, "answer_in_shots": ceilings}))
    print(f"\nwrote {args.out / 'icl.png'}")


if __name__ == "__main__":
    main()
