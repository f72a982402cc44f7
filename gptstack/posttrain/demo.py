"""A post-training task with a programmatic ground truth, for demonstrations and tests.

The prompt asks for a Python expression equal to a number ("Write a Python expression equal to 37.");
the judge parses the response as Python and evaluates it safely (integer literals, + − ×, unary
minus only; nothing is executed). Its score is 0 when the response is not such an expression, and
0.5 + 0.5 / (1 + |value − target|) when it is: 1 when exactly right, falling toward 0.5 with the
distance. The SFT data is deliberately noisy (`broken` of the answers are malformed: a dangling
operator, an unbalanced parenthesis, words), so the SFT model makes both kinds of mistakes. Every claim of the
RLHF and DPO demonstrations (reward model accuracy, PPO's gain, reward hacking at β = 0, DPO's
preference rate) is measured against this judge, which no stage ever trains on.

`rule:gptstack.posttrain.demo:judge` names it as a rule-based reward or tracked score.
"""

from __future__ import annotations

import ast
import random
import re
import warnings

import torch

from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams

PROMPT = "Write a Python expression equal to {n}."
TARGETS = range(10, 100)
_TARGET_RE = re.compile(r"equal to (-?\d+)\.?$")


def target_of(prompt: str) -> int | None:
    m = _TARGET_RE.search(prompt.strip())
    return int(m.group(1)) if m else None


def safe_value(expr: str) -> int | None:
    """The value of an integer + − × expression, or None if it is anything else (never executed)."""
    try:
        with warnings.catch_warnings():  # "3x" is a SyntaxWarning before it is a SyntaxError
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None

    def ev(node) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < 10**6:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            out = a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
            if abs(out) >= 10**9:
                raise ValueError("too large")
            return out
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        return ev(tree)
    except (ValueError, RecursionError):
        return None


def judge(prompt: str, response: str) -> float:
    """Ground truth in [0, 1] (see the module docstring)."""
    n, v = target_of(prompt), safe_value(response)
    if n is None or v is None:
        return 0.0
    return 0.5 + 0.5 / (1.0 + abs(v - n))


def correct_expression(n: int, rng: random.Random) -> str:
    op = rng.choice("+-*")
    if op == "*":
        divisors = [d for d in range(2, n) if n % d == 0]
        if divisors:
            d = rng.choice(divisors)
            return f"{d}*{n // d}"
        op = "+"
    if op == "+":
        a = rng.randint(1, n - 1)
        return f"{a}+{n - a}"
    b = rng.randint(1, 40)
    return f"{n + b}-{b}"


def broken_expression(n: int, rng: random.Random) -> str:
    """A malformed answer: what noisy instruction data looks like."""
    good = correct_expression(n, rng)
    a, b = re.split(r"[-+*]", good, maxsplit=1)
    op = good[len(a)]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    return rng.choice([f"{a}{op}", f"({good}", f"{good})", f"{a} {word} {b}"])


def sft_rows(count: int, seed: int = 0, broken: float = 0.4) -> list[dict]:
    """(prompt, response) rows: correct expressions, and a `broken` fraction of malformed ones."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        n = rng.choice(TARGETS)
        response = broken_expression(n, rng) if rng.random() < broken else correct_expression(n, rng)
        rows.append({"prompt": PROMPT.format(n=n), "response": response})
    return rows


def prompt_rows(count: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": PROMPT.format(n=rng.choice(TARGETS))} for _ in range(count)]


@torch.no_grad()
def sample(model, prompts: list[str], n: int = 1, temperature: float = 1.0, max_tokens: int = 16, seed: int = 0):
    """n sampled responses (text) per prompt, through the inference engine."""
    tok = model.tokenizer
    ids = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
    ids = [i for i in ids for _ in range(n)]
    engine = Engine(model, EngineConfig(max_seqs=min(64, len(ids))), tokenizer=tok)
    params = [SamplingParams(temperature, max_tokens=max_tokens, seed=seed * 1_000_003 + i) for i in range(len(ids))]
    outs = engine.generate(ids, params)
    texts = [o.text for o in outs]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def preference_rows(model, prompts: list[str], seed: int = 0, temperature: float = 1.0) -> list[dict]:
    """Two samples per prompt from `model`, labelled by the judge; ties dropped."""
    rows = []
    for p, (a, b) in zip(prompts, sample(model, prompts, 2, temperature, seed=seed), strict=True):
        ja, jb = judge(p, a), judge(p, b)
        if ja != jb and a and b:
            rows.append({"prompt": p, "chosen": a if ja > jb else b, "rejected": b if ja > jb else a})
    return rows


def ground_truth(model, prompts: list[str], seed: int = 0, temperature: float = 1.0) -> dict[str, float]:
    """Mean judge score, exact-match rate and parse rate of one sample per prompt."""
    outs = [s[0] for s in sample(model, prompts, 1, temperature, seed=seed)]
    scores = [judge(p, r) for p, r in zip(prompts, outs, strict=True)]
    return {
        "score": sum(scores) / len(scores),
        "exact": sum(s == 1.0 for s in scores) / len(scores),
        "parses": sum(safe_value(r) is not None for r in outs) / len(outs),
    }


def win_rate(model_a, model_b, prompts: list[str], seed: int = 0, temperature: float = 1.0) -> float:
    """How often the judge prefers model_a's sample to model_b's (ties count half)."""
    a = [s[0] for s in sample(model_a, prompts, 1, temperature, seed=seed)]
    b = [s[0] for s in sample(model_b, prompts, 1, temperature, seed=seed + 7)]
    ja = [judge(p, x) for p, x in zip(prompts, a, strict=True)]
    jb = [judge(p, y) for p, y in zip(prompts, b, strict=True)]
    return sum((x > y) + 0.5 * (x == y) for x, y in zip(ja, jb, strict=True)) / len(prompts)
