"""KVCache: a preallocated key/value cache that `GPT.forward(idx, kv_cache=...)` writes into.

Static shapes (n_layer, B, n_kv_head, max_len, head_dim), allocated once; the caller (generation
loop, engine) owns its lifecycle. All B sequences share one write position `pos`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptstack.config import ModelConfig


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
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached (the absolute position of the next token)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, kv, T, hd) at [pos, pos+T) of `layer`; return all cached (B, kv, pos+T, hd)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens exceed its {self.max_len} slots")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
