"""A synthetic task mixture for measuring in-context learning (GPT-3 §3, figure 1.2) on a CPU.

Each task family has a hidden rule, written as "input output" lines:

    lookup    a table of six 2-letter codes → 2-digit numbers:    "qe 47"
    mapping   five colours → animals, a fresh pairing per rule:   "red fox"
    copy      one fixed 3-number phrase to repeat after "say":    "say 47 19 83"

Training text is made of episodes: one freshly drawn rule, shown by 8-16 examples separated by blank
lines, so the only way to predict an output is to find it in the examples before it. The evaluation
tasks are written as `lm` task files, one fixed rule per file drawn from a different seed (never a
training rule): `gptstack eval --shots k` then shows k examples of that rule, and the accuracy at k = 0
is chance while it rises with k as the model reads the rule from its context. A lookup's answer is in
the prompt only when one of the k shots showed its code, which happens with probability 1 - (5/6)^k.

The solving circuit is the induction head (Olsson et al., 2022): find the earlier occurrence of the
current token and copy the token after it. It forms only when every key and value is one token, so the
mixture comes with its own BPE tokenizer (`train_tokenizer`), and when the training context is short:
the plateau before it forms grows with the context length, so `benchmarks/bench_icl.py` trains on
32-token windows.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from gptstack.tokenizer import train_bpe

FAMILIES = ("lookup", "mapping", "copy")
SEP = "\n\n"  # between examples: the same separator the task runner puts between shots
COLOURS = ("red", "blue", "green", "pink", "gold", "grey", "black", "white", "brown", "cyan", "lime", "navy")
ANIMALS = ("fox", "cat", "dog", "owl", "bee", "cow", "pig", "rat", "eel", "yak", "ant", "elk")
# one pre-token per code, number run or word, and "\n\n" whole, so BPE can make each a single token
PATTERN = r"\n+| ?[a-z]+| ?[0-9]+| +"


def draw_rule(family: str, rng: random.Random) -> dict:
    letters = string.ascii_lowercase
    if family == "lookup":
        keys = rng.sample([a + b for a in letters for b in letters], 6)
        return {"family": family, "table": {k: f"{rng.randrange(100):02d}" for k in keys}}
    if family == "mapping":
        return {"family": family, "table": dict(zip(rng.sample(COLOURS, 5), rng.sample(ANIMALS, 5), strict=True))}
    if family == "copy":
        return {"family": family, "table": {"say": " ".join(f"{rng.randrange(100):02d}" for _ in range(3))}}
    raise ValueError(f"unknown family {family!r}: {', '.join(FAMILIES)}")


def examples(rule: dict, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n (context, answer) pairs of a rule, inputs drawn with replacement: a repeated input is what can be
    answered from the context."""
    table = rule["table"]
    return [(key, table[key]) for key in (rng.choice(sorted(table)) for _ in range(n))]


def episode(rng: random.Random, n_min: int = 8, n_max: int = 16) -> str:
    rule = draw_rule(rng.choice(FAMILIES), rng)
    return SEP.join(f"{c} {a}" for c, a in examples(rule, rng, rng.randint(n_min, n_max)))


def training_text(n_episodes: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"train:{seed}")
    return [episode(rng) for _ in range(n_episodes)]


def vocabulary() -> list[str]:
    """Every code, number and word of the mixture, as it appears in text: what must be one token each."""
    letters = string.ascii_lowercase
    return [a + b for a in letters for b in letters] + [f" {i:02d}" for i in range(100)] + list(COLOURS) + [
        f" {a}" for a in ANIMALS
    ] + ["say", SEP]  # fmt: skip


def train_tokenizer(texts: list[str]):
    """A BPE tokenizer on which every code, number and word of the mixture is one token."""
    tok = train_bpe(texts + vocabulary(), vocab_size=1280, pattern=PATTERN, name="icl-bpe")
    split = [w for w in vocabulary() if len(tok.encode(w)) != 1]
    if split:
        raise ValueError(f"the ICL tokenizer splits {len(split)} units, e.g. {split[:5]}: train it on more episodes")
    return tok


def write_tasks(out: str | Path, items: int = 200, seed: int = 1) -> list[Path]:
    """One `lm` task file per family, each with one fixed rule (seeded apart from training)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for family in FAMILIES:
        rng = random.Random(f"eval:{seed}:{family}")
        pairs = examples(draw_rule(family, rng), rng, items)
        path = out / f"icl_{family}.jsonl"
        path.write_text("".join(json.dumps({"context": c, "continuation": a}) + "\n" for c, a in pairs))
        paths.append(path)
    return paths
