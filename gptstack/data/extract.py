"""HTML → main text with trafilatura, and the word-level score it is measured by.

Settings were chosen by measurement on the 120 annotated pages of ../shared/data/html
(benchmarks/bench_data.py): trafilatura's defaults score word-level F1 0.946; with
`favor_precision=True, include_comments=False` it scores 0.965 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections import Counter

EXTRACT_OPTIONS = {"favor_precision": True, "include_comments": False}


def extract_html(html: str | bytes, **options) -> str:
    """The main text of a web page ('' when trafilatura finds none)."""
    import trafilatura

    return trafilatura.extract(html, **{**EXTRACT_OPTIONS, **options}) or ""


def word_prf(predicted: str, gold: str) -> tuple[float, float, float]:
    """Precision, recall and F1 of the whitespace-split words, counted as multisets."""
    p, g = Counter(predicted.split()), Counter(gold.split())
    overlap = sum((p & g).values())
    precision = overlap / max(1, sum(p.values()))
    recall = overlap / max(1, sum(g.values()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1
