"""Perplexity and bits per byte of text files or of a shard folder's held-out split (GPT-2 §3.1).

Each document is scored with rolling windows (scorer.rolling_windows: lm-eval's
loglikelihood_rolling, every token predicted once, the first from BOS where the model's tokenizer
starts a sequence with it, as Gemma's does, else from end-of-text: scorer.prefix_id). perplexity =
exp(Σ nll / tokens); bits per byte = Σ nll / (ln 2 · UTF-8 bytes), comparable across tokenizers.
"""

from __future__ import annotations

import math
from pathlib import Path

from gptstack.data.contamination import shard_documents
from gptstack.eval.scorer import Scorer


def read_documents(source: str | Path, split: str = "val") -> list[str]:
    """A text file (one document), a folder of .txt/.md/.py files (one document each), or a shard
    folder (its `split` documents, split at end-of-text)."""
    source = Path(source)
    if (source / "manifest.json").is_file():
        docs = [d for d in shard_documents(source, (split,)) if d]
    elif source.is_dir():
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(source.rglob("*"))
                if p.is_file() and p.suffix in (".txt", ".md", ".py")]  # fmt: skip
    elif source.is_file():
        docs = [source.read_text(encoding="utf-8", errors="replace")]
    else:
        raise FileNotFoundError(f"{source}: no such text file or folder")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{source}: no text to score" + (f" in split {split!r}" if source.is_dir() else ""))
    return docs


def perplexity(scorer: Scorer, documents: list[str], stride: int | None = None, max_tokens: int | None = None) -> dict:
    """Tokens, bytes, mean nats/token, perplexity and bits/byte over `documents` (cut once `max_tokens`
    tokens are gathered; the bytes counted are those of the tokens scored)."""
    tok = scorer.tokenizer
    docs, total = [], 0
    for text in documents:
        ids = tok.encode(text)
        if max_tokens is not None and total + len(ids) > max_tokens:
            ids = ids[: max_tokens - total]
        if ids:
            docs.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    per_doc = scorer.loglikelihood_rolling_batch(docs, stride)
    nll = -sum(sum(lp) for lp in per_doc)
    n_bytes = sum(len(tok.decode_bytes(ids)) for ids in docs)
    return {"documents": len(docs), "tokens": total, "bytes": n_bytes, "nll": nll / total,
            "perplexity": math.exp(nll / total), "bpb": nll / (math.log(2) * n_bytes),
            "stride": stride or scorer.context}  # fmt: skip
