"""GPT-3's quality classifier: logistic regression on hashed word n-grams, trained to tell reference
"high quality" documents from raw ones (Brown et al. 2020, appendix A).

A document with score s (the probability of "high quality") is kept when `np.random.pareto(9) > 1 - s`:
high scores are almost always kept and low ones sometimes, which keeps some out-of-distribution text.
The pareto draw is seeded by the run seed and the document id, so a run is reproducible on any
executor. The model is saved as plain arrays (`.npz` + JSON), nothing that executes on load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptstack.data.sources import corpus_texts

ALPHA = 9.0


class QualityClassifier:
    def __init__(self, coef: np.ndarray, intercept: float, n_features: int = 2**18, ngram: int = 2):
        self.coef, self.intercept, self.n_features, self.ngram = (
            coef.astype(np.float64),
            float(intercept),
            n_features,
            ngram,
        )

    def _vectorizer(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(n_features=self.n_features, ngram_range=(1, self.ngram), alternate_sign=False)

    @classmethod
    def train(
        cls, positive: list[str], negative: list[str], n_features: int = 2**18, ngram: int = 2, C: float = 1.0
    ) -> tuple[QualityClassifier, dict]:
        """Fits on 90% of each set and reports accuracy on the other 10%."""
        from sklearn.linear_model import LogisticRegression

        if len(positive) < 2 or len(negative) < 2:
            raise ValueError(f"need ≥2 positive and ≥2 negative documents, got {len(positive)} and {len(negative)}")
        model = cls(np.zeros(n_features), 0.0, n_features, ngram)
        texts = positive + negative
        y = np.array([1] * len(positive) + [0] * len(negative))
        order = np.random.default_rng(0).permutation(len(texts))
        n_test = max(2, len(texts) // 10)
        test, train = order[:n_test], order[n_test:]
        X = model._vectorizer().transform(texts)
        lr = LogisticRegression(C=C, max_iter=2000).fit(X[train], y[train])
        model.coef, model.intercept = lr.coef_[0], float(lr.intercept_[0])
        heldout = float(((model.score_matrix(X[test]) > 0.5) == y[test]).mean())
        return model, {"n_positive": len(positive), "n_negative": len(negative), "heldout_accuracy": heldout}

    def score_matrix(self, X) -> np.ndarray:
        return 1 / (1 + np.exp(-(X @ self.coef + self.intercept)))

    def score(self, texts: list[str]) -> np.ndarray:
        """(len(texts),) probability that each is high quality."""
        return self.score_matrix(self._vectorizer().transform(texts))

    @staticmethod
    def keep(score: float, doc_id: str, seed: int = 0) -> bool:
        digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return bool(rng.pareto(ALPHA) > 1 - score)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"n_features": self.n_features, "ngram": self.ngram, "intercept": self.intercept}
        with open(path, "wb") as f:
            np.savez(f, coef=self.coef.astype(np.float32), meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        return path

    @classmethod
    def load(cls, path: str | Path) -> QualityClassifier:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                return cls(z["coef"], meta["intercept"], meta["n_features"], meta["ngram"])
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a quality classifier saved by gptstack ({e})") from None


@dataclass
class QualityTrainConfig:
    positive: list[str]  # reference high-quality documents (files or folders)
    negative: list[str]  # raw documents (files or folders)
    out: str  # classifier file to write (.npz)


def train_quality(cfg: QualityTrainConfig) -> dict:
    """`gptstack data train-quality`: fit the classifier on the positive (reference) and negative
    (raw) documents and save it to cfg.out. Returns the counts and the held-out accuracy."""
    pos, neg = corpus_texts(cfg.positive, "train", 0.0), corpus_texts(cfg.negative, "train", 0.0)
    model, report = QualityClassifier.train(pos, neg)
    model.save(cfg.out)
    return {"positive": len(pos), "negative": len(neg), **report}
