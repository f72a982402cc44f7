"""GPT-1 fine-tuning, measured: pretrain a small byte-level model on Shakespeare (CPU), then on a task
from ../shared/data/eval compare, on the same held-out split, the pretrained model zero-shot (scored
as `gptstack eval` scores it) with the model fine-tuned with `gptstack finetune` (task head on the
extract token, L_task + 0.5·L_LM), and with the majority class. Also fine-tunes with λ = 0 (no
auxiliary LM loss), GPT-1's ablation.

    python benchmarks/bench_finetune.py --out runs/bench-finetune --tokens 3000000 --task boolq
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gptstack.data.shards import write_texts
from gptstack.posttrain.finetune import FinetuneConfig, finetune
from gptstack.tokenizer import byte_tokenizer
from gptstack.train.config import TrainConfig
from gptstack.train.loop import pretrain

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-finetune"))
    ap.add_argument("--tokens", type=int, default=3_000_000, help="pretraining tokens")
    ap.add_argument("--task", default="boolq")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    base = args.out / "base" / "checkpoints"
    start = time.perf_counter()
    if not base.is_dir():
        text = SHAKESPEARE.read_text()
        docs = [text[i : i + 2000] for i in range(0, len(text), 2000)]
        write_texts(args.out / "data", byte_tokenizer(), docs, val_fraction=0.02)
        pretrain(
            TrainConfig(
                data=str(args.out / "data"),
                out=str(args.out / "base"),
                model=dict(vocab_size=320, block_size=256, n_layer=4, n_head=4, n_embd=192, pos="rope"),
                batch_size=16,
                max_tokens=args.tokens,
                lr=2e-3,
                warmup_tokens=args.tokens // 20,
                checkpoint_every=0,
                eval_every=0,
                sample_prompts=[],
                tensorboard=False,
                progress=False,
            )
        )
    pretrain_s = time.perf_counter() - start
    rows = {}
    for lm_coef in (0.5, 0.0):
        t = time.perf_counter()
        rows[lm_coef] = finetune(
            FinetuneConfig(
                init=str(base),
                task=args.task,
                out=str(args.out / f"lm{lm_coef}"),
                lm_coef=lm_coef,
                lr=1e-4,
                batch_size=16,
                epochs=args.epochs,
                limit=args.limit,
                progress=False,
            )
        )
        rows[lm_coef]["seconds"] = round(time.perf_counter() - t, 1)
    s = rows[0.5]
    print(f"pretraining: {args.tokens:,} byte tokens of Shakespeare, {pretrain_s:.0f} s")
    n_train, n_held = s["train_examples"], s["heldout_examples"]
    print(f"task {args.task} ({s['transform']}), {n_train} train / {n_held} held-out items\n")
    print("| model | held-out accuracy |")
    print("| --- | --- |")
    print(f"| pretrained, zero-shot (gptstack eval scoring) | {s['zero_shot_acc']:.3f} |")
    print(f"| majority class | {s['majority_class_acc']:.3f} |")
    print(f"| fine-tuned, λ = 0.5 (L_task + 0.5 L_LM) | {s['finetuned_acc']:.3f} |")
    print(f"| fine-tuned, λ = 0 (no auxiliary LM loss) | {rows[0.0]['finetuned_acc']:.3f} |")
    (args.out / "results.json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
