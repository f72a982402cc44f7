"""The roof of evaluation: `gptstack eval` on one checkpoint.

    results = evaluate(EvalConfig("runs/x/checkpoints/latest", tasks=["copa", "arc_easy"], shots=5))

loads the checkpoint into a Scorer (scorer.py) and runs each task (tasks.run_task), then gathers what
the GPT papers report over them: the CORE-style centred accuracy averaged over tasks, calibration of
the multiple-choice answers (calibration.py, GPT-4 figure 8), with a shard folder the accuracy on the
items whose 13-grams are not in its training split (GPT-3 §4), and the perplexity and bits per byte of
text files (perplexity.py, GPT-2 §3.1). The results are returned as a dict, and written as JSON,
per-item JSONL, a reliability diagram and a section of the run's report.md. The files are strict JSON
(RFC 8259 has no NaN): a value that is not a finite number, such as the accuracy on zero clean items,
is written as null.

The imports point one way: scorer ← tasks, perplexity, calibration ← run; nothing imports this module
but the command line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gptstack.checkpoint import resolve
from gptstack.data.contamination import contamination_report, item_text, shard_documents
from gptstack.eval.calibration import choice_probs, plot_reliability, reliability
from gptstack.eval.cot import Sampling, run_cot
from gptstack.eval.perplexity import perplexity, read_documents
from gptstack.eval.scorer import BATCH_TOKENS, MAX_GEN_TOKENS, Scorer, load_scorer
from gptstack.eval.tasks import FEWSHOT_SEED, Task, TaskError, TaskResult, resolve_task, run_task, task_metrics
from gptstack.eval.vqa import load_vqa, run_vqa, split_specs, vqa_markdown
from gptstack.report import write_section


@dataclass
class EvalConfig:
    checkpoint: str  # checkpoint folder, run folder, or …/latest
    tasks: list[str] = field(default_factory=list)  # task files or names, comma lists too ($GPTSTACK_TASKS, data/eval)
    shots: int = 0  # in-context examples per item (drawn from the same task)
    limit: int | None = None  # score only the first N items of each task
    out: str | None = None  # write the results as JSON
    tokenizer: str | None = None  # override the checkpoint's tokenizer: a stock name | DIR | CKPT | FILE.gguf
    perplexity: list[str] = field(default_factory=list)  # text file, folder of texts, or shard folder (val) to score
    stride: int | None = None  # perplexity: tokens predicted per window (default: the context)
    contamination: str | None = None  # also score the items clean of this shard folder's 13-grams
    calibration_plot: str | None = None  # write the reliability diagram (PNG)
    log_samples: str | None = None  # write every item's scores and outcome (JSONL)
    report: str | None = None  # report.md to append to (default: the checkpoint's run report)
    seed: int = FEWSHOT_SEED  # few-shot example sampling
    batch_tokens: int = BATCH_TOKENS  # tokens per scoring batch
    max_gen_tokens: int = MAX_GEN_TOKENS  # bound on generated tokens (GSM8K, HumanEval)
    unsafe_exec: bool = False  # run generated code (HumanEval) WITHOUT isolation where bubblewrap is unavailable
    progress: bool = True  # progress bars on stderr
    cot: bool = False  # math tasks (GSM8K): the chain-of-thought prompt ("Let's think step by step.")
    samples: int = 1  # math tasks: K sampled generations per item besides the greedy one (maj@K, pass@K)
    temperature: float = 0.7  # sampling temperature of the --samples generations
    top_p: float = 1.0  # nucleus sampling of the --samples generations
    blind: bool = False  # vqa:FILE tasks: also answer every item with its images removed (the text-only baseline)

    def sampling(self) -> Sampling | None:
        """How math tasks generate: None for the plain greedy direct answer (no --cot, one sample)."""
        if not self.cot and self.samples == 1:
            return None
        return Sampling(self.cot, self.samples, self.temperature, self.top_p, self.seed)

    def task_specs(self) -> list[str]:
        """`tasks` with comma lists split (`--tasks copa,piqa --tasks arc_easy`)."""
        return [t for spec in self.tasks for t in spec.split(",") if t]


def evaluate(cfg: EvalConfig) -> dict:
    """`gptstack eval`: tasks and/or perplexity on a checkpoint, written as JSON (+ per-item JSONL,
    reliability PNG) and as a section of the run report. Every task file is checked before any scoring."""
    vqa_files, specs = split_specs(cfg.task_specs())  # vqa:FILE tasks (eval/vqa.py) are read here, run below
    tasks = [resolve_task(t) for t in specs]
    if cfg.blind and not vqa_files:
        raise TaskError("--blind applies to vqa tasks (--tasks vqa:FILE.jsonl), and none was given")
    vqa = load_vqa(cfg.checkpoint, vqa_files, cfg.blind, cfg.limit) if vqa_files else None
    if not tasks and not cfg.perplexity and vqa is None:
        raise ValueError("nothing to evaluate: give --tasks and/or --perplexity")
    if len({t.name for t in tasks}) < len(tasks):
        raise ValueError("two tasks have the same name")
    sampling = cfg.sampling()
    if sampling is not None and not any(t.kind == "math" for t in tasks):
        raise TaskError("--cot and --samples apply to math tasks (e.g. --tasks gsm8k), and none was given")
    scorer = load_scorer(cfg.checkpoint, cfg.tokenizer, batch_tokens=cfg.batch_tokens, progress=cfg.progress)
    results: dict = {}
    if tasks:
        results = run_tasks(scorer, tasks, cfg.shots, cfg.limit, cfg.seed, cfg.contamination, cfg.max_gen_tokens,
                            unsafe_exec=cfg.unsafe_exec, sampling=sampling)  # fmt: skip
    if cfg.perplexity:
        results["perplexity"] = {str(t): perplexity(scorer, read_documents(t), cfg.stride) for t in cfg.perplexity}
    results["checkpoint"] = str(cfg.checkpoint)
    items = results.pop("items", {})
    if vqa is not None:
        results["vqa"], vqa_items = run_vqa(scorer.model, scorer.tokenizer, vqa, cfg.max_gen_tokens, cfg.progress)
        items |= vqa_items
    if cfg.log_samples:
        write_samples(items, cfg.log_samples)
    if cfg.calibration_plot and "calibration" in results:
        plot_reliability(results["calibration"], cfg.calibration_plot)
    if cfg.out:
        write_json(results, cfg.out)
    report = Path(cfg.report) if cfg.report else run_report_of(cfg.checkpoint)
    if report is not None:
        write_report(report, results, cfg)
        results["report"] = str(report)
    return results


def run_tasks(
    scorer: Scorer, tasks: list[Task], shots: int = 0, limit: int | None = None, seed: int = FEWSHOT_SEED,
    contamination: str | None = None, max_gen_tokens: int = MAX_GEN_TOKENS, exec_timeout: float = 10.0,
    unsafe_exec: bool = False, sampling: Sampling | None = None,
) -> dict:  # fmt: skip
    """Run `tasks` and gather the results: per task its metrics, the CORE-style centred accuracy
    averaged over tasks, calibration over the multiple-choice answers, and with a shard folder
    `contamination`, accuracy on the items whose 13-grams are not in its training split (GPT-3 §4).
    `items` holds every task's per-item outcomes."""
    results, items = {}, {}
    for task in tqdm(tasks, desc="tasks", unit="task", disable=not scorer.progress):
        if sampling is not None and task.kind == "math":  # chain of thought / self-consistency (cot.py)
            m, its = run_cot(scorer, task, sampling, shots, limit, max_gen_tokens)
            r = TaskResult(task.name, task.kind, shots, task_metrics(task, its) | m, its)
        else:
            r = run_task(scorer, task, shots, limit, seed, max_gen_tokens, exec_timeout, unsafe_exec)
        results[task.name], items[task.name] = r.metrics | {"kind": r.kind, "shots": shots}, r.items
    out: dict = {"shots": shots, "seed": seed, "tasks": results}
    if results:
        out["core"] = float(np.mean([m["centered"] for m in results.values()]))
    mc = [it for t in tasks if t.kind in ("mc", "schema") for it in items[t.name]]
    if mc:
        probs = [choice_probs(it["logliks"]) for it in mc]
        out["calibration"] = reliability(np.array([p.max() for p in probs]), np.array([it["correct"] for it in mc]))
    if contamination:
        out["contamination"] = contamination_split(contamination, tasks, items)
    out["truncated_requests"] = scorer.truncated
    out["items"] = items
    return out


def contamination_split(shards: str, tasks: list[Task], items: dict[str, list[dict]]) -> dict:
    """Per task: how many scored items are dirty against the shard folder's train split, and the
    accuracy on all of them and on the clean ones."""
    report = contamination_report(shard_documents(shards), {t.name: [item_text(r) for r in t.records] for t in tasks})
    out = {}
    for t in tasks:
        dirty = set(report[t.name]["dirty_items"])
        scored = items[t.name]
        clean = [it["correct"] for it in scored if it["index"] not in dirty]
        out[t.name] = {
            "ngram": report[t.name]["ngram"], "items": len(scored), "dirty": len(scored) - len(clean),
            "acc_all": float(np.mean([it["correct"] for it in scored])) if scored else float("nan"),
            "acc_clean": float(np.mean(clean)) if clean else float("nan"), "clean_items": len(clean),
        }  # fmt: skip
    return out


# ---- writing the results ------------------------------------------------------------------------


def finite(value):
    """`value` with every float that is not finite (NaN, ±inf) replaced by None, in nested dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(results: dict, path: str | Path) -> None:
    """The results as strict JSON (non-finite numbers as null), written whole or not at all."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(finite(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_samples(items: dict[str, list[dict]], path: str | Path) -> None:
    """One strict JSON line per scored item: {"task": name, **its outcome}."""
    with open(path, "w", encoding="utf-8") as f:
        for name, rows in items.items():
            for row in rows:
                f.write(json.dumps(finite({"task": name, **row}), allow_nan=False) + "\n")


def run_report_of(checkpoint: str | Path) -> Path | None:
    """RUN/report.md for a checkpoint at RUN/checkpoints/step-N (or RUN itself), else None (a GGUF file)."""
    if Path(checkpoint).is_file():
        return None
    folder = resolve(checkpoint)
    for run in (folder.parent.parent, folder.parent, folder):
        if (run / "checkpoints").is_dir() or (run / "report.md").is_file():
            return run / "report.md"
    return None


def write_report(report: Path, results: dict, cfg: EvalConfig) -> None:
    """The results as the report section `eval-Kshot`, with the reliability diagram when it sits next to it."""
    body = "## Evaluation\n\n" + markdown(results, f"{Path(str(cfg.checkpoint)).name}, {cfg.shots}-shot")
    plot = cfg.calibration_plot
    if plot and "calibration" in results and Path(plot).parent == report.parent:
        body += f"\n\n![reliability diagram]({Path(plot).name})"
    write_section(report, f"eval-{cfg.shots}shot", body)


def markdown(results: dict, title: str = "") -> str:
    """The results as a markdown table (+ contamination and calibration lines when present)."""
    lines = [f"### {title}", ""] if title else []
    if results.get("tasks"):
        lines += ["| task | kind | shots | items | acc | acc_norm | random | centred |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in results.get("tasks", {}).items():
        norm = f"{m['acc_norm']:.4f}" if "acc_norm" in m else ""
        lines.append(f"| {name} | {m['kind']} | {m['shots']} | {m['items']} | {m['acc']:.4f} | {norm} "
                     f"| {m['random']:.4f} | {m['centered']:+.4f} |")  # fmt: skip
    for name, m in results.get("tasks", {}).items():
        if "pass@1" in m and m["kind"] == "math":  # self-consistency over the sampled generations
            extra = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith(("maj@", "pass@")))
            lines += ["", f"{name}: greedy {m['acc']:.4f}, {extra}"]
    if "core" in results:
        lines += ["", f"CORE-style centred accuracy (mean over tasks): **{results['core']:+.4f}**"]
    if "calibration" in results:
        c = results["calibration"]
        lines += [f"Calibration over {c['items']:,} multiple-choice answers: ECE {c['ece']:.4f} "
                  f"(mean confidence {c['mean_confidence']:.3f}, accuracy {c['accuracy']:.3f})"]  # fmt: skip
    if results.get("contamination"):
        lines += ["", "| task | n-gram | dirty | acc (all) | acc (clean) |", "|---|---:|---:|---:|---:|"]
        for name, c in results["contamination"].items():
            lines.append(f"| {name} | {c['ngram']} | {c['dirty']}/{c['items']} | {c['acc_all']:.4f} "
                         f"| {c['acc_clean']:.4f} |")  # fmt: skip
    if results.get("perplexity"):
        lines += ["", "| text | documents | tokens | bytes | nats/token | perplexity | bits/byte |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, p in results["perplexity"].items():
            lines.append(f"| {name} | {p['documents']} | {p['tokens']:,} | {p['bytes']:,} | {p['nll']:.4f} "
                         f"| {p['perplexity']:.3f} | {p['bpb']:.4f} |")  # fmt: skip
    lines += vqa_markdown(results.get("vqa", {}))
    if results.get("truncated_requests"):
        lines += ["", f"{results['truncated_requests']} requests were longer than the context and lost tokens "
                      "on the left."]  # fmt: skip
    return "\n".join(lines)
