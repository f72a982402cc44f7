"""In-context learning, measured: train a small byte-level model on the synthetic episode mixture
(gptstack/eval/synthetic.py) on the CPU, then score the unseen-rule task files at 0/1/2/4/8 shots with
the task runner. Prints the accuracy table and writes icl.png.

    python benchmarks/bench_icl.py --out runs/bench-icl --tokens 8000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from gptstack.checkpoint import list_checkpoints, load_model
from gptstack.data.shards import write_texts
from gptstack.eval.harness import Scorer
from gptstack.eval.synthetic import FAMILIES, training_text, write_tasks
from gptstack.eval.tasks import load_task, run_task
from gptstack.tokenizer import byte_tokenizer
from gptstack.train.loop import TrainConfig, pretrain

SHOTS = (0, 1, 2, 4, 8)


def plot(table: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accs in table.items():
        ax.plot(SHOTS, accs, "o-", label=name)
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
    ax.set_xlabel("in-context examples (k)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("accuracy vs shots on rules never seen in training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/bench-icl"))
    p.add_argument("--tokens", type=int, default=8_000_000)
    p.add_argument("--episodes", type=int, default=40_000)
    p.add_argument("--items", type=int, default=200, help="items per task file")
    args = p.parse_args()
    tok = byte_tokenizer()
    if not (args.out / "data" / "manifest.json").is_file():
        write_texts(args.out / "data", tok, training_text(args.episodes))
    tasks = [load_task(t) for t in write_tasks(args.out / "tasks", items=args.items)]
    cfg = TrainConfig(
        data=str(args.out / "data"), out=str(args.out / "run"),
        model=dict(vocab_size=320, block_size=256, n_layer=3, n_head=4, n_embd=128, pos="rope"), batch_size=8,
        max_tokens=args.tokens, lr=3e-3, warmup_tokens=args.tokens // 20, checkpoint_every=0, eval_every=0,
        sample_prompts=[], tensorboard=False, progress=False,
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
    print(f"model: 3 layers x 128 (RoPE), {n_params:,} parameters, {args.tokens:,} training tokens "
          f"({train_s:.0f} s); task families: {', '.join(FAMILIES)}; {args.items} items each\n")  # fmt: skip
    print("| task | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |")
    print("|---|" + "---:|" * len(SHOTS))
    for name, accs in table.items():
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    plot(table, args.out / "icl.png")
    (args.out / "icl.json").write_text(json.dumps({"shots": SHOTS, "accuracy": table}, indent=2))
    print(f"\nwrote {args.out / 'icl.png'}")


if __name__ == "__main__":
    main()
