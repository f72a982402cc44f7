"""Chain of thought and self-consistency on math tasks (GSM8K): `gptstack eval --tasks gsm8k --cot --samples K`.

    items = run_cot(scorer, task, Sampling(cot=True, samples=8, temperature=0.7), shots=0, limit=50)

Prompt (Kojima et al. 2022's zero-shot trigger; with k shots, each demonstration is the item's
chain of thought without GSM8K's `<<48/2=24>>` calculator notes, then "The answer is N."):

    Question: {question}
    Answer: Let's think step by step.

Each item gets one greedy generation (the `acc` of the task, as without --cot) and, with `samples` K > 1,
K sampled ones (temperature, top_p; sample j of item i has seed `seed + i*K + j`, so a result does not
depend on the batch). The K samples go through the inference engine as one fan-out (`sample_fanout`): an
item's greedy request is added first and its K siblings only once its prompt is in the KV cache, so
they take the prompt's full blocks from the prefix cache instead of recomputing them (vLLM's `n=K`; the
engine's `prefix_hits` counter, reported as `prefix_shared`, shows it).

Answers (`extract_cot`): the number after the first "The answer is", else after "####", else the last
number (lm-eval's gsm8k-cot strict and flexible filters, in that order). Metrics over the K samples:

    maj@K    the answer more samples gave than any other (self-consistency, Wang et al. 2023) equals the
             gold one. A TIE IS NOT A MAJORITY: when two answers share the top count the item counts as
             wrong (lm-eval's `majority_vote` filter takes the first of them in sample order instead:
             `majority(..., ties="first")` reproduces it). A sample with no number is a vote for "no
             answer" (lm-eval's "[invalid]"), which is never correct.
    pass@k   the unbiased estimator of Chen et al. 2021, 1 - C(n-c, k)/C(n, k) from n samples of which c
             are correct (execution.pass_at_k, HumanEval's: the product 1 - Π_{i=n-c+1..n} (1 - k/i), which
             never forms a binomial coefficient), for k = 1 and k = K.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gptstack.eval.execution import pass_at_k
from gptstack.eval.scorer import MAX_GEN_TOKENS, Scorer
from gptstack.eval.tasks import (
    FEWSHOT_SEED,
    MATH_STOP,
    Task,
    TaskError,
    demonstration,
    extract_answer,
    math_prompt,
    normalize_number,
    shots_prefix,
)
from gptstack.infer.engine import Completion, Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams

COT_TRIGGER = "Let's think step by step."
COT_STOP = ("Question:", "\n\n\n")  # a chain of thought has line breaks inside; a new question ends it
_NUMBER = r"-?[\d,]*\.?\d+"
_THE_ANSWER = re.compile(rf"[Tt]he answer is:?\s*\$?({_NUMBER})")
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24


@dataclass(frozen=True)
class Sampling:
    """How math items are generated: the CoT prompt or the direct one, and K samples besides the greedy one."""

    cot: bool = True
    samples: int = 1  # K: sampled generations per item, besides the greedy one (1: greedy only)
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = FEWSHOT_SEED

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise TaskError(f"--samples must be >= 1, got {self.samples}")
        if self.samples > 1 and self.temperature <= 0:
            raise TaskError("--samples > 1 needs --temperature > 0: greedy samples would all be the same")


# ---- prompts and answers ----------------------------------------------------------------------------------


def cot_prompt(rec: dict) -> str:
    return f"Question: {rec['context']}\nAnswer: {COT_TRIGGER}"


def cot_demonstration(rec: dict) -> str:
    """A solved example: the chain of thought (calculator notes removed), then "The answer is N."."""
    steps = _CALCULATOR.sub("", rec.get("chain_of_thought", "")).strip()
    return f"{cot_prompt(rec)} {steps + ' ' if steps else ''}The answer is {rec['answer']}."


def extract_cot(text: str) -> str | None:
    """The number after the first "The answer is", else after "####", else the last number; normalised."""
    m = _THE_ANSWER.search(text)
    if m:
        return normalize_number(m.group(1))
    if "####" in text:
        m = re.search(_NUMBER, text.split("####", 1)[1])
        return normalize_number(m.group()) if m else None
    found = re.findall(_NUMBER, text)
    return normalize_number(found[-1]) if found else None


# ---- self-consistency metrics -------------------------------------------------------------------------


def majority(answers: Sequence[str | None], ties: str = "none") -> str | None:
    """The answer given most often. `ties="none"`: None when two answers share the top count (a tie is not
    a majority); `ties="first"`: the first of them in sample order (lm-eval's majority_vote, which is
    Counter.most_common). None counts as an answer ("no answer"), so it can win, and is returned as None."""
    if ties not in ("none", "first"):
        raise ValueError(f"ties must be 'none' or 'first', got {ties!r}")
    if not answers:
        return None
    if ties == "none" and tied(answers):
        return None
    return Counter(answers).most_common(1)[0][0]  # the first in sample order among equal counts


def cot_metrics(items: list[dict], samples: int) -> dict:
    """acc (greedy), and over the K samples maj@K, pass@1 and pass@K, averaged over items."""
    m: dict = {"acc": float(np.mean([it["correct"] for it in items])) if items else float("nan")}
    if samples > 1 and items:
        m[f"maj@{samples}"] = float(np.mean([it["maj_correct"] for it in items]))
        m["no_majority"] = int(sum(it["tie"] for it in items))  # items whose top answers tied (counted wrong)
        for k in sorted({1, samples}):
            m[f"pass@{k}"] = float(np.mean([pass_at_k(samples, it["n_correct"], k) for it in items]))
    return m


# ---- generation ----------------------------------------------------------------------------------------------


def sample_fanout(
    engine: Engine, prompts: list[list[int]], greedy: SamplingParams, sampled: SamplingParams | None, k: int
) -> list[tuple[Completion, list[Completion]]]:
    """Per prompt, its greedy completion and k sampled ones (seed `sampled.seed + i*k + j`). The k samples
    of a prompt are added when its greedy request has produced its first token, so its prompt's full KV
    blocks are named and the samples take them from the prefix cache. Prompts are fed as slots free up,
    at most max_seqs // (k + 1) at a time, so a prompt's blocks are still held when its samples start."""
    k = k if sampled is not None else 0
    window = max(1, engine.config.max_seqs // (k + 1))
    got: dict[str, Completion] = {}
    owner: dict[str, int] = {}  # request id → prompt index
    left = [k + 1] * len(prompts)  # unfinished requests per prompt
    queue = iter(range(len(prompts)))

    def add(i: int, j: int, params: SamplingParams) -> None:
        rid = engine.add_request(prompts[i], params, request_id=f"{i}/{j}")
        got[rid], owner[rid] = Completion(rid, list(prompts[i]), [], "", "", [], None, 0), i

    for i in [i for _, i in zip(range(window), queue, strict=False)]:
        add(i, 0, greedy)
    while engine.has_unfinished():
        for out in engine.step():
            c, i = got[out.request_id], owner[out.request_id]
            if out.request_id.endswith("/0") and not c.token_ids and out.token_ids:  # prompt computed: fan out
                for j in range(1, k + 1):
                    add(i, j, SamplingParams(**{**vars(sampled), "seed": sampled.seed + i * k + j - 1}))
            c.token_ids += out.token_ids
            c.text += out.text
            c.num_cached_tokens = out.num_cached_tokens
            if out.finished:
                c.finish_reason = out.finish_reason
                left[i] -= 1
                if left[i] == 0 and (nxt := next(queue, None)) is not None:
                    add(nxt, 0, greedy)
    return [(got[f"{i}/0"], [got[f"{i}/{j}"] for j in range(1, k + 1)]) for i in range(len(prompts))]


def _outcome(c: Completion, want: str, extract) -> dict:
    got = extract(c.text)
    return {"text": c.text, "tokens": len(c.token_ids), "finish": c.finish_reason, "extracted": got,
            "correct": got == want}  # fmt: skip


def run_cot(
    scorer: Scorer, task: Task, sampling: Sampling, shots: int = 0, limit: int | None = None,
    max_gen_tokens: int = MAX_GEN_TOKENS,
) -> tuple[dict, list[dict]]:  # fmt: skip
    """A math task with the CoT (or direct) prompt: (metrics, per-item outcomes with every sample)."""
    if task.kind != "math":
        raise TaskError(f"{task.name}: --cot and --samples apply to math tasks (GSM8K), not {task.kind}")
    prompt, demo, extract, stop = task_prompt(task, sampling.cot)
    indices = list(range(min(limit, len(task.records)) if limit else len(task.records)))
    text = [shots_prefix(task, i, shots, sampling.seed, demo=demo) + prompt(task.records[i]) for i in indices]
    prompts = scorer.fit_prompts([scorer.tokenizer.encode_prompt(t) for t in text], max_gen_tokens)
    k = sampling.samples
    engine = Engine(scorer.model, EngineConfig(max_seqs=max(32, k + 1)), tokenizer=scorer.tokenizer)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_gen_tokens, stop=stop)
    sampled = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=max_gen_tokens,
                             stop=stop, seed=sampling.seed) if k > 1 else None  # fmt: skip
    items = []
    for i, (g, samples) in zip(indices, sample_fanout(engine, prompts, greedy, sampled, k), strict=True):
        want = normalize_number(task.records[i]["answer"])
        first = _outcome(g, want, extract)
        item = {"index": i, "generation": first["text"], "tokens": first["tokens"], "finish": first["finish"],
                "extracted": first["extracted"], "correct": first["correct"]}  # fmt: skip
        if samples:
            outs = [_outcome(s, want, extract) for s in samples]
            answers = [o["extracted"] for o in outs]
            vote = majority(answers)
            item |= {"samples": outs, "majority": vote, "tie": tied(answers),
                     "maj_correct": vote == want, "n_correct": sum(o["correct"] for o in outs)}  # fmt: skip
        items.append(item)
    metrics = cot_metrics(items, k) | {"prefix_shared": engine.stats["prefix_hits"],
                                       "prompt_tokens": engine.stats["prefix_queried"]}  # fmt: skip
    return metrics, items


def tied(answers: Sequence[str | None]) -> bool:
    """Whether two answers share the top count (no majority)."""
    counts = Counter(answers).most_common(2)
    return len(counts) == 2 and counts[0][1] == counts[1][1]


def task_prompt(task: Task, cot: bool):
    """(prompt, demonstration, answer extractor, stop strings) of a record: the CoT ones, or tasks.py's
    direct ones."""
    if cot:
        return cot_prompt, cot_demonstration, extract_cot, COT_STOP
    return math_prompt, (lambda rec: demonstration(task, rec)), extract_answer, MATH_STOP
