"""What every post-training stage shares: reading JSONL rows with counted skips, per-token
log-probabilities, padding, the optimisation loop (grad accumulation that equals the full batch),
and writing the stage's checkpoint, log and report section.

A stage writes `<out>/<stage>/step-NNNNNN/` (the standard checkpoint, loadable by eval, generate
and serve), `<out>/<stage>/log.jsonl` (one line per step) and a section of `<out>/report.md`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gptstack.checkpoint import load_model, save_checkpoint, step_dir
from gptstack.files import iter_jsonl
from gptstack.model import GPT
from gptstack.report import write_section
from gptstack.train.optim import build_adamw, lr_at, param_groups
from gptstack.transforms.lora import LoRAConfig, apply_lora, has_lora, merged_state_dict, save_adapter


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


@dataclass
class StageConfig:
    """Options every stage takes (a stage's own dataclass adds its fields)."""

    init: str = ""  # the checkpoint to start from
    data: str = ""  # a JSONL file
    out: str = "runs/posttrain"  # the run folder: <out>/<stage>/step-*/ and <out>/report.md
    lr: float = 1e-4  # peak learning rate (warm-up, then cosine decay)
    batch_size: int = 32  # sequences (or pairs) per optimizer step
    micro_batch_size: int = 0  # per forward/backward; 0: the whole batch (no accumulation)
    epochs: float = 1.0  # passes over the training rows (when max_steps is 0)
    max_steps: int = 0  # 0: from epochs
    warmup_steps: int = 0  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    eval_fraction: float = 0.1  # rows held out for evaluation
    seed: int = 0  # data order, held-out split and initialisation of new heads
    max_len: int = 0  # 0: the model's context
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0  # LoRA scale α (the update is α/r · B A)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")  # module names that get adapters
    device: str = "cpu"  # cpu | cuda
    progress: bool = True  # a progress bar on stderr

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 0:
            raise ValueError("batch_size must be >= 1 and micro_batch_size >= 0")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch {self.micro_batch_size}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        self.lora_targets = tuple(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- data ---------------------------------------------------------------------------------------


def read_jsonl(path: str | Path, parse: Callable[[dict], Any]) -> tuple[list[Any], Counter]:
    """Parse each row with `parse`, which returns the row's example or raises SkipRow(reason).
    Unparseable JSON is an error naming file:line (nothing is trained on a half-read file);
    rows the stage cannot use are skipped and counted by reason."""
    rows, skipped = [], Counter()
    for _, row in iter_jsonl(path, DataError):
        try:
            rows.append(parse(row))
        except SkipRow as e:
            skipped[str(e)] += 1
    if not rows:
        raise DataError(f"{path}: no usable rows (skipped: {dict(skipped) or 'none'})")
    return rows, skipped


class SkipRow(Exception):
    """A row the stage cannot use; its message is the reason it is counted under."""


def split(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last eval_fraction of the rows held out (at least one when asked)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 and len(rows) > 1 else 0
    shuffled = [rows[i] for i in order]
    return shuffled[: len(rows) - n_eval], shuffled[len(rows) - n_eval :]


def pad(seqs: list[list[int]], value: int = 0) -> Tensor:
    """Right-pad token lists into (B, T)."""
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs], dtype=torch.long)


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---- log-probabilities --------------------------------------------------------------------------


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets) (B, T) from logits (B, T, V), in float32."""
    return torch.gather(logits.float().log_softmax(-1), -1, targets.clamp_min(0)[..., None]).squeeze(-1)


def entropy(logits: Tensor) -> Tensor:
    """The entropy (B, T) of each next-token distribution."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(model: GPT, seqs: list[list[int]], masks: list[list[bool]]) -> Tensor:
    """Sum of log p over the tokens whose mask is True (each predicted from the tokens before it),
    for a batch of sequences: (B,). Differentiable when grad is enabled."""
    idx = pad(seqs).to(model.lm_head.weight.device)  # (B, T)
    m = pad([[int(b) for b in mk] for mk in masks]).to(idx.device).bool()  # (B, T)
    logits = model(idx[:, :-1])  # (B, T-1, V)
    lp = token_logprobs(logits, idx[:, 1:])  # (B, T-1)
    return (lp * m[:, 1:]).sum(-1)


# ---- optimisation --------------------------------------------------------------------------------


LossFn = Callable[[list], tuple[Tensor, float, dict[str, float]]]


def optimize(
    model: nn.Module,
    train: list,
    loss_fn: LossFn,
    cfg: StageConfig,
    log: Callable[[dict], None],
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> int:
    """Minimise over `train` for cfg.epochs (or cfg.max_steps): each step takes batch_size items in
    micro-batches. `loss_fn(micro)` returns (summed loss, count, summed metrics); the summed losses'
    gradients accumulate and are divided by the step's total count, so micro-batches give the full
    batch's gradient exactly (up to float summation order). Returns the number of steps taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    opt = build_adamw(param_groups(model, cfg.weight_decay), cfg.lr, (0.9, 0.95), 1e-8, fused=False)
    per_epoch = max(1, len(train) // cfg.batch_size)
    steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
    micro = cfg.micro_batch_size or cfg.batch_size
    g = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    bar = progress_bar(steps, cfg.progress)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        while len(order) < cfg.batch_size:  # epochs of seeded permutations
            order += torch.randperm(len(train), generator=g).tolist()
        batch, order = [train[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        total, sums = accumulate(params, batch, micro, loss_fn)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = {"step": step, "lr": lr, "grad_norm": float(norm)}
        record.update({k: v / max(total, 1e-9) for k, v in sums.items()})
        if evaluate is not None and (step == steps or (eval_every and step % eval_every == 0)):
            model.eval()
            with torch.no_grad():
                record.update({f"eval_{k}": v for k, v in evaluate().items()})
        record["elapsed_s"] = round(time.perf_counter() - t0, 3)
        log(record)
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "acc", "eval_loss", "eval_acc")})
        bar.update()
    bar.close()
    model.eval()
    return steps


def accumulate(params: list[Tensor], batch: list, micro: int, loss_fn: LossFn) -> tuple[float, Counter]:
    """Gradients of the batch's mean loss, in micro-batches: each summed loss is backpropagated, then
    every gradient is divided by the batch's total count. Returns the count and the summed metrics."""
    total, sums = 0.0, Counter()
    for mb in chunks(batch, micro):
        loss, n, metrics = loss_fn(mb)
        loss.backward()
        total += n
        sums.update(metrics)
    for p in params:
        if p.grad is not None:
            p.grad.div_(max(total, 1e-9))
    return total, sums


def progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True)


# ---- starting and finishing a stage ---------------------------------------------------------------


def load_start(cfg: StageConfig) -> GPT:
    """The checkpoint to post-train, in train mode, with `.tokenizer` (required)."""
    if not cfg.init:
        raise ValueError("--init: the checkpoint to start from is required")
    model = load_model(cfg.init, device=cfg.device, require_tokenizer=True)
    torch.manual_seed(cfg.seed)
    return model


def maybe_lora(model: nn.Module, cfg: StageConfig) -> None:
    """Apply LoRA adapters when cfg.lora_rank > 0 (then only they train)."""
    if cfg.lora_rank:
        apply_lora(model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets))


def max_len_of(cfg: StageConfig, model: GPT) -> int:
    return min(cfg.max_len or model.config.block_size, model.config.block_size)


class RunLog:
    """`<out>/<stage>/log.jsonl`, one JSON line per call, kept in memory for the report's plot."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "log.jsonl"
        self.path.write_text("")
        self.records: list[dict] = []

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def finish(
    model: GPT,
    cfg: StageConfig,
    stage: str,
    steps: int,
    summary: dict,
    heads: dict[str, Tensor] | None = None,
    head_config: dict | None = None,
    plots: list[tuple[str, list[str]]] = (),
    records: list[dict] = (),
) -> Path:
    """Write the stage's checkpoint (LoRA adapters merged in, and also saved alone), then its
    report section with the summary table and plots. Returns the checkpoint folder."""
    root = Path(cfg.out) / stage
    tensors = None
    if has_lora(model):
        save_adapter(model, root / "adapter")
        tensors = merged_state_dict(model)
    train_config = {"stage": stage, **cfg.to_dict(), "summary": summary}
    if head_config:
        train_config["head"] = head_config
    ckpt = save_checkpoint(
        model, step_dir(root, steps), step=steps, tokenizer=model.tokenizer, train_config=train_config,
        tensors=tensors, heads=heads,
    )  # fmt: skip
    source = cfg.data or getattr(cfg, "task", "")
    lines = [f"## {stage}", "", f"From `{cfg.init}` on `{source}`; checkpoint `{ckpt}`.", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
    for name, keys in plots:
        png = plot_metrics(records, keys, root / f"{name}.png", title=f"{stage}: {name}")
        if png is not None:
            lines += ["", f"![{stage} {name}]({png.relative_to(Path(cfg.out))})"]
    write_section(Path(cfg.out) / "report.md", stage, "\n".join(lines))
    return ckpt


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_metrics(records: list[dict], keys: list[str], path: Path, title: str = "") -> Path | None:
    """One panel per metric against step; None when no record has any of the keys."""
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a reference or reward model that must never change."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
