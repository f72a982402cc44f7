"""TrainConfig: every setting of a pretraining run, the per-preset recipes, and how a run's config is
assembled from a preset, a JSON file and `key=value` overrides.

Each field's trailing comment is its help text (the CLI is generated from them); its default lives
only here. Validation that needs nothing but the config happens in `__post_init__`; what needs the
data or a checkpoint (the model's vocabulary, the batch geometry) happens in train/plan.py.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gptstack.config import ConfigError, ModelConfig, check_fields, parse_overrides
from gptstack.files import read_json

CODE_PROMPTS = ["def ", "import ", "class ", "    for i in range("]


# Per-preset recipe defaults, applied under the config file and the command line. GPT-3 (Brown et al.
# 2020, Table 2.1): peak learning rate and batch size in tokens (3.2M for 175B = 1536 × 2048); the batch
# ramp from 32k tokens "over the first 4-12 billion tokens ... depending on the model size" (§B), spread
# over the sizes by us. GPT-2 small: the GPT-3 small recipe, as nanoGPT reproduces it. Tiny: ours.
_GPT3_RAMP = dict(batch_ramp_start=32_768)
RECIPES: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(lr=6e-4, batch_tokens=2**19),
    "gpt3-small": dict(_GPT3_RAMP, lr=6e-4, batch_tokens=2**19, batch_ramp_tokens=4_000_000_000),
    "gpt3-medium": dict(_GPT3_RAMP, lr=3e-4, batch_tokens=2**19, batch_ramp_tokens=4_000_000_000),
    "gpt3-large": dict(_GPT3_RAMP, lr=2.5e-4, batch_tokens=2**19, batch_ramp_tokens=4_000_000_000),
    "gpt3-xl": dict(_GPT3_RAMP, lr=2e-4, batch_tokens=2**20, batch_ramp_tokens=6_000_000_000),
    "gpt3-2.7b": dict(_GPT3_RAMP, lr=1.6e-4, batch_tokens=2**20, batch_ramp_tokens=8_000_000_000),
    "gpt3-6.7b": dict(_GPT3_RAMP, lr=1.2e-4, batch_tokens=2**21, batch_ramp_tokens=10_000_000_000),
    "gpt3-13b": dict(_GPT3_RAMP, lr=1e-4, batch_tokens=2**21, batch_ramp_tokens=10_000_000_000),
    "gpt3-175b": dict(_GPT3_RAMP, lr=0.6e-4, batch_tokens=1536 * 2048, batch_ramp_tokens=12_000_000_000),
    **{
        name: dict(lr=1e-3, batch_size=8, eval_every=250)
        for name in ("tiny", "tiny-gpt1", "tiny-gpt3", "tiny-llama", "tiny-moe")
    },
}


@dataclass
class TrainConfig:
    data: str = ""  # shard folder from `gptstack data prepare`
    out: str = ""  # run folder (checkpoints, metrics, report)
    model: str | dict = "tiny"  # model preset (see `gptstack info`), ModelConfig JSON file, or dict of its fields
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change, e.g. {"n_layer": 6}
    vocab_multiple: int = 64  # a preset's vocabulary = the tokenizer's, padded up to this multiple
    # batch: micro-batches of (batch_size, seq_len) per process, accumulated to batch_tokens per step
    batch_size: int = 8  # sequences per micro-batch per process
    seq_len: int | None = None  # tokens per sequence (default: the model's context)
    batch_tokens: int | None = None  # tokens per optimizer step, by gradient accumulation (default: no accumulation)
    batch_ramp_start: int | None = None  # GPT-3 batch ramp: tokens per step at the start (default: no ramp)
    batch_ramp_tokens: int = 0  # GPT-3 batch ramp: tokens over which the batch grows linearly to batch_tokens
    # length: max_steps, max_tokens, or a budget; default chinchilla
    max_steps: int | None = None  # optimizer steps to train
    max_tokens: int | None = None  # tokens to train on
    budget: str | None = None  # chinchilla (tokens_per_param × parameters, the default) or a time: 90s, 10m, 2h
    tokens_per_param: float = 20.0  # the chinchilla budget's tokens per parameter
    # optimizer (GPT-3 §B)
    lr: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr × this
    warmup_tokens: int | None = None  # linear warm-up length in tokens (default: min(375M, 5% of the run))
    decay_tokens: int | None = None  # cosine decay length in tokens (default: the whole run)
    beta1: float = 0.9  # AdamW β1
    beta2: float = 0.95  # AdamW β2
    eps: float = 1e-8  # AdamW ε
    weight_decay: float = 0.1  # AdamW weight decay on the weight matrices
    decay_embeddings: bool = True  # also decay the position table and an untied token embedding
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    fused_adamw: bool = True  # the fused AdamW kernel where torch has one
    # precision and speed
    device: str = "auto"  # auto | cpu | cuda
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 autocast on CUDA
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in the backward pass (less memory)
    distributed: Literal["ddp", "fsdp"] = "ddp"  # data parallelism under torchrun
    # checkpoints and guards
    checkpoint_every: int = 1000  # steps between checkpoints (0 = only at the end and by time)
    checkpoint_minutes: float = 30.0  # minutes between timed checkpoints (0 = off)
    keep_checkpoints: int = 3  # newest checkpoints kept
    max_bad_steps: int = 5  # consecutive non-finite steps that stop the run
    # observability
    eval_every: int = 250  # steps between validations and samples (0 = only at the end)
    eval_batches: int = 20  # validation batches per evaluation
    sample_prompts: list[str] = field(default_factory=lambda: list(CODE_PROMPTS))  # prompts sampled at evaluations
    sample_tokens: int = 48  # tokens sampled per prompt
    seed: int = 1337  # initialisation and sampling seed
    progress: bool = True  # show a progress bar
    tensorboard: bool = True  # write TensorBoard events to RUN_DIR/tb when tensorboard is installed

    def __post_init__(self) -> None:
        for name in ("batch_size", "vocab_multiple", "eval_batches", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len", "batch_tokens", "max_steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype {self.dtype!r} is not one of auto, fp32, bf16, fp16")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed {self.distributed!r} is not one of ddp, fsdp")
        if self.budget is not None:
            parse_budget(self.budget)
        if not 0 <= self.min_lr_ratio <= 1 or self.lr <= 0:
            raise ConfigError("lr must be > 0 and min_lr_ratio in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_fields(cls, d)
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        return cls.from_dict({**read_config_file(path), **overrides})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The fields in a training config JSON file (a run's train_config.json is one)."""
    d = read_json(path, ConfigError, "config file")
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object of TrainConfig fields, got {type(d).__name__}")
    return d


def parse_budget(budget: str) -> float | None:
    """None for "chinchilla"; seconds for a duration like "45s", "10m", "1.5h"."""
    if budget == "chinchilla":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh])", budget.strip())
    if not m:
        raise ConfigError(f"budget {budget!r} is not 'chinchilla' or a duration like 90s, 10m, 2h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def make_config(config_file: str | None, preset: str | None, overrides: list[str], **fields: Any) -> TrainConfig:
    """A TrainConfig from, in increasing precedence: the preset's recipe (RECIPES), an optional JSON file,
    `key=value` overrides (TrainConfig fields first, else ModelConfig fields) and explicit fields (None
    values are ignored)."""
    d: dict[str, Any] = dict(RECIPES.get(preset or "", {}))
    if config_file:
        d.update(read_config_file(config_file))
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    train_items = [o for o in overrides if o.partition("=")[0] in train_keys]
    model_items = [o for o in overrides if o.partition("=")[0] not in train_keys]
    d.update(parse_overrides(train_items, TrainConfig))
    d["model_overrides"] = {**d.get("model_overrides", {}), **parse_overrides(model_items, ModelConfig)}
    if preset:
        d["model"] = preset
    d.update({k: v for k, v in fields.items() if v is not None})
    return TrainConfig.from_dict(d)
