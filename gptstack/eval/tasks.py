"""In-context evaluation tasks from local files: zero-, one- and few-shot (GPT-2/GPT-3 style).

Task files are JSONL in the DCLM/CORE "local_data" formats (the kind is read from each record's keys):

    multiple choice   {"query" | "context": str, "choices": [str, ...], "gold": int}
    schema            {"context_options": [str, ...], "continuation": str, "gold": int}
    language model    {"context": str, "continuation": str}            (LAMBADA, arithmetic, Jeopardy)
    math              {"context": str, "chain_of_thought": str, "answer": str}           (GSM8K)
    code              {"prompt", "entry_point", "test", "canonical_solution", ...}    (HumanEval)

and HellaSwag's 6-line text layout (`*.txt` or `*.txt.bz2`: context, label, four endings).

Scoring, per kind:
    multiple choice   acc: argmax Σ log p(choice | context); acc_norm: argmax of it divided by the
                      choice's length in characters (lm-eval's acc_norm)
    schema            the continuation scored after each option context; the best option
    language model    acc: the greedy continuation equals the gold one, token for token (LAMBADA:
                      the whole last word)
    math              acc: the number after "####" (else the last number) of a greedy generation
    code              pass@1: the greedy completion passes the task's check() (eval/execution.py: the code in
                      a bubblewrap sandbox, the test in a process of its own)

k-shot: k examples drawn from the same file, excluding the item itself, with a seeded RNG per item (so
results do not depend on --limit or on the order of evaluation), joined by blank lines.
"""

from __future__ import annotations

import bz2
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptstack.eval.execution import Job, Limits, run_jobs, sandboxed
from gptstack.eval.scorer import MAX_GEN_TOKENS, Scorer, encode_pair
from gptstack.files import iter_jsonl

FEWSHOT_SEED = 1234  # which examples a k-shot prompt draws: the one default of run_task, run_tasks and EvalConfig

KINDS = ("mc", "schema", "lm", "math", "code")
CODE_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
MATH_STOP = ("\n\n", "Question:")
EXAMPLE_SEP = "\n\n"


class TaskError(ValueError):
    """A task file or task option that cannot be used, with the file and line."""


@dataclass
class Task:
    name: str
    kind: str
    records: list[dict]
    path: str = ""

    @property
    def random_baseline(self) -> float:
        """Expected accuracy of a uniform random guess (0 for exact match and code)."""
        if self.kind == "mc":
            return float(np.mean([1 / len(r["choices"]) for r in self.records]))
        if self.kind == "schema":
            return float(np.mean([1 / len(r["context_options"]) for r in self.records]))
        return 0.0


# ---- loading -----------------------------------------------------------------------------------------


def _kind(rec: dict, where: str) -> str:
    """The record's kind (see KINDS), after checking the keys and types that kind needs."""
    if "choices" in rec:
        kind, need = "mc", {"choices": list, "gold": int}
        if not isinstance(rec.get("query", rec.get("context")), str):
            raise TaskError(f"{where}: a multiple-choice record needs a string 'query' or 'context'")
    elif "context_options" in rec:
        kind, need = "schema", {"context_options": list, "continuation": str, "gold": int}
    elif "entry_point" in rec:
        kind, need = "code", {"prompt": str, "entry_point": str, "test": str}
    elif "answer" in rec and "context" in rec:
        kind, need = "math", {"context": str, "answer": str}
    elif "continuation" in rec:
        kind, need = "lm", {"context": str, "continuation": str}
    else:
        raise TaskError(f"{where}: unknown record format (keys {sorted(rec)}); see gptstack.eval.tasks for the formats")
    for key, typ in need.items():
        if not isinstance(rec.get(key), typ) or isinstance(rec.get(key), bool):
            raise TaskError(f"{where}: '{key}' must be a {typ.__name__}, got {rec.get(key)!r:.60}")
    options = rec.get("choices", rec.get("context_options"))
    if options is not None:
        if len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise TaskError(f"{where}: needs at least two string choices")
        if not 0 <= rec["gold"] < len(options):
            raise TaskError(f"{where}: gold {rec['gold']} is not an index into {len(options)} choices")
    if kind == "lm" and not rec["continuation"].strip():
        raise TaskError(f"{where}: empty continuation")
    return kind


def _hellaswag(path: Path) -> list[dict]:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings per item)")
    records = []
    for i in range(0, len(lines), 6):
        ctx, label, *endings = lines[i : i + 6]
        if not label.strip().isdigit() or not 0 <= int(label) < 4:
            raise TaskError(f"{path}:{i + 2}: label {label!r} is not 0-3")
        records.append({"query": ctx, "choices": endings, "gold": int(label)})
    return records


def load_task(path: str | Path, name: str | None = None) -> Task:
    """A task file (JSONL, or HellaSwag's text layout); every line is checked before it is used."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    name = name or path.name.split(".")[0]
    if path.name.endswith((".txt", ".txt.bz2")):
        return Task(name, "mc", _hellaswag(path), str(path))
    records, kinds = [], set()
    for where, rec in iter_jsonl(path, TaskError):  # a line that is not a JSON object raises, naming path:line
        kinds.add(_kind(rec, where))
        records.append(rec)
    if not records:
        raise TaskError(f"{path} has no items")
    if len(kinds) > 1:
        raise TaskError(f"{path} mixes record formats {sorted(kinds)}; one task file holds one kind")
    return Task(name, kinds.pop(), records, str(path))


def task_dirs() -> list[Path]:
    """Where task names are looked up: $GPTSTACK_TASKS (os.pathsep-separated), ./data/eval, ../shared/data/eval."""
    env = [Path(p) for p in os.environ.get("GPTSTACK_TASKS", "").split(os.pathsep) if p]
    return [*env, Path("data/eval"), Path("../shared/data/eval")]


def resolve_task(spec: str) -> Task:
    """A task file path, or a name found in task_dirs() (`hellaswag` finds hellaswag_val_full.txt.bz2)."""
    if Path(spec).is_file():
        return load_task(spec)
    for d in task_dirs():
        for cand in (f"{spec}.jsonl", f"{spec}.txt.bz2", f"{spec}.txt", f"{spec}_val_full.txt.bz2"):
            if (d / cand).is_file():
                return load_task(d / cand, name=spec)
    raise TaskError(f"unknown task {spec!r}: not a file, and not found in {', '.join(map(str, task_dirs()))}")


# ---- prompts -----------------------------------------------------------------------------------------


def join(context: str, continuation: str) -> str:
    """context + continuation, with one space between unless either side already has whitespace."""
    if not context or context[-1].isspace() or continuation[:1].isspace():
        return context + continuation
    return context + " " + continuation


def _sep(context: str, continuation: str) -> str:
    """The continuation as it is scored: with its leading space (BPE puts the space in the word's token)."""
    return join(context, continuation)[len(context) :]


def math_prompt(rec: dict) -> str:
    return f"Question: {rec['context']}\nAnswer:"


def demonstration(task: Task, rec: dict) -> str:
    """A solved example, as it appears among the k shots."""
    if task.kind == "mc":
        return join(rec.get("query", rec.get("context")), rec["choices"][rec["gold"]])
    if task.kind == "schema":
        return join(rec["context_options"][rec["gold"]], rec["continuation"])
    if task.kind == "lm":
        return join(rec["context"], rec["continuation"])
    if task.kind == "math":
        cot = rec.get("chain_of_thought", "").strip()
        return f"{math_prompt(rec)} {cot + ' ' if cot else ''}#### {rec['answer']}"
    return rec["prompt"] + rec.get("canonical_solution", "")


def shots_prefix(task: Task, index: int, k: int, seed: int, demo=None) -> str:
    """k solved examples drawn for item `index`, each written by `demo(rec)` (default: demonstration)."""
    if k == 0:
        return ""
    if k > len(task.records) - 1:
        raise TaskError(f"{task.name}: {k} shots asked, but only {len(task.records) - 1} other items to draw from")
    rng = random.Random(f"{seed}:{task.name}:{index}")
    pool = [j for j in rng.sample(range(len(task.records)), min(k + 1, len(task.records))) if j != index][:k]
    demo = demo or (lambda rec: demonstration(task, rec))
    return "".join(demo(task.records[j]) + EXAMPLE_SEP for j in pool)


# ---- answers -----------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return s
    return str(int(x)) if x == int(x) else str(x)


def extract_answer(text: str) -> str | None:
    """GSM8K: the number after '####', else the last number in the text."""
    if "####" in text:
        m = _NUMBER.search(text.split("####", 1)[1])
        return normalize_number(m.group()) if m else None
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def code_job(rec: dict, completion: str) -> Job:
    """A HumanEval item as a sandbox job: the prompt and the completion are the candidate's code; the test
    runs apart from it, with the prompt's helpers, and calls check() on the entry point."""
    return Job(rec["prompt"] + completion, rec["test"], rec["entry_point"], prelude=rec["prompt"])


# ---- running -----------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    name: str
    kind: str
    shots: int
    metrics: dict
    items: list[dict] = field(default_factory=list)  # per item: what was scored and the outcome


def _item_requests(task: Task, rec: dict, prefix: str) -> list[tuple[str, str]]:
    """(context, continuation) string pairs scored for one mc/schema/lm item."""
    if task.kind == "mc":
        ctx = prefix + rec.get("query", rec.get("context"))
        return [(ctx, _sep(ctx, c)) for c in rec["choices"]]
    if task.kind == "schema":
        return [(prefix + o, _sep(prefix + o, rec["continuation"])) for o in rec["context_options"]]
    ctx = prefix + rec["context"]
    return [(ctx, _sep(ctx, rec["continuation"]))]


def run_task(
    scorer: Scorer, task: Task, shots: int = 0, limit: int | None = None, seed: int = FEWSHOT_SEED,
    max_gen_tokens: int = MAX_GEN_TOKENS, exec_timeout: float = 10.0, unsafe_exec: bool = False,
) -> TaskResult:  # fmt: skip
    """Score the first `limit` items of one task at `shots` shots: its metrics and per-item outcomes."""
    indices = list(range(min(limit, len(task.records)) if limit else len(task.records)))
    prefixes = [shots_prefix(task, i, shots, seed) for i in indices]
    if task.kind in ("mc", "schema", "lm"):
        items = _score_choices(scorer, task, indices, prefixes)
    elif task.kind == "math":
        items = _score_math(scorer, task, indices, prefixes, max_gen_tokens)
    else:
        items = _score_code(scorer, task, indices, prefixes, max_gen_tokens, exec_timeout, unsafe_exec)
    return TaskResult(task.name, task.kind, shots, task_metrics(task, items), items)


def _score_choices(scorer: Scorer, task: Task, indices: list[int], prefixes: list[str]) -> list[dict]:
    """mc / schema / lm items: one log-likelihood request per choice (one for lm), all batched together."""
    pairs = [_item_requests(task, task.records[i], p) for i, p in zip(indices, prefixes, strict=True)]
    flat = [encode_pair(scorer.tokenizer, c, x) for ps in pairs for c, x in ps]
    scores = iter(scorer.loglikelihood(flat))
    items: list[dict] = []
    for i, ps in zip(indices, pairs, strict=True):
        rec = task.records[i]
        got = [next(scores) for _ in ps]
        lls = [ll for ll, _ in got]
        if task.kind == "lm":
            items.append({"index": i, "loglik": lls[0], "correct": got[0][1]})
            continue
        pred = int(np.argmax(lls))
        lengths = [len(c) for c in rec["choices"]] if task.kind == "mc" else [1] * len(ps)  # as lm-eval
        pred_norm = int(np.argmax([ll / max(1, n) for ll, n in zip(lls, lengths, strict=True)]))
        items.append({"index": i, "logliks": lls, "gold": rec["gold"], "pred": pred, "pred_norm": pred_norm,
                      "correct": pred == rec["gold"], "correct_norm": pred_norm == rec["gold"]})  # fmt: skip
    return items


def _score_math(scorer: Scorer, task: Task, indices: list[int], prefixes: list[str], max_gen_tokens: int) -> list[dict]:
    """GSM8K-style items: a greedy generation, its extracted number against the answer."""
    tok = scorer.tokenizer
    prompts = [tok.encode_prompt(p + math_prompt(task.records[i])) for i, p in zip(indices, prefixes, strict=True)]
    gens = scorer.generate(prompts, stop=MATH_STOP, max_gen_tokens=max_gen_tokens)
    items = []
    for i, g in zip(indices, gens, strict=True):
        got, want = extract_answer(g.text), normalize_number(task.records[i]["answer"])
        items.append({"index": i, "generation": g.text, "tokens": len(g.token_ids), "finish": g.finish_reason,
                      "extracted": got, "correct": got == want})  # fmt: skip
    return items


def _score_code(
    scorer: Scorer, task: Task, indices: list[int], prefixes: list[str], max_gen_tokens: int, exec_timeout: float,
    unsafe_exec: bool,
) -> list[dict]:  # fmt: skip
    """HumanEval-style items: a greedy completion, run against the item's tests in the sandbox (refused,
    before anything is generated, where there is none and `unsafe_exec` is off)."""
    sandboxed(unsafe_exec)
    tok = scorer.tokenizer
    prompts = [tok.encode_prompt(p + task.records[i]["prompt"]) for i, p in zip(indices, prefixes, strict=True)]
    gens = scorer.generate(prompts, stop=CODE_STOP, max_gen_tokens=max_gen_tokens)
    jobs = [code_job(task.records[i], g.text) for i, g in zip(indices, gens, strict=True)]
    items = []
    for i, g, o in zip(indices, gens, run_jobs(jobs, Limits(timeout=exec_timeout), unsafe_exec), strict=True):
        items.append({"index": i, "generation": g.text, "tokens": len(g.token_ids), "finish": g.finish_reason,
                      "status": o.status, "detail": o.detail, "correct": o.passed})  # fmt: skip
    return items


def task_metrics(task: Task, items: list[dict]) -> dict:
    acc = float(np.mean([it["correct"] for it in items])) if items else float("nan")
    rnd = task.random_baseline
    m = {"items": len(items), "acc": acc, "random": rnd, "centered": (acc - rnd) / (1 - rnd)}
    if task.kind == "mc":
        m["acc_norm"] = float(np.mean([it["correct_norm"] for it in items]))
    if task.kind == "code":
        m["pass@1"] = acc
    return m
