"""What every post-training stage shares: reading JSONL rows with counted skips, per-token
log-probabilities, padding, the optimisation loop (grad accumulation that equals the full batch), and
`StageRun`: the stage's folder, its exact resume, its non-finite guard and its checkpoints.

A stage writes `<out>/<stage>/step-NNNNNN/` (the standard checkpoint, loadable by eval, generate and
serve, with optimizer.pt holding the training state as pretraining's checkpoints do: every
`checkpoint_every` steps and at the end, the newest `keep_checkpoints` kept), `<out>/<stage>/log.jsonl`
(one line per step) and a section of `<out>/report.md`. `--resume` continues a killed run exactly;
without it a run starts clean, so `<out>/<stage>` (`latest`) is always the run's own last step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gptstack.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_heads,
    load_model,
    load_training_state,
    load_vision_weights,
    load_weights,
    read_meta,
    save_checkpoint,
    step_dir,
    verify_files,
)
from gptstack.files import iter_jsonl
from gptstack.model import GPT
from gptstack.report import write_section
from gptstack.train.loop import TrainingError, clear_interrupted, discard_checkpoints
from gptstack.train.metrics import MetricsLog, read_metrics
from gptstack.train.optim import build_adamw, lr_at, param_groups
from gptstack.transforms.lora import (
    LoRAConfig,
    adapter_state_dict,
    apply_lora,
    has_lora,
    merged_state_dict,
    remove_adapter,
    save_adapter,
)


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
    resume: bool = False  # continue the run in <out>/<stage>/ from its newest checkpoint (without: start clean)
    checkpoint_every: int = 100  # steps between resumable checkpoints (0: only the final one)
    keep_checkpoints: int = 2  # newest checkpoints kept
    max_bad_steps: int = 5  # consecutive steps with a non-finite loss, reward or gradient that stop the run

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 0:
            raise ValueError("batch_size must be >= 1 and micro_batch_size >= 0")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch {self.micro_batch_size}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or self.max_bad_steps < 1:
            raise ValueError("need checkpoint_every >= 0, keep_checkpoints >= 1 and max_bad_steps >= 1")
        self.lora_targets = tuple(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# fields a resumed run may change: they do not change what is computed
RESUME_FREE = ("resume", "progress", "device", "checkpoint_every", "keep_checkpoints", "max_bad_steps")


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
StepFn = Callable[[int, list], dict]  # (step, batch) -> the step's record; "nonfinite": why it was skipped


def optimize(
    model: nn.Module,
    train: list,
    loss_fn: LossFn,
    run: StageRun,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
) -> int:
    """Minimise over `train` for cfg.epochs (or cfg.max_steps): each step takes batch_size items in
    micro-batches. `loss_fn(micro)` returns (summed loss, count, summed metrics); the summed losses'
    gradients accumulate and are divided by the step's total count, so micro-batches give the full
    batch's gradient exactly (up to float summation order). A step whose loss or gradient norm is not
    finite changes nothing (run.loop counts it). Returns the number of steps taken."""
    cfg = run.cfg
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    opt = build_adamw(param_groups(model, cfg.weight_decay), cfg.lr, (0.9, 0.95), 1e-8, fused=False)
    per_epoch = max(1, len(train) // cfg.batch_size)
    steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
    micro = cfg.micro_batch_size or cfg.batch_size

    def step_fn(step: int, batch: list) -> dict:
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        total, sums, loss = accumulate(params, batch, micro, loss_fn)
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        why = nonfinite(loss=loss, grad_norm=norm)
        if why is None:
            opt.step()
        opt.zero_grad(set_to_none=True)
        record = {"lr": lr, "grad_norm": norm, **{k: v / max(total, 1e-9) for k, v in sums.items()}}
        return record if why is None else {**record, "nonfinite": why}

    run.loop(model, opt, train, steps, step_fn, evaluate, eval_every)
    model.eval()
    return steps


def accumulate(params: list[Tensor], batch: list, micro: int, loss_fn: LossFn) -> tuple[float, Counter, float]:
    """Gradients of the batch's mean loss, in micro-batches: each summed loss is backpropagated, then
    every gradient is divided by the batch's total count. Returns the count, the summed metrics and
    the summed loss (to check that it is finite)."""
    total, sums, loss_sum = 0.0, Counter(), 0.0
    for mb in chunks(batch, micro):
        loss, n, metrics = loss_fn(mb)
        loss.backward()
        total, loss_sum = total + n, loss_sum + float(loss.detach())
        sums.update(metrics)
    for p in params:
        if p.grad is not None:
            p.grad.div_(max(total, 1e-9))
    return total, sums, loss_sum


def nonfinite(**values: float) -> str | None:
    """None when every value is finite, else which are not ("loss nan, grad_norm inf")."""
    bad = [f"{k} {v}" for k, v in values.items() if not math.isfinite(v)]
    return ", ".join(bad) or None


def progress_bar(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


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
    """`<out>/<stage>/log.jsonl`, one JSON line per step (flushed), kept in memory for the summary and
    the report's plot. Resuming keeps the records up to the checkpoint's step (later ones are redone)."""

    def __init__(self, folder: Path, keep_until: int | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "log.jsonl"
        old = read_metrics(self.path) if keep_until is not None else []
        self.records: list[dict] = [r for r in old if r.get("step", 0) <= (keep_until or 0)]
        self.file = MetricsLog(self.path, keep_until)

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        self.file.write(record)

    def close(self) -> None:
        self.file.close()


def stage_checkpoints(root: Path, stage: str) -> list[Path]:
    """The step-* checkpoints under `<out>/<stage>/`, oldest first; each must be this stage's own."""
    found = list_checkpoints(root) if root.is_dir() else []
    for folder in found:
        _, meta = read_meta(folder)
        if (meta.get("train") or {}).get("stage") != stage:
            raise CheckpointError(f"{folder}: not a {stage} checkpoint (choose another --out)")
    return found


class StageRun:
    """One stage's run in `<out>/<stage>/`: where it starts, its step loop, its checkpoints.

    A run with `resume` continues from the newest checkpoint there (weights, heads and LoRA adapters,
    AdamW state, data order and generator, RNG, step, the stage's own `extra` state), refused when the
    config differs in a field that changes the result or the data gives another number of items; it
    then ends with the weights an uninterrupted run ends with. A run without `resume` starts clean:
    when its training begins, the stage's earlier checkpoints and adapter are removed, so `latest`
    is always this run's own last step. Every checkpoint (every `checkpoint_every` steps and the final
    one) carries the training state in optimizer.pt; the newest `keep_checkpoints` are kept.
    A step whose loss, reward or gradient is not finite is skipped and counted (`nonfinite` in its
    record); `max_bad_steps` in a row, or every step, stop the run with TrainingError, and a checkpoint
    with a non-finite tensor is never written."""

    def __init__(
        self,
        cfg: StageConfig,
        stage: str,
        lm: GPT,
        heads: Callable[[], dict[str, Tensor]] = dict,
        head_config: dict | None = None,
        extra: tuple[Callable[[], dict], Callable[[dict], None]] | None = None,
        vision: nn.Module | None = None,
    ):
        self.cfg, self.stage, self.lm, self.heads, self.head_config = cfg, stage, lm, heads, head_config
        self.vision = vision  # a VisionTower saved beside the LM (vision.safetensors) and restored on resume
        self.extra = extra  # (state() -> dict, load(dict)): a stage's own state beyond the optimizer's
        self.root = Path(cfg.out) / stage
        self.existing = stage_checkpoints(self.root, stage)
        self.resume_from = self.existing[-1] if cfg.resume and self.existing else None
        self.state = self._read_state(self.resume_from) if self.resume_from else None
        self.step, self.nonfinite, self.bad_streak, self.elapsed, self.n_items = 0, 0, 0, 0.0, 0
        self.order: list[int] = []
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.log: RunLog | None = None

    def _read_state(self, folder: Path) -> dict:
        """The checkpoint's training state, after its checksums and the config check."""
        folder, meta = read_meta(folder)
        verify_files(folder, meta)  # checksums before anything is unpickled
        state = load_training_state(folder)
        if not state or "optimizer" not in state:
            raise CheckpointError(f"cannot resume from {folder}: it has no training state (optimizer.pt)")
        saved, now = meta.get("train") or {}, json.loads(json.dumps(self.cfg.to_dict()))
        diff = sorted(k for k in now if k not in RESUME_FREE and saved.get(k) != now[k])
        if diff:
            raise CheckpointError(
                f"cannot resume from {folder}: it was trained with other settings ({', '.join(diff)} differ); "
                "pass the same options, or run without --resume to start over"
            )
        return state

    # ---- the loop ----------------------------------------------------------------------------------

    def loop(
        self, module: nn.Module, opt: torch.optim.Optimizer, items: list, steps: int, step_fn: StepFn,
        evaluate: Callable[[], dict[str, float]] | None = None, eval_every: int = 0,
    ) -> int:  # fmt: skip
        """Steps up to `steps`, each on the next batch_size items of seeded permutations: step_fn, the
        non-finite count, evaluation (at eval_every and the last step), the log line, checkpoints."""
        cfg = self.cfg
        self.module, self.opt, self.n_items = module, opt, len(items)
        self._open()
        bar = progress_bar(steps, cfg.progress, initial=self.step)
        t0 = time.perf_counter() - self.elapsed
        try:
            while self.step < steps:
                self.step += 1
                record = {"step": self.step, **step_fn(self.step, self._next_batch(items))}
                self._count(record)
                if evaluate is not None and (self.step == steps or (eval_every and self.step % eval_every == 0)):
                    module.eval()
                    with torch.no_grad():
                        record.update({f"eval_{k}": v for k, v in evaluate().items()})
                self.elapsed = time.perf_counter() - t0
                self.log({**record, "elapsed_s": round(self.elapsed, 3)})
                self._stop_if_diverging(record)
                every = cfg.checkpoint_every
                if every and self.step % every == 0 and self.step < steps and self.bad_streak == 0:
                    self.save()
                shown = ("loss", "acc", "eval_loss", "eval_acc", "reward", "kl", "tracked")
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in shown})
                bar.update()
        finally:
            bar.close()
            self.log.close()
        if self.nonfinite == self.step:
            raise TrainingError(
                f"{self.stage}: all {self.step} steps had a non-finite loss, reward or gradient "
                f"(first: {self.log.records[0].get('nonfinite')}); nothing was learned, no checkpoint written"
            )
        return steps

    def _open(self) -> None:
        """Restore the checkpoint's state, or start clean; then open the log."""
        self.root.mkdir(parents=True, exist_ok=True)
        clear_interrupted(self.root)  # a save or prune killed half way
        if self.state is not None:
            self._restore(self.state)
        else:
            discard_checkpoints(self.existing)
            remove_adapter(self.root / "adapter")  # only its files: anything else in adapter/ stays
        self.log = RunLog(self.root, self.step if self.state is not None else None)

    def _restore(self, s: dict) -> None:
        folder = self.resume_from
        if s["items"] != self.n_items:
            raise DataError(
                f"cannot resume from {folder}: it was trained on {s['items']} items, {self.cfg.data or '--task'} "
                f"now gives {self.n_items} (different data)"
            )
        if has_lora(self.lm):  # the frozen base is the starting checkpoint's; the adapters are in the state
            _load_exact(self.lm, s["lora"], adapter_state_dict(self.lm), folder)
        else:
            load_weights(self.lm, folder, verify=False)  # verified in _read_state
        if self.vision is not None:
            load_vision_weights(self.vision, folder)
        _load_exact(self.module, load_heads(folder, verify=False), self.heads(), folder)
        self.opt.load_state_dict(s["optimizer"])
        self.order, self.step = list(s["order"]), s["step"]
        self.nonfinite, self.bad_streak, self.elapsed = s["nonfinite"], s["bad_streak"], s["elapsed"]
        self.g.set_state(s["generator"])
        torch.set_rng_state(s["rng"]["cpu"])
        if s["rng"].get("cuda") is not None and self.lm.lm_head.weight.is_cuda:
            torch.cuda.set_rng_state(s["rng"]["cuda"], self.lm.lm_head.weight.device)
        if self.extra is not None:
            self.extra[1](s["extra"])
        print(f"{self.stage}: resuming {folder} at step {self.step}", file=sys.stderr)

    def _next_batch(self, items: list) -> list:
        bs = self.cfg.batch_size
        while len(self.order) < bs:  # epochs of seeded permutations
            self.order += torch.randperm(len(items), generator=self.g).tolist()
        batch, self.order = [items[i] for i in self.order[:bs]], self.order[bs:]
        return batch

    def _count(self, record: dict) -> None:
        if "nonfinite" in record:
            self.nonfinite, self.bad_streak = self.nonfinite + 1, self.bad_streak + 1
        else:
            self.bad_streak = 0
        record["nonfinite_steps"] = self.nonfinite

    def _stop_if_diverging(self, record: dict) -> None:
        if self.bad_streak < self.cfg.max_bad_steps:
            return
        newest = list_checkpoints(self.root)
        raise TrainingError(
            f"{self.stage} stopped at step {self.step}: {self.bad_streak} consecutive steps with a non-finite "
            f"loss, reward or gradient (last: {record['nonfinite']}), skipped without an update; check the data "
            f"and the reward, or lower the learning rate. Last good checkpoint: {newest[-1] if newest else 'none'}"
        )

    # ---- checkpoints -------------------------------------------------------------------------------

    def save(self, summary: dict | None = None) -> Path:
        """step-NNNNNN with the training state (refused if a tensor is not finite), then keep the newest."""
        tensors = merged_state_dict(self.lm) if has_lora(self.lm) else self.lm.state_dict()
        heads = self.heads()
        bad = [k for k, v in {**tensors, **heads}.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingError(
                f"{self.stage}: refusing to save step {self.step}: {len(bad)} tensors are not finite (e.g. {bad[0]})"
            )
        train_config = {"stage": self.stage, **self.cfg.to_dict(), "summary": summary}
        if self.head_config:
            train_config["head"] = self.head_config
        path = save_checkpoint(
            self.lm, step_dir(self.root, self.step), step=self.step, tokenizer=self.lm.tokenizer,
            train_config=train_config, training_state=self._training_state(), tensors=tensors, heads=heads or None,
            vision=self.vision,
        )  # fmt: skip
        discard_checkpoints(list_checkpoints(self.root)[: -self.cfg.keep_checkpoints])
        return path

    def _training_state(self) -> dict:
        """optimizer.pt: everything besides the weights that an exact resume needs."""
        rng = {"cpu": torch.get_rng_state()}
        if self.lm.lm_head.weight.is_cuda:
            rng["cuda"] = torch.cuda.get_rng_state(self.lm.lm_head.weight.device)
        return {
            "optimizer": self.opt.state_dict(), "step": self.step, "items": self.n_items, "order": list(self.order),
            "generator": self.g.get_state(), "rng": rng, "nonfinite": self.nonfinite, "bad_streak": self.bad_streak,
            "elapsed": self.elapsed, "lora": adapter_state_dict(self.lm) if has_lora(self.lm) else {},
            "extra": self.extra[0]() if self.extra is not None else {},
        }  # fmt: skip

    def finish(self, summary: dict, plots: list[tuple[str, list[str]]] = ()) -> Path:
        """The final checkpoint (LoRA adapters merged in, and also saved alone), then the report section
        with the summary table and plots. Returns the checkpoint folder."""
        summary["nonfinite_steps"] = self.nonfinite  # the caller's summary gets them too
        if self.state is not None:
            summary["resumed_at_step"] = self.state["step"]
        if has_lora(self.lm):
            save_adapter(self.lm, self.root / "adapter")
        ckpt = self.save(summary)
        out, cfg = Path(self.cfg.out), self.cfg
        source = cfg.data or getattr(cfg, "task", "")
        lines = [f"## {self.stage}", "", f"From `{cfg.init}` on `{source}`; checkpoint `{ckpt}`.", ""]
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
        for name, keys in plots:
            png = plot_metrics(self.log.records, keys, self.root / f"{name}.png", title=f"{self.stage}: {name}")
            if png is not None:
                lines += ["", f"![{self.stage} {name}]({png.relative_to(out)})"]
        write_section(out / "report.md", self.stage, "\n".join(lines))
        return ckpt

    @property
    def records(self) -> list[dict]:
        return self.log.records


def _load_exact(module: nn.Module, tensors: dict[str, Tensor], expected: dict[str, Tensor], folder: Path) -> None:
    """Load `tensors` into `module` when their names and shapes are exactly those `expected`."""
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in tensors):
        raise CheckpointError(f"{folder}: its heads or adapters do not fit this run (names or shapes differ)")
    module.load_state_dict(tensors, strict=False)


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
