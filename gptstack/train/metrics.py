"""Where each training step's record goes: RUN_DIR/metrics.jsonl (one JSON object per step), TensorBoard
events in RUN_DIR/tb/ when tensorboard is installed, and the progress bar; and `read_metrics`, which
reads metrics.jsonl back for the report, the tests and the benchmarks.

A record holds step, tokens, loss, lr, grad_norm, batch_tokens, tokens_per_s, mfu, skipped and time
(training seconds), plus val_loss, val_bpb and samples at evaluations. Lines are flushed as they are
written, so a killed run loses at most the line being written, and `read_metrics` skips a torn one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from gptstack.data.shards import atomic_write


def read_metrics(path: str | Path) -> list[dict]:
    """The complete records of a metrics.jsonl (a torn last line from a kill is skipped)."""
    path = Path(path)
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class MetricsLog:
    """Appends one JSON line per step (flushed, so a killed run loses at most the line being written)."""

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        if keep_until is None:
            path.write_text("")
        else:  # resuming: drop the steps after the checkpoint (they will be trained again) and torn lines
            kept = [json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= keep_until]
            atomic_write(path, "".join(kept).encode())
        self.file = open(path, "a")  # noqa: SIM115 (open for the whole run, closed by close())

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class RunLog:
    """Rank 0's outputs of a run: metrics.jsonl, TensorBoard (optional) and a progress bar over tokens."""

    def __init__(
        self, out: Path, resumed_step: int | None, total_tokens: int, tokens: int, progress: bool, tensorboard: bool
    ):
        self.metrics = MetricsLog(out / "metrics.jsonl", resumed_step)
        self.tb = _tensorboard(out / "tb") if tensorboard else None
        self.bar = tqdm(total=total_tokens, initial=tokens, unit="tok", unit_scale=True, disable=not progress,
                        file=sys.stderr, dynamic_ncols=True)  # fmt: skip

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"val/{k}" if k.startswith("val") else f"train/{k}", v, record["step"])
        self.bar.update(record["batch_tokens"])
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                             mfu=f"{record['mfu']:.1%}", refresh=False)  # fmt: skip

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        if self.tb:
            self.tb.close()


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))
