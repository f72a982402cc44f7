"""RLHF and DPO against a programmatic ground truth (gptstack/posttrain/demo.py), end to end on the CPU.

1. SFT a small byte-level model on answers to "Write a Python expression equal to N." (40% of them
   malformed: noisy instruction data);
2. sample two answers per prompt from the SFT model, label each pair with the ground-truth judge
   (0 unless the answer parses as an integer + − × expression, then 0.5 + 0.5 / (1 + |value − N|));
3. train a reward model on those pairs, report its held-out pair accuracy;
4. PPO against the reward model with the KL penalty (β = 0.1), and the same run with β = 0;
   the judge's score of every rollout is logged ("tracked"), never optimised;
5. DPO on the same pairs; the judge's preference rate of DPO samples over SFT samples.
Prints the tables, writes rlhf.png (reward, KL and ground truth against step) and results.json.

    python benchmarks/bench_rlhf.py --out runs/bench-rlhf
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gptstack.checkpoint import load_model, save_checkpoint
from gptstack.config import ModelConfig
from gptstack.model import build_model
from gptstack.posttrain import demo
from gptstack.posttrain.dpo import DPOConfig, dpo
from gptstack.posttrain.ppo import PPOConfig, ppo
from gptstack.posttrain.reward import RewardConfig, train_reward
from gptstack.posttrain.sft import SFTConfig, sft
from gptstack.report import write_section
from gptstack.tokenizer import byte_tokenizer

JUDGE = "rule:gptstack.posttrain.demo:judge"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("reward", "reward-model score"),
        ("kl", "KL to SFT (nats/response)"),
        ("tracked", "ground truth"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (k, title) in zip(axes, keys, strict=True):
        for name, recs in runs.items():
            ax.plot([r["step"] for r in recs], [r[k] for r in recs], label=name)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-rlhf"))
    ap.add_argument("--sft-rows", type=int, default=12000)
    ap.add_argument("--pair-prompts", type=int, default=4000)
    ap.add_argument("--ppo-steps", type=int, default=60)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out, tok = args.out, byte_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    eval_prompts = [r["prompt"] for r in demo.prompt_rows(400, seed=10_000 + args.seed)]

    t = time.perf_counter()
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=320, block_size=96, pos="rope")
    save_checkpoint(build_model(cfg, seed=args.seed), out / "init", tokenizer=tok)
    sft_data = write_jsonl(out / "sft.jsonl", demo.sft_rows(args.sft_rows, seed=args.seed))
    sft(SFTConfig(init=str(out / "init"), data=str(sft_data), out=str(out), lr=2e-3, batch_size=16, epochs=3,
                  warmup_steps=20, progress=False))  # fmt: skip
    sft_model = load_model(out / "sft")
    gt = {"sft": demo.ground_truth(sft_model, eval_prompts, seed=1)}
    times["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    pair_prompts = [r["prompt"] for r in demo.prompt_rows(args.pair_prompts, seed=20_000 + args.seed)]
    pairs = demo.preference_rows(sft_model, pair_prompts, seed=2)
    pref = write_jsonl(out / "preferences.jsonl", pairs)
    rm = train_reward(RewardConfig(init=str(out / "sft"), data=str(pref), out=str(out), lr=5e-4, batch_size=32,
                                   epochs=2, eval_fraction=0.1, progress=False))  # fmt: skip
    times["reward"] = time.perf_counter() - t

    prompts = write_jsonl(out / "prompts.jsonl", demo.prompt_rows(2000, seed=30_000 + args.seed))
    runs = {}
    for name, beta in ((f"PPO β={args.beta}", args.beta), ("PPO β=0", 0.0)):
        t = time.perf_counter()
        run_out = out if beta else out / "beta0"
        ppo(PPOConfig(init=str(out / "sft"), data=str(prompts), out=str(run_out), reward=f"rm:{out / 'reward'}",
                      track=JUDGE, kl_coef=beta, batch_size=64, minibatch_size=16, ppo_epochs=4, lr=5e-5,
                      max_tokens=16, max_steps=args.ppo_steps, seed=args.seed, progress=False))  # fmt: skip
        runs[name] = [json.loads(line) for line in (run_out / "ppo" / "log.jsonl").read_text().splitlines()]
        gt[name] = demo.ground_truth(load_model(run_out / "ppo"), eval_prompts, seed=1)
        times[name] = time.perf_counter() - t

    t = time.perf_counter()
    d = dpo(DPOConfig(init=str(out / "sft"), data=str(pref), out=str(out), beta=0.1, lr=5e-5, batch_size=32,
                      epochs=2, eval_fraction=0.1, progress=False))  # fmt: skip
    dpo_model = load_model(out / "dpo")
    gt["DPO β=0.1"] = demo.ground_truth(dpo_model, eval_prompts, seed=1)
    win = {
        "DPO vs SFT": demo.win_rate(dpo_model, sft_model, eval_prompts, seed=3),
        f"PPO β={args.beta} vs SFT": demo.win_rate(load_model(out / "ppo"), sft_model, eval_prompts, seed=3),
        "PPO β=0 vs SFT": demo.win_rate(load_model(out / "beta0" / "ppo"), sft_model, eval_prompts, seed=3),
        "SFT vs SFT (other seed)": demo.win_rate(sft_model, sft_model, eval_prompts, seed=3),
    }
    times["dpo"] = time.perf_counter() - t
    plot(runs, out / "rlhf.png")

    lines = [f"{len(pairs)} judge-labelled pairs from {args.pair_prompts} prompts; reward model held-out pair "
             f"accuracy {rm['eval_acc']:.3f} (train {rm['train_acc']:.3f}); DPO implicit-reward accuracy "
             f"{d['initial_eval_reward_acc']:.3f} → {d['eval_reward_acc']:.3f} held out, loss "
             f"{d['initial_eval_loss']:.4f} (ln 2 = 0.6931) → {d['eval_loss']:.4f}", ""]  # fmt: skip
    lines += ["| model | ground truth (mean judge score) | exact | parses |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['score']:.3f} | {v['exact']:.3f} | {v['parses']:.3f} |" for k, v in gt.items()]
    lines += [
        "",
        "| PPO run | RM reward, steps 1-5 → last 10 | KL, last 10 (nats) "
        "| ground truth, steps 1-5 → best 10 → last 10 |",
        "| --- | --- | --- | --- |",
    ]
    for name, recs in runs.items():
        first, last = recs[:5], recs[-10:]
        best = max(mean(recs[i : i + 10], "tracked") for i in range(len(recs) - 9))
        lines.append(
            f"| {name} | {mean(first, 'reward'):.3f} → {mean(last, 'reward'):.3f} | {mean(last, 'kl'):.2f} | "
            f"{mean(first, 'tracked'):.3f} → {best:.3f} → {mean(last, 'tracked'):.3f} |"
        )
    lines += ["", "| ground-truth preference rate (ties half) | rate |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in win.items()]
    lines += ["", "| stage | seconds |", "| --- | --- |"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    body = "\n".join(lines)
    print(body)
    write_section(out / "report.md", "rlhf-demo", "## RLHF and DPO against the ground truth\n\n" + body +
                  "\n\n![reward, KL, ground truth](rlhf.png)")  # fmt: skip
    (out / "results.json").write_text(json.dumps({"gt": gt, "win": win, "rm": rm, "dpo": d, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
