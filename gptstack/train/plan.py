"""What a pretraining run will do, decided before any compute: `plan_run(cfg)` reads the shard folder's
manifest and tokenizer, resolves the model config, the batch geometry and the run length, and checks a
checkpoint to resume from against all of them. It builds no model and touches no device, so every
mistake in the inputs fails here, in a second, with nothing written.

    plan = plan_run(TrainConfig(data="runs/stdlib", out="runs/tiny", model="tiny"))
    plan.model, plan.seq_len, plan.micro_tokens, plan.full_accum, plan.schedule

One optimizer step is `accum` micro-batches of (batch_size, seq_len) on every process; at the full
batch `accum = full_accum = batch_tokens / micro_tokens`. A wall-clock budget is the one length that
needs the model (its measured speed): then `plan.schedule` is None and the Trainer sizes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptstack import checkpoint
from gptstack.config import ConfigError, ModelConfig, load_config
from gptstack.data.shards import read_manifest
from gptstack.model import count_params, flops_per_token
from gptstack.tokenizer import get_tokenizer
from gptstack.train.config import TrainConfig, parse_budget
from gptstack.train.optim import plan as plan_steps


@dataclass(frozen=True)
class Schedule:
    """The run's length and learning-rate horizon, in tokens (stored in checkpoints as "plan")."""

    steps: int
    tokens: int
    warmup: int
    decay: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunPlan:
    data: Path
    out: Path
    manifest: dict
    tokenizer: Any  # the data's Tokenizer
    tokenizer_record: dict  # name, size and SHA-256 of the data's tokenizer files
    model: ModelConfig
    n_params: dict  # count_params(model): total and active
    seq_len: int  # T of every (B, T) micro-batch
    world: int  # processes
    micro_tokens: int  # tokens of one micro-batch on all processes: world · batch_size · seq_len
    full_accum: int  # micro-batches per optimizer step at the full batch
    flops_per_token: float  # training FLOPs per token at seq_len
    resume_from: Path | None  # the checkpoint to continue from
    schedule: Schedule | None  # None: a wall-clock budget, sized from the measured speed

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def plan_run(cfg: TrainConfig, world: int = 1, resume: bool = False) -> RunPlan:
    """Check the inputs and decide the run (see module docstring); raises ConfigError (or the data's
    FileNotFoundError / ValueError) naming what is wrong."""
    if not cfg.data or not cfg.out:
        raise ConfigError("both data (a shard folder) and out (a run folder) are required")
    data, out = Path(cfg.data), Path(cfg.out)
    manifest = read_manifest(data)
    tokenizer = get_tokenizer(data / manifest["tokenizer"]["folder"])
    model = resolve_model_config(cfg, tokenizer.n_vocab)
    seq_len = cfg.seq_len or model.block_size
    if model.block_size < seq_len:
        raise ConfigError(
            f"seq_len {seq_len} does not fit the model's context of {model.block_size} tokens "
            "(lower seq_len or set model_overrides block_size)"
        )
    micro_tokens = world * cfg.batch_size * seq_len
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise ConfigError(
            f"batch_tokens {batch_tokens:,} is not a multiple of one micro-batch on every process "
            f"({world}×{cfg.batch_size}×{seq_len} = {micro_tokens:,} tokens)"
        )
    record = tokenizer_record(data, manifest)
    resume_from = _resume_point(out / "checkpoints", resume)
    if resume_from:
        check_resumable(resume_from, model, record, data)
    n_params = count_params(model)
    full_accum = batch_tokens // micro_tokens
    seconds = parse_budget(cfg.budget) if cfg.budget else None
    fixed = cfg.max_steps is not None or cfg.max_tokens is not None or seconds is None
    return RunPlan(
        data=data, out=out, manifest=manifest, tokenizer=tokenizer, tokenizer_record=record, model=model,
        n_params=n_params, seq_len=seq_len, world=world, micro_tokens=micro_tokens, full_accum=full_accum,
        flops_per_token=flops_per_token(model, seq_len)["train"], resume_from=resume_from,
        schedule=schedule(cfg, micro_tokens, full_accum, n_params["total"]) if fixed else None,
    )  # fmt: skip


def schedule(
    cfg: TrainConfig, micro_tokens: int, full_accum: int, n_params: int, tokens_per_s: float | None = None
) -> Schedule:
    """The run length from max_steps, max_tokens, or the budget (chinchilla: tokens_per_param × n_params;
    a wall-clock budget: its seconds × tokens_per_s), and the warm-up and decay horizons."""
    max_steps, max_tokens = cfg.max_steps, cfg.max_tokens
    if max_steps is None and max_tokens is None:
        seconds = parse_budget(cfg.budget) if cfg.budget else None
        chinchilla = seconds is None  # the default
        max_tokens = int(cfg.tokens_per_param * n_params if chinchilla else seconds * tokens_per_s)
    steps, tokens = plan_steps(
        micro_tokens, full_accum, cfg.batch_ramp_start, cfg.batch_ramp_tokens, max_steps, max_tokens
    )
    warmup = cfg.warmup_tokens if cfg.warmup_tokens is not None else min(375_000_000, tokens // 20)
    return Schedule(steps, tokens, warmup, cfg.decay_tokens or tokens)


def resolve_model_config(cfg: TrainConfig, n_vocab: int) -> ModelConfig:
    """The model to train: a preset takes the data's vocabulary (padded to vocab_multiple); a config
    file or dict keeps its own vocab_size, which must cover the tokenizer."""
    explicit = isinstance(cfg.model, dict) or str(cfg.model).endswith(".json")
    padded = -(-n_vocab // cfg.vocab_multiple) * cfg.vocab_multiple
    if isinstance(cfg.model, dict):
        mcfg = ModelConfig.from_dict({**cfg.model, **cfg.model_overrides})
    else:
        mcfg = load_config(cfg.model, **({} if explicit else {"vocab_size": padded}), **cfg.model_overrides)
    if mcfg.vocab_size < n_vocab:
        raise ConfigError(f"the model's vocab_size {mcfg.vocab_size} is smaller than the data tokenizer's {n_vocab}")
    return mcfg


def tokenizer_record(data: Path, manifest: dict) -> dict:
    """Name, size and a SHA-256 over the tokenizer files of a shard folder: what a checkpoint must match."""
    folder = data / manifest["tokenizer"]["folder"]
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return {"name": manifest["tokenizer"]["name"], "n_vocab": manifest["tokenizer"]["n_vocab"], "sha256": h.hexdigest()}


def _resume_point(checkpoints: Path, resume: bool) -> Path | None:
    """The newest checkpoint when resuming; a run folder that has checkpoints is refused otherwise."""
    existing = checkpoint.list_checkpoints(checkpoints) if checkpoints.is_dir() else []
    if existing and not resume:
        raise ConfigError(
            f"{checkpoints} already has checkpoints (newest {existing[-1].name}): pass --resume to "
            "continue that run, or choose another --out"
        )
    return existing[-1] if existing else None


def check_resumable(folder: Path, model: ModelConfig, record: dict, data: Path) -> None:
    """The checkpoint holds this model, trained on data tokenized with this tokenizer."""
    folder, meta = checkpoint.read_meta(folder)
    saved_model = meta.get("model")
    if saved_model != model.to_dict():
        diff = sorted(k for k in model.to_dict() if (saved_model or {}).get(k) != getattr(model, k))
        raise ConfigError(f"cannot resume from {folder}: it holds a different model (fields differ: {', '.join(diff)})")
    saved_tok = meta.get("train", {}).get("data_tokenizer", {})
    if saved_tok.get("sha256") != record["sha256"]:
        raise ConfigError(
            f"cannot resume from {folder}: it was trained on data tokenized with {saved_tok.get('name')!r} "
            f"({saved_tok.get('n_vocab')} ids), but {data} uses {record['name']!r} "
            f"({record['n_vocab']} ids) or a different vocabulary"
        )
