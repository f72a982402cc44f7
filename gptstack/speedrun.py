"""`gptstack speedrun`: the main job as one command, with a report card.

    summary = speedrun(SpeedrunConfig(out="runs/speedrun", budget="10m"))
    print(results_table(summary))

Six stages, each a call into the library, each writing its artifact inside the run folder:

    1 tokenizer  BPE on the input (default: the Python standard library)     tokenizer/
    2 data       the data pipeline: filters, PII, dedup, shards              data/
    3 pretrain   the preset for what the budget leaves (train/loop.py)       checkpoints/, metrics.jsonl, loss.png
    4 eval       perplexity and bits/byte of the val split, the eval tasks    eval.json, calibration.png
                 found locally (scored on `task_limit` items), contamination
    5 sft        SFT on the built-in stdlib chat set (posttrain/chatset.py)   chat.jsonl, sft/step-*/
    6 chat       before/after figures of the SFT on held-out prompts, and   chat.json
                 a chat sample through the inference engine

`speedrun.json` records each stage's settings, the outputs it was built from, a digest of its own
output, its wall time and its key figures. A stage is skipped when its record says done, its settings
and inputs are unchanged and its output is still there with the same digest; so a rerun of a finished
run only prints the results, and deleting an artifact redoes that stage and whatever its new output
changes downstream. A stage that must start over (new settings or inputs) has its artifacts removed
first; otherwise data preparation and pretraining resume from what they left (the pipeline's chunk
cache, the trainer's newest checkpoint: a run killed mid-pretraining continues it exactly).

The budget is wall-clock time for the whole run. The stages before pretraining are measured as they
run; eval and chat are given EVAL_SHARE of the budget and SFT `sft_share` (sized in steps from the
pretraining speed). Pretraining gets the rest, divided by 1 + TRAIN_OVERHEAD because its own budget
counts training steps only, not evaluations, samples and saves.

`report.md` is rebuilt at the end of each run from the records: a summary table (wall time and
headline per stage), then one section per stage, the pretraining and evaluation ones written by those
stages' own report writers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gptstack import checkpoint
from gptstack.config import ConfigError
from gptstack.data.pipeline import PrepareConfig, format_stats, run_prepare
from gptstack.data.shards import atomic_write
from gptstack.data.vocab import TokenizerEvalConfig, TokenizerTrainConfig, eval_tokenizers, train_tokenizer
from gptstack.eval.run import EvalConfig, evaluate, write_report
from gptstack.eval.tasks import TaskError, resolve_task
from gptstack.infer.chat import CHAT_SAMPLING, chat
from gptstack.infer.load import LoadConfig, load_engine
from gptstack.infer.sampling import SamplingParams
from gptstack.posttrain.chatset import write_chat_set
from gptstack.posttrain.common import read_jsonl, split
from gptstack.posttrain.sft import SFTConfig, encode_example, messages_of, pack, sft, sft_loss
from gptstack.report import write_section
from gptstack.train.config import make_config, parse_budget
from gptstack.train.loop import pretrain
from gptstack.train.report import write_pretrain_report

TASKS = ("arc_easy", "copa", "piqa", "hellaswag", "winogrande", "lambada_openai")
EVAL_SHARE = 0.1  # of the budget, kept for evaluation and the chat stage
TRAIN_OVERHEAD = 0.1  # pretraining's evaluations, samples and saves, beyond its budget of training steps
MIN_PRETRAIN_SHARE = 0.1  # pretraining gets at least this share of the budget, however long the rest took
SFT_BATCH = 16  # packed rows per SFT step
REPLY_TOKENS = 40  # longest greedy reply to a held-out prompt
TITLE = "# gptstack speedrun: report card"


@dataclass
class SpeedrunConfig:
    out: str = "runs/speedrun"  # the run folder: every stage's artifacts, speedrun.json and report.md
    budget: str = "10m"  # wall-clock time for the whole run (90s, 10m, 2h); pretraining gets what the rest leaves
    input: list[str] = field(default_factory=list)  # files or folders (default: the Python standard library)
    vocab_size: int = 4096  # tokenizer ids, special tokens included
    preset: str = "tiny"  # the model preset to pretrain (see `gptstack info`)
    overrides: list[str] = field(default_factory=list)  # pretraining key=value settings, as `pretrain --set`
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # eval task names or files; missing ones are skipped
    task_limit: int = 100  # items scored per eval task
    chat_data: str | None = None  # SFT conversations, JSONL (default: the built-in stdlib chat set)
    sft_share: float = 0.1  # share of the budget for SFT training (sized in steps from the pretraining speed)
    sft_lr: float = 1e-3  # SFT peak learning rate
    chat_prompt: str = "What does `shutil.copyfile` do?"  # the chat sample's question
    held_out: int = 32  # held-out chat-set prompts answered before and after SFT
    workers: int | None = None  # data pipeline processes (default: one per core)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where to train and generate (auto: cuda when available)
    seed: int = 0  # seed of the SFT order and the chat sample
    progress: bool = True  # progress bars on stderr


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]  # stages whose output this one is built from
    keys: tuple[str, ...]  # SpeedrunConfig fields that change its output
    artifacts: tuple[str, ...]  # what it writes, relative to the run folder (removed when it starts over)
    resumable: bool  # continues from its own partial artifacts (else starts over)
    run: Callable[[Run], dict]  # does the work; returns the figures (with a one-line "headline")
    output: Callable[[Run], str | None]  # digest of its complete output, None when missing or partial
    section: Callable[[Run, dict], None]  # writes its section of report.md from its record


class Run:
    """One invocation on a run folder: the config, the paths, the records and the clock."""

    def __init__(self, cfg: SpeedrunConfig):
        seconds = parse_budget(cfg.budget)
        if seconds is None:
            raise ConfigError(f"the speedrun budget must be a duration like 90s, 10m or 2h, not {cfg.budget!r}")
        self.cfg, self.budget_s, self.out = cfg, seconds, Path(cfg.out)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        self.state_path = self.out / "speedrun.json"
        if not self.state_path.is_file() and self.out.is_dir() and any(self.out.iterdir()):
            raise ConfigError(f"{self.out} holds files but no speedrun.json: choose another --out for the speedrun")
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"stages": {}}
        self.started = time.monotonic()

    def path(self, name: str) -> Path:
        return self.out / name

    def record(self, stage: str) -> dict:
        return self.state["stages"].get(stage) or {}

    def figures(self, stage: str) -> dict:
        return self.record(stage).get("figures", {})

    def spent(self, stages: tuple[str, ...]) -> float:
        """Recorded wall seconds of the given stages."""
        return sum(self.record(s).get("seconds", 0.0) for s in stages)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, json.dumps(self.state, indent=2).encode())

    def say(self, text: str) -> None:
        print(f"speedrun {clock(time.monotonic() - self.started)} │ {text}", file=sys.stderr, flush=True)


def speedrun(cfg: SpeedrunConfig) -> dict:
    """Run (or resume, or skip) every stage, rebuild report.md, and return the summary (see results_table)."""
    run = Run(cfg)
    run.out.mkdir(parents=True, exist_ok=True)
    run.say(f"{run.out} · budget {clock(run.budget_s)} · device {run.device} · {len(STAGES)} stages")
    ran = [stage.name for k, stage in enumerate(STAGES, 1) if do_stage(run, k, stage)]
    write_card(run)
    run.say(f"report card: {run.path('report.md')}")
    return summary_of(run, ran)


def do_stage(run: Run, k: int, stage: Stage) -> bool:
    """Skip the stage if its record is current (see module docstring), else run it; True when it ran."""
    rec = run.record(stage.name)
    settings = {key: getattr(run.cfg, key) for key in stage.keys}
    inputs = {need: run.record(need).get("output") for need in stage.needs}
    start_over = rec.get("config") != settings or rec.get("inputs") != inputs
    head = f"[{k}/{len(STAGES)}] {stage.name}"
    if not start_over and rec.get("done") and stage.output(run) == rec.get("output"):
        run.say(f"{head} · done earlier in {clock(rec['seconds'])} · {rec['figures']['headline']}")
        return False
    if start_over or not stage.resumable:
        for name in stage.artifacts:
            remove(run.path(name))
    run.state["stages"][stage.name] = {"config": settings, "inputs": inputs, "done": False}
    run.save()
    run.say(f"{head} · {'resuming' if rec and not start_over and stage.resumable else 'starting'}")
    t0 = time.monotonic()
    figures = stage.run(run)
    seconds = time.monotonic() - t0
    run.state["stages"][stage.name].update(done=True, seconds=seconds, figures=figures, output=stage.output(run))
    run.save()
    run.say(f"{head} · done in {clock(seconds)} · {figures['headline']}")
    return True


# ---- 1. tokenizer ------------------------------------------------------------------------------------


def run_tokenizer(run: Run) -> dict:
    """Train the BPE into a temporary folder renamed into place (tokenizer/ is complete or absent), then
    score bytes per token on the held-out documents against cl100k_base."""
    tmp = run.path(".tmp") / "tokenizer"
    remove(tmp)
    tok, info = train_tokenizer(TokenizerTrainConfig(str(tmp), list(run.cfg.input), run.cfg.vocab_size))
    os.replace(tmp, run.path("tokenizer"))
    remove(run.path(".tmp"))
    scores = eval_tokenizers(TokenizerEvalConfig(list(run.cfg.input), f"{run.path('tokenizer')},cl100k_base"))
    ours, stock = scores[0]["bytes_per_token"], scores[1]["bytes_per_token"]
    return {
        "n_vocab": tok.n_vocab, "train_mb": info["megabytes"], "train_seconds": info["seconds"],
        "heldout_mb": scores[0]["bytes"] / 1e6, "bytes_per_token": ours, "cl100k_bytes_per_token": stock,
        "headline": f"{tok.n_vocab:,} ids, {ours:.2f} bytes/token on held-out text (cl100k_base {stock:.2f})",
    }  # fmt: skip


def section_tokenizer(run: Run, f: dict) -> None:
    rows = [("ids", f"{f['n_vocab']:,}"), ("trained on", f"{f['train_mb']:.1f} MB in {f['train_seconds']:.1f} s"),
            ("held-out text", f"{f['heldout_mb']:.1f} MB"), ("bytes/token, ours", f"{f['bytes_per_token']:.3f}"),
            ("bytes/token, cl100k_base", f"{f['cl100k_bytes_per_token']:.3f}")]  # fmt: skip
    write_section(run.path("report.md"), "speedrun-tokenizer", "## Tokenizer\n\n" + table(rows))


# ---- 2. data -----------------------------------------------------------------------------------------


def run_data(run: Run) -> dict:
    cfg = PrepareConfig(out=str(run.path("data")), inputs=list(run.cfg.input), tokenizer=str(run.path("tokenizer")))
    manifest = run_prepare(cfg, workers=run.cfg.workers, progress=run.cfg.progress)  # PrepareError if nothing is kept
    splits = manifest["splits"]
    if not splits["train"]["tokens"]:
        raise ValueError(f"the data pipeline kept no training text ({run.path('data')}); see its filter counts")
    read = sum(s["documents_read"] for s in manifest["sources"].values())
    kept = sum(s["documents_kept"] for s in manifest["sources"].values())
    return {
        "documents_read": read, "documents_kept": kept, "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits.get("val", {}).get("tokens", 0),
        "headline": f"{kept:,} of {read:,} documents kept, {splits['train']['tokens']:,} training tokens",
    }  # fmt: skip


def output_data(run: Run) -> str | None:
    folder = run.path("data")
    if not (folder / "manifest.json").is_file():
        return None
    manifest = json.loads((folder / "manifest.json").read_text())
    files = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    if not all((folder / f).is_file() for f in files):
        return None
    return text_digest(manifest["fingerprint"] + json.dumps(manifest["splits"], sort_keys=True))


def section_data(run: Run, f: dict) -> None:
    manifest = json.loads((run.path("data") / "manifest.json").read_text())
    write_section(run.path("report.md"), "speedrun-data", "## Data\n\n" + format_stats(manifest))


# ---- 3. pretraining ----------------------------------------------------------------------------------


def pretrain_seconds(run: Run) -> float:
    """The pretraining budget: what the total leaves after the measured stages and the shares kept for the
    later ones, less the trainer's own overhead (see module docstring)."""
    left = run.budget_s * (1 - EVAL_SHARE - run.cfg.sft_share) - run.spent(("tokenizer", "data"))
    return max(left / (1 + TRAIN_OVERHEAD), MIN_PRETRAIN_SHARE * run.budget_s)


def run_pretrain(run: Run) -> dict:
    seconds = pretrain_seconds(run)
    own = {o.partition("=")[0] for o in run.cfg.overrides}
    length = None if own & {"budget", "max_steps", "max_tokens"} else f"{seconds:.0f}s"
    cfg = make_config(
        None, run.cfg.preset, ["checkpoint_minutes=1", *run.cfg.overrides], data=str(run.path("data")),
        out=str(run.out), budget=length, device=run.device, progress=run.cfg.progress,
    )  # fmt: skip
    if length:
        run.say(f"pretraining budget {clock(seconds)} of training steps")
    s = pretrain(cfg, resume=True)
    keep = ("params", "steps", "tokens", "train_seconds", "tokens_per_s", "mfu", "final_loss", "val_loss", "val_bpb")
    val = f", val {s['val_loss']:.3f} nats/token, {s['val_bpb']:.3f} bits/byte" if "val_loss" in s else ""
    return {
        **{k: s[k] for k in keep if k in s}, "checkpoint": s["checkpoint"], "summary": s,
        "headline": f"{s['params']['total']:,} parameters, {s['steps']:,} steps, {s['tokens']:,} tokens{val}",
    }  # fmt: skip


PRETRAIN_FILES = ("checkpoints", "metrics.jsonl", "train_config.json", "loss.png", "tb")  # the trainer's run folder


def output_pretrain(run: Run) -> str | None:
    return weights_digest(run.path("checkpoints"))


def section_pretrain(run: Run, f: dict) -> None:
    write_pretrain_report(run.out, f["summary"])


# ---- 4. evaluation -----------------------------------------------------------------------------------


def eval_config(run: Run, tasks: list[str]) -> EvalConfig:
    data = str(run.path("data"))
    return EvalConfig(
        str(run.path("checkpoints")), tasks=tasks, limit=run.cfg.task_limit, out=str(run.path("eval.json")),
        perplexity=[data], contamination=data if tasks else None, report=str(run.path("report.md")),
        calibration_plot=str(run.path("calibration.png")) if tasks else None, progress=run.cfg.progress,
    )  # fmt: skip


def run_eval(run: Run) -> dict:
    """Perplexity of the val split, the tasks found locally, and their contamination against the shards."""
    found, missing = [], []
    for spec in (t for entry in run.cfg.tasks for t in entry.split(",") if t):  # `--tasks a,b` as eval takes it
        try:
            resolve_task(spec)
            found.append(spec)
        except TaskError:
            missing.append(spec)
    if missing:
        run.say(f"eval tasks not found, skipped: {', '.join(missing)} (set $GPTSTACK_TASKS to a folder of task files)")
    results = evaluate(eval_config(run, found))
    ppl = next(iter(results["perplexity"].values()))
    accs = {name: m["acc"] for name, m in results.get("tasks", {}).items()}
    dirty = {name: c["dirty"] for name, c in results.get("contamination", {}).items()}
    core = f", CORE {results['core']:+.3f} over {len(accs)} tasks" if accs else ", no eval tasks found"
    return {
        "perplexity": ppl["perplexity"], "bpb": ppl["bpb"], "tasks": found, "missing": missing, "acc": accs,
        "core": results.get("core"), "dirty": dirty,
        "headline": f"val perplexity {ppl['perplexity']:.1f}, {ppl['bpb']:.3f} bits/byte{core}",
    }  # fmt: skip


def section_eval(run: Run, f: dict) -> None:
    results = json.loads(run.path("eval.json").read_text())
    write_report(run.path("report.md"), results, eval_config(run, f["tasks"]))
    if f["missing"]:
        note = f"Tasks not found locally, skipped: {', '.join(f['missing'])}."
        write_section(run.path("report.md"), "speedrun-eval", note)


# ---- 5. SFT ------------------------------------------------------------------------------------------


def sft_config(run: Run, steps: int = 0) -> SFTConfig:
    data = run.cfg.chat_data or str(run.path("chat.jsonl"))
    return SFTConfig(
        init=str(run.path("checkpoints")), data=data, out=str(run.out), lr=run.cfg.sft_lr, batch_size=SFT_BATCH,
        max_steps=steps, warmup_steps=max(1, steps // 20), seed=run.cfg.seed, device=run.device,
        progress=run.cfg.progress,
    )  # fmt: skip


def held_out(cfg: SFTConfig, tokenizer, max_len: int) -> list[tuple[dict, tuple]]:
    """The (row, example) pairs sft() holds out of cfg.data: the same parse, skips and seeded split."""
    raw, _ = read_jsonl(cfg.data, lambda row: (row, encode_example(tokenizer, row, max_len)))
    return split(raw, cfg.eval_fraction, cfg.seed)[1]


@torch.no_grad()
def held_out_loss(model, pairs: list[tuple[dict, tuple]], max_len: int) -> float:
    """Mean loss per assistant token on the held-out conversations (as sft() evaluates it)."""
    rows, total, n = pack([ex for _, ex in pairs], max_len), 0.0, 0
    for i in range(0, len(rows), SFT_BATCH):
        loss, k, _ = sft_loss(model, rows[i : i + SFT_BATCH])
        total, n = total + float(loss), n + k
    return total / max(n, 1)


def run_sft(run: Run) -> dict:
    """SFT sized to its share of the budget at the pretraining speed; the held-out loss before it comes
    from the pretrained model, the one after from sft()'s own summary."""
    if not run.cfg.chat_data:
        write_chat_set(run.path("chat.jsonl"))
    context = run.figures("pretrain")["summary"]["model"]["block_size"]
    rate = run.figures("pretrain")["tokens_per_s"]
    steps = max(1, round(run.cfg.sft_share * run.budget_s * rate / (SFT_BATCH * context)))
    cfg = sft_config(run, steps)
    base = checkpoint.load_model(cfg.init, device=run.device)
    before = held_out_loss(base.eval(), held_out(cfg, base.tokenizer, context), context)
    del base
    s = sft(cfg)
    after = s["eval_loss"]
    return {
        "steps": steps, "loss_before": before, "loss_after": after, "summary": s,
        "checkpoint": str(checkpoint.resolve(run.path("sft"))),
        "headline": f"{s['train_examples']:,} conversations, {steps} steps, held-out loss {before:.3f} → {after:.3f}",
    }  # fmt: skip


def output_sft(run: Run) -> str | None:
    return weights_digest(run.path("sft"))


def section_sft(run: Run, f: dict) -> None:
    s = f["summary"]
    rows = [(k, fmt(v)) for k, v in s.items()]
    rows.insert(
        0, ("held-out loss per assistant token, before → after", f"{f['loss_before']:.4f} → {f['loss_after']:.4f}")
    )
    cfg = sft_config(run)
    body = f"## SFT\n\nFrom `{cfg.init}` on `{cfg.data}`; checkpoint `{f['checkpoint']}`.\n\n"
    body += table(rows)
    if run.path("sft/loss.png").is_file():
        body += "\n\n![SFT loss](sft/loss.png)"
    write_section(run.path("report.md"), "sft", body)


# ---- 6. chat -----------------------------------------------------------------------------------------


def answer(engine, pairs: list[tuple[dict, tuple]]) -> list[dict]:
    """Greedy replies to the held-out conversations, each cut before its last assistant turn: the reply,
    whether it ended with the end-of-turn token, and whether it is that turn (the known answer) exactly."""
    cut = []  # (messages before the answer, the answer, the row's kind)
    for row, _ in pairs:
        msgs = messages_of(row)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        cut.append((msgs[:last], msgs[last]["content"], row.get("kind", "")))
    prompts = [engine.tokenizer.encode_chat(before, add_generation_prompt=True)[0] for before, _, _ in cut]
    room = min(REPLY_TOKENS, engine.context - max(len(p) for p in prompts))
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=room))
    replies = []
    for (before, known, kind), out in zip(cut, outs, strict=True):
        reply = out.text.strip()
        replies.append({"prompt": before[-1]["content"], "answer": known, "kind": kind, "reply": reply,
                        "stopped": out.finish_reason == "stop", "exact": reply == known.strip()})  # fmt: skip
    return replies


def rates(replies: list[dict]) -> dict:
    """Stop rate and exact-answer rate, overall and per kind of question."""
    out = {"stopped": float(np.mean([r["stopped"] for r in replies])),
           "exact": float(np.mean([r["exact"] for r in replies]))}  # fmt: skip
    for kind in sorted({r["kind"] for r in replies} - {""}):
        out[f"exact: {kind}"] = float(np.mean([r["exact"] for r in replies if r["kind"] == kind]))
    return out


def run_chat(run: Run) -> dict:
    """The held-out prompts answered by the pretrained and the SFT model, then one chat turn."""
    sft_ckpt = run.figures("sft")["checkpoint"]
    figures: dict = {}
    for name, path in (("before", run.path("checkpoints")), ("after", sft_ckpt)):
        engine = load_engine(LoadConfig(str(path), device=run.device))
        replies = answer(engine, held_out(sft_config(run), engine.tokenizer, engine.context)[: run.cfg.held_out])
        figures[name], figures[f"{name}_replies"] = rates(replies), replies[:4]
    lines, sink = iter([run.cfg.chat_prompt]), io.StringIO()
    params = replace(CHAT_SAMPLING, max_tokens=64, seed=run.cfg.seed)
    messages = chat(engine, params, lambda: next(lines, None), sink)
    figures["sample"] = {"prompt": run.cfg.chat_prompt, "reply": messages[-1]["content"]}
    atomic_write(run.path("chat.json"), json.dumps(figures, indent=2).encode())
    b, a = figures["before"], figures["after"]
    figures["headline"] = (f"held-out replies ending with <|end|> {b['stopped']:.0%} → {a['stopped']:.0%}, "
                           f"exact answers {b['exact']:.0%} → {a['exact']:.0%}")  # fmt: skip
    return figures


def section_chat(run: Run, f: dict) -> None:
    b, a = f["before"], f["after"]
    rows = [(k, f"{b[k]:.0%} → {a[k]:.0%}") for k in a]
    intro = (f"{run.cfg.held_out} held-out prompts of the chat set, greedy replies of the pretrained model (before) "
             "and the SFT model (after); `stopped`: the reply ended with the end-of-turn token, `exact`: it is the "
             "known answer.")  # fmt: skip
    body = ["## Chat", "", intro, "", table(rows, ("held-out prompts", "before → after")), ""]
    transcript = []
    for r in f["after_replies"]:
        transcript += [f"user> {r['prompt']}", f"assistant> {r['reply']}", f"(known answer: {r['answer']})", ""]
    s = f["sample"]
    transcript += [f"user> {s['prompt']}", f"assistant> {s['reply']}"]
    body += ["Held-out replies after SFT, then a chat sample (temperature 0.8):", "", "```", *transcript, "```"]
    write_section(run.path("report.md"), "speedrun-chat", "\n".join(body))


# ---- the stages, the summary and the report card ---------------------------------------------------


def folder_output(name: str) -> Callable[[Run], str | None]:
    return lambda run: file_digest(run.path(name))


STAGES = (
    Stage("tokenizer", needs=(), keys=("input", "vocab_size"), artifacts=("tokenizer",), resumable=False,
          run=run_tokenizer, output=folder_output("tokenizer"), section=section_tokenizer),
    Stage("data", needs=("tokenizer",), keys=("input",), artifacts=("data",), resumable=True,
          run=run_data, output=output_data, section=section_data),
    Stage("pretrain", needs=("data",), keys=("preset", "overrides", "budget"), artifacts=PRETRAIN_FILES,
          resumable=True, run=run_pretrain, output=output_pretrain, section=section_pretrain),
    Stage("eval", needs=("pretrain",), keys=("tasks", "task_limit"), artifacts=("eval.json", "calibration.png"),
          resumable=False, run=run_eval, output=folder_output("eval.json"), section=section_eval),
    Stage("sft", needs=("pretrain",), keys=("chat_data", "sft_share", "sft_lr", "budget", "seed"),
          artifacts=("chat.jsonl", "sft"), resumable=False, run=run_sft, output=output_sft, section=section_sft),
    Stage("chat", needs=("sft",), keys=("chat_prompt", "held_out", "seed"), artifacts=("chat.json",),
          resumable=False, run=run_chat, output=folder_output("chat.json"), section=section_chat),
)  # fmt: skip


def summary_of(run: Run, ran: list[str]) -> dict:
    """What speedrun() returns: per stage its wall time and figures (the same on a rerun that skips all),
    which stages ran in this call, and where the report and checkpoints are."""
    stages = {name: {"seconds": rec["seconds"], "figures": rec["figures"]} for name, rec in run.state["stages"].items()}
    return {
        "out": str(run.out), "report": str(run.path("report.md")), "budget_s": run.budget_s, "stages": stages,
        "total_s": sum(s["seconds"] for s in stages.values()), "ran": ran,
        "checkpoint": stages["pretrain"]["figures"]["checkpoint"],
        "sft_checkpoint": stages["sft"]["figures"]["checkpoint"],
    }  # fmt: skip


def results_table(summary: dict) -> str:
    """The summary as a markdown table: stage, wall time, headline (what the command prints)."""
    rows = [(f"{k}. {name}", clock(s["seconds"]), s["figures"]["headline"])
            for k, (name, s) in enumerate(summary["stages"].items(), 1)]  # fmt: skip
    rows.append(("total", clock(summary["total_s"]), f"budget {clock(summary['budget_s'])}"))
    return table(rows, ("stage", "wall time", "key figures"), "---|---:|---|")


def write_card(run: Run) -> None:
    """report.md from scratch: the summary, then each stage's section from its record."""
    report = run.path("report.md")
    remove(report)
    summary = summary_of(run, [])
    machine = f"{os.cpu_count()} cores, {run.device}, Python {platform.python_version()}, torch {torch.__version__}"
    head = ["## Summary", "", f"Run folder `{run.out}`, budget {clock(run.budget_s)}; {machine}.", "",
            results_table(summary), "", "Run the same command again to resume, or to print this."]  # fmt: skip
    write_section(report, "speedrun", "\n".join(head), title=TITLE)
    for stage in STAGES:
        stage.section(run, run.figures(stage.name))


# ---- small helpers -----------------------------------------------------------------------------------


def clock(seconds: float) -> str:
    """90 → '1m30s', 3725 → '1h02m05s', 7.2 → '7.2s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[tuple], header: tuple[str, ...] = ("", ""), align: str = "") -> str:
    """A markdown table; `align` is its rule line without the leading '|' (default: all left)."""
    lines = ["| " + " | ".join(header) + " |", "|" + (align or "---|" * len(header))]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str | None:
    """SHA-256 over a file, or over a folder's files (names and bytes); None when it does not exist."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def weights_digest(folder: Path) -> str | None:
    """The newest checkpoint under `folder`: its step and weights' SHA-256 (from its config.json)."""
    if not folder.is_dir() or not checkpoint.list_checkpoints(folder):
        return None
    _, meta = checkpoint.read_meta(folder)
    return f"{meta['step']}:{meta['files']['model.safetensors']['sha256']}"
