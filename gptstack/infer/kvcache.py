"""KVCache: one preallocated, contiguous key/value cache for a batch that advances in lockstep.

Static shapes (n_layer, B, n_kv_head, max_len, head_dim), allocated once; all B sequences share one
write position `pos`. This is the simple cache of `generate()` and of training-time sampling; the
engine (infer/engine.py) uses paged blocks instead. Both implement what `GPT.forward` asks of a cache:
`positions(T, device)`, `attend(layer, q, k, v, window, scale)` and `advance(T)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptstack.config import ModelConfig
from gptstack.model import attend, attention_mask


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = max_len or cfg.block_size
        if self.max_len > cfg.block_size:
            raise ValueError(f"cache length {self.max_len} exceeds the model context {cfg.block_size}")
        self.context = cfg.block_size
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached (the absolute position of the next token)

    def positions(self, T: int, device: torch.device) -> Tensor:
        """(T,) absolute positions of T new tokens; refuses to run past the context or the cache."""
        if self.pos + T > self.context:
            raise ValueError(f"sequence of {self.pos + T} tokens exceeds the context of {self.context}")
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos + T} tokens exceed its {self.max_len} slots")
        return torch.arange(self.pos, self.pos + T, device=device)

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float | None = None
    ) -> Tensor:
        """Write k, v (B, kv, T, hd) at [pos, pos+T) of `layer`; q (B, h, T, hd) attends causally over
        all pos+T cached keys (within the band of a local layer; `scale` as in model.attend).
        Returns (B, h, T, hd)."""
        T = k.size(2)
        end = self.pos + T
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        mask = attention_mask(T, end, self.pos, window, q.device)
        return attend(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask, scale=scale)

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
