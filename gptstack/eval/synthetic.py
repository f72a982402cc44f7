"""A synthetic task mixture for measuring in-context learning (GPT-3 §3, figure 1.2) on a CPU.

Each task family has a hidden rule, written as "input = output" lines:

    lookup    a table of six 2-letter keys → 2-digit values:      "get qe = 47"
    cipher    a letter substitution over 5 letters, 3-letter words: "enc bad = hgf"
    shuffle   one fixed permutation of 4 letter positions:         "mix wxyz = zxwy"

Training text is made of episodes: one freshly drawn rule, shown by 12-24 examples separated by blank
lines, so the only way to predict an output is to infer the rule from the examples before it. The
evaluation tasks are written as `lm` task files, one fixed rule per file drawn from a different seed
(never a training rule): `gptstack eval --shots k` then shows k examples of that rule, and the accuracy
at k = 0 is chance while it rises with k as the model learns the rule in context.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

FAMILIES = ("lookup", "cipher", "shuffle")
SEP = "\n\n"  # between examples: the same separator the task runner puts between shots


def draw_rule(family: str, rng: random.Random) -> dict:
    letters = string.ascii_lowercase
    if family == "lookup":
        keys = rng.sample([a + b for a in letters for b in letters], 6)
        return {"family": family, "table": {k: f"{rng.randrange(100):02d}" for k in keys}}
    if family == "cipher":
        src = rng.sample(letters, 5)
        return {"family": family, "map": dict(zip(src, rng.sample(letters, 5), strict=True))}
    if family == "shuffle":
        perm = list(range(4))
        while perm == sorted(perm):
            rng.shuffle(perm)
        return {"family": family, "perm": perm}
    raise ValueError(f"unknown family {family!r}: {', '.join(FAMILIES)}")


def examples(rule: dict, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n (context, answer) pairs of a rule: distinct while the rule has that many inputs (lookups repeat
    their 6 keys by design: that is what can be looked up)."""
    family, out, seen = rule["family"], [], set()
    while len(out) < n:
        if family == "lookup":
            key = rng.choice(sorted(rule["table"]))
            pair = (f"get {key} =", rule["table"][key])
        elif family == "cipher":
            word = "".join(rng.choice(sorted(rule["map"])) for _ in range(3))
            pair = (f"enc {word} =", "".join(rule["map"][c] for c in word))
        else:
            word = "".join(rng.sample(string.ascii_lowercase, 4))
            pair = (f"mix {word} =", "".join(word[i] for i in rule["perm"]))
        capacity = len(rule["map"]) ** 3 if family == "cipher" else 1 << 30
        if family == "lookup" or pair not in seen or len(seen) >= capacity:  # lookups repeat keys by design
            seen.add(pair)
            out.append(pair)
    return out


def episode(rng: random.Random, n_min: int = 12, n_max: int = 24) -> str:
    rule = draw_rule(rng.choice(FAMILIES), rng)
    return SEP.join(f"{c} {a}" for c, a in examples(rule, rng, rng.randint(n_min, n_max)))


def training_text(n_episodes: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"train:{seed}")
    return [episode(rng) for _ in range(n_episodes)]


def write_tasks(out: str | Path, items: int = 200, seed: int = 1) -> list[Path]:
    """One `lm` task file per family, each with one fixed rule (seeded apart from training)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for family in FAMILIES:
        rng = random.Random(f"eval:{seed}:{family}")
        rule = draw_rule(family, rng)
        pairs = examples(rule, rng, items)  # a lookup's k shots show its key with chance ~1 - (5/6)^k
        path = out / f"icl_{family}.jsonl"
        path.write_text("".join(json.dumps({"context": c, "continuation": a}) + "\n" for c, a in pairs))
        paths.append(path)
    return paths
