"""Reads token shards as `(x, y)` batches of shape (B, T), aware of the DDP rank and world size, with
a state dict that resumes exactly where it stopped.

The split's shards form one token stream. Each step takes the next `world_size·B·T + 1` tokens; rank r
reads rows [r·B, (r+1)·B) of that window, so the union over ranks equals the batch a single process
with batch `world_size·B` would read. When the stream runs out, the next epoch starts at token 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gptstack.data.shards import open_shards


class TokenLoader:
    """(x, y) batches of (batch_size, seq_len) token ids from a shard folder's split; y is x shifted by one."""

    def __init__(
        self,
        folder: str | Path,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.shards = open_shards(folder, split)
        self.bounds = np.cumsum([0, *map(len, self.shards)])
        self.total = int(self.bounds[-1])
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        self.device = torch.device(device)
        self.window = world_size * batch_size * seq_len + 1
        if self.total < self.window:
            raise ValueError(
                f"{split} split has {self.total:,} tokens, fewer than one step needs "
                f"({world_size}×{batch_size}×{seq_len}+1 = {self.window:,}); use a smaller batch or seq_len"
            )
        self.position, self.epoch = 0, 0

    def _read(self, start: int, n: int) -> np.ndarray:
        parts = []
        i = int(np.searchsorted(self.bounds, start, side="right")) - 1
        while n > 0:
            offset = start - int(self.bounds[i])
            take = min(n, len(self.shards[i]) - offset)
            parts.append(self.shards[i][offset : offset + take])
            start, n, i = start + take, n - take, i + 1
        return np.concatenate(parts).astype(np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.window > self.total:
            self.position, self.epoch = 0, self.epoch + 1
        rows = self.B * self.T
        buf = torch.from_numpy(self._read(self.position + self.rank * rows, rows + 1))
        self.position += self.window - 1
        x = buf[:-1].view(self.B, self.T)  # (B, T)
        y = buf[1:].view(self.B, self.T)  # (B, T) next tokens
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def tokens_per_step(self) -> int:
        return self.world * self.B * self.T

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        if state.get("total") != self.total:
            raise ValueError(
                f"loader state is for a stream of {state.get('total')} tokens, these shards have {self.total}"
            )
        self.position, self.epoch = int(state["position"]), int(state["epoch"])
