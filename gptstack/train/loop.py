"""Pretraining: the GPT-3 recipe on token shards, on one CPU or under torchrun (DDP / FSDP2).

    trainer = Trainer(TrainConfig(data="runs/stdlib", out="runs/tiny", model="tiny", max_steps=100))
    summary = trainer.run()

One optimizer step = `accum` micro-batches of (batch_size, seq_len) on every process; `accum` follows
the batch ramp up to `batch_tokens / (world · batch_size · seq_len)`. The learning rate and the batch
are functions of the tokens trained on (train/optim.py), so a checkpoint's training state (weights,
optimizer, tokens, loader cursor, RNG states, step) resumes bit-exactly on CPU.

Run folder:
    RUN_DIR/train_config.json            the resolved TrainConfig (a valid --config file)
    RUN_DIR/metrics.jsonl                one JSON object per step: step, tokens, loss, lr, grad_norm,
                                         tokens_per_s, mfu, … (+ val_loss, val_bpb, samples at evals)
    RUN_DIR/checkpoints/step-XXXXXX/     checkpoint folders (checkpoint.py), the newest `keep` kept
    RUN_DIR/report.md, RUN_DIR/loss.png  written at the end (report.py)
    RUN_DIR/tb/                          TensorBoard events, when tensorboard is installed
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptstack import checkpoint as ckpt
from gptstack.config import ConfigError, ModelConfig, check_fields, load_config
from gptstack.data.loader import TokenLoader
from gptstack.data.shards import atomic_write, read_manifest
from gptstack.model import build_model, count_params, flops_per_token
from gptstack.train import distributed as D
from gptstack.train.optim import accum_steps_at, build_adamw, lr_at, param_groups, plan

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


class TrainingError(RuntimeError):
    """Training stopped and cannot go on by itself; the message says why and what is safe on disk."""


@dataclass
class TrainConfig:
    data: str = ""  # shard folder from `gptstack data prepare`
    out: str = ""  # run folder
    model: str | dict = "tiny"  # preset name, config JSON path, or a dict of ModelConfig fields
    model_overrides: dict = field(default_factory=dict)
    vocab_multiple: int = 64  # a preset's vocabulary = the tokenizer's, padded up to this multiple
    # batch: micro-batches of (batch_size, seq_len) per process, accumulated to batch_tokens per step
    batch_size: int = 8
    seq_len: int | None = None  # None → the model's context
    batch_tokens: int | None = None  # global tokens per optimizer step; None → one micro-batch per process
    batch_ramp_start: int | None = None  # GPT-3 batch ramp: tokens per step at the start…
    batch_ramp_tokens: int = 0  # …growing linearly to batch_tokens over this many tokens
    # length: max_steps, max_tokens, or a budget ("chinchilla" = tokens_per_param × parameters, or a
    # wall-clock time such as "90s", "10m", "2h" sized from the measured step time); default chinchilla
    max_steps: int | None = None
    max_tokens: int | None = None
    budget: str | None = None
    tokens_per_param: float = 20.0
    # optimizer (GPT-3 §B)
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_tokens: int | None = None  # None → min(375M, 5% of the run)
    decay_tokens: int | None = None  # None → the whole run
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    grad_clip: float = 1.0  # 0 = off
    fused_adamw: bool = True
    # precision and speed
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16 | fp16 (GradScaler)
    compile: bool = False
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # ddp | fsdp, when launched by torchrun
    # checkpoints and guards
    checkpoint_every: int = 1000  # steps; 0 = only at the end (and by time)
    checkpoint_minutes: float = 30.0  # 0 = off
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # consecutive non-finite steps that stop the run
    # observability
    eval_every: int = 250  # steps; 0 = only at the end
    eval_batches: int = 20
    sample_prompts: list = field(default_factory=lambda: list(CODE_PROMPTS))
    sample_tokens: int = 48
    seed: int = 1337
    progress: bool = True
    tensorboard: bool = True

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
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict({**d, **overrides})


def parse_budget(budget: str) -> float | None:
    """None for "chinchilla"; seconds for a duration like "45s", "10m", "1.5h"."""
    if budget == "chinchilla":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh])", budget.strip())
    if not m:
        raise ConfigError(f"budget {budget!r} is not 'chinchilla' or a duration like 90s, 10m, 2h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


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


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg, self.d = cfg, D.setup(cfg.device)
        if not cfg.data or not cfg.out:
            raise ConfigError("both data (a shard folder) and out (a run folder) are required")
        self.out, self.data = Path(cfg.out), Path(cfg.data)
        self.ckpt_dir = self.out / "checkpoints"
        # ---- everything that can be wrong with the inputs is checked before any compute ----
        manifest = read_manifest(self.data)
        from gptstack.tokenizer import get_tokenizer

        self.tokenizer = get_tokenizer(self.data / manifest["tokenizer"]["folder"])
        self.tok_record = tokenizer_record(self.data, manifest)
        self.model_cfg = resolve_model_config(cfg, self.tokenizer.n_vocab)
        self.T = cfg.seq_len or self.model_cfg.block_size
        if self.model_cfg.block_size < self.T:
            raise ConfigError(
                f"seq_len {self.T} does not fit the model's context of {self.model_cfg.block_size} tokens "
                "(lower seq_len or set model_overrides block_size)"
            )
        self.micro_tokens = self.d.world * cfg.batch_size * self.T
        batch_tokens = cfg.batch_tokens or self.micro_tokens
        if batch_tokens % self.micro_tokens:
            raise ConfigError(
                f"batch_tokens {batch_tokens:,} is not a multiple of one micro-batch on every process "
                f"({self.d.world}×{cfg.batch_size}×{self.T} = {self.micro_tokens:,} tokens)"
            )
        self.full_accum = batch_tokens // self.micro_tokens
        self.loader = TokenLoader(self.data, cfg.batch_size, self.T, "train", self.d.rank, self.d.world, self.d.device)
        self.val_loader = None
        if "val" in manifest["splits"] and manifest["splits"]["val"]["tokens"] > self.micro_tokens:
            self.val_loader = TokenLoader(
                self.data, cfg.batch_size, self.T, "val", self.d.rank, self.d.world, self.d.device
            )
        existing = ckpt.list_checkpoints(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        if existing and not resume:
            raise ConfigError(
                f"{self.ckpt_dir} already has checkpoints (newest {existing[-1].name}): pass --resume to "
                "continue that run, or choose another --out"
            )
        self.resume_from = existing[-1] if resume and existing else None
        state = self._check_resume() if self.resume_from else None

        # ---- model, optimizer, precision ----
        self.dtype = {"auto": torch.bfloat16 if self.d.device.type == "cuda" else torch.float32,
                      "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]  # fmt: skip
        self.autocast = (
            torch.autocast(self.d.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        self.scaler = torch.amp.GradScaler(self.d.device.type) if self.dtype == torch.float16 else None
        base = build_model(self.model_cfg, self.d.device, seed=cfg.seed)
        if self.resume_from:
            ckpt.load_weights(base, self.resume_from, verify=False)  # verified in _check_resume
        base.activation_checkpointing = cfg.activation_checkpointing
        self.base = base
        wrapped = D.wrap(base, cfg.distributed, self.d)
        self.optimizer = build_adamw(
            param_groups(wrapped, cfg.weight_decay, cfg.decay_embeddings),
            cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.fused_adamw,
        )  # fmt: skip
        self.wrapped = wrapped
        self.model = torch.compile(wrapped) if cfg.compile else wrapped
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.n_params = count_params(self.model_cfg)
        self.flops_per_token = flops_per_token(self.model_cfg, self.T)["train"]
        self.peak, self.peak_source = D.peak_flops(self.d.device, self.dtype)
        self.step, self.tokens, self.skipped, self.bad_streak, self.elapsed = 0, 0, 0, 0, 0.0
        self.plan: dict = {}
        if state is not None:
            self._restore(state)
        else:
            torch.manual_seed(cfg.seed + self.d.rank)
            self.plan = self._plan()
        self.token_bytes = self._token_bytes()
        self.prompts = []  # the sample prompts this tokenizer can encode (a `chars` vocabulary may lack some)
        for prompt in cfg.sample_prompts:
            try:
                self.prompts.append((prompt, self.tokenizer.encode(prompt)))
            except ValueError as e:
                print(f"skipping sample prompt {prompt!r}: {e}", file=sys.stderr)

    # ---- set-up helpers --------------------------------------------------------------------
    def _check_resume(self) -> dict:
        folder, meta = ckpt.read_meta(self.resume_from)
        saved_model = meta.get("model")
        if saved_model != self.model_cfg.to_dict():
            diff = sorted(
                k for k in self.model_cfg.to_dict() if (saved_model or {}).get(k) != getattr(self.model_cfg, k)
            )
            raise ConfigError(
                f"cannot resume from {folder}: it holds a different model (fields differ: {', '.join(diff)})"
            )
        saved_tok = meta.get("train", {}).get("data_tokenizer", {})
        if saved_tok.get("sha256") != self.tok_record["sha256"]:
            raise ConfigError(
                f"cannot resume from {folder}: it was trained on data tokenized with {saved_tok.get('name')!r} "
                f"({saved_tok.get('n_vocab')} ids), but {self.data} uses {self.tok_record['name']!r} "
                f"({self.tok_record['n_vocab']} ids) or a different vocabulary"
            )
        ckpt.verify_files(folder, meta)  # checksums before anything is unpickled
        state = ckpt.load_training_state(folder)
        if not state or "optimizer" not in state:
            raise ConfigError(f"cannot resume from {folder}: it has no training state (optimizer.pt)")
        if state["loader"]["total"] != self.loader.total:
            raise ConfigError(
                f"cannot resume from {folder}: it was trained on a {state['loader']['total']:,}-token stream, "
                f"{self.data} has {self.loader.total:,} train tokens (different data)"
            )
        return state

    def _restore(self, state: dict) -> None:
        D.load_optimizer_state(self.wrapped, self.optimizer, state["optimizer"], self.cfg.distributed)
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.skipped, self.elapsed = state.get("skipped", 0), state.get("elapsed", 0.0)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) == self.d.world:
            torch.set_rng_state(rngs[self.d.rank]["cpu"])
            if self.d.device.type == "cuda" and rngs[self.d.rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rngs[self.d.rank]["cuda"], self.d.device)
        else:
            torch.manual_seed(self.cfg.seed + self.d.rank + self.step)
        saved = state["plan"]
        timed = self.cfg.budget is not None and parse_budget(self.cfg.budget) is not None
        self.plan = saved if timed else self._plan()

    def _plan(self) -> dict:
        """Resolve the run length and the schedule horizon, in tokens."""
        cfg = self.cfg
        max_steps, max_tokens = cfg.max_steps, cfg.max_tokens
        seconds = parse_budget(cfg.budget) if cfg.budget else None
        if max_steps is None and max_tokens is None:
            if seconds is None:  # chinchilla, the default
                max_tokens = int(cfg.tokens_per_param * self.n_params["total"])
            else:
                max_tokens = int(seconds * self._probe_tokens_per_s())
        steps, tokens = plan(
            self.micro_tokens, self.full_accum, cfg.batch_ramp_start, cfg.batch_ramp_tokens, max_steps, max_tokens
        )
        warmup = cfg.warmup_tokens if cfg.warmup_tokens is not None else min(375_000_000, tokens // 20)
        return {"steps": steps, "tokens": tokens, "warmup": warmup, "decay": cfg.decay_tokens or tokens}

    def _probe_tokens_per_s(self) -> float:
        """Training tokens/s measured on real batches, for sizing a wall-clock budget: micro-batches
        (forward + backward) and optimizer steps (clip + AdamW at lr 0, which leaves the weights as they
        are; the AdamW state it creates is dropped), with the RNG and the data cursor restored.
        Discounted by 10% for evaluation and checkpoints."""
        micro, update = [], []
        with torch.random.fork_rng(devices=[self.d.device] if self.d.device.type == "cuda" else []):
            cursor = self.loader.state_dict()
            for g in self.optimizer.param_groups:
                g["lr"] = 0.0
            for _ in range(4):
                x, y = self.loader.next_batch()
                t0 = time.perf_counter()
                with self.autocast:
                    _, loss = self.model(x, y)
                loss.backward()
                self._sync()
                t1 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(self.params, math.inf)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._sync()
                micro.append(t1 - t0)
                update.append(time.perf_counter() - t1)
            self.loader.load_state_dict(cursor)
            self.optimizer.state.clear()
        # the first repetition includes warm-up (and compilation)
        step_s = self.full_accum * statistics.median(micro[1:]) + statistics.median(update[1:])
        rate = torch.tensor([self.full_accum * self.micro_tokens / step_s], device=self.d.device)
        rate = D.all_reduce_sum(rate) / self.d.world
        return 0.9 * float(rate)

    def _token_bytes(self) -> torch.Tensor:
        """(V,) UTF-8 bytes of each token id (0 for special and unused ids), for bits per byte."""
        out = torch.zeros(self.model_cfg.vocab_size, dtype=torch.long)
        for piece, i in self.tokenizer.ranks.items():
            if i < len(out):
                out[i] = len(piece)
        return out.to(self.d.device)

    def _sync(self) -> None:
        if self.d.device.type == "cuda":
            torch.cuda.synchronize(self.d.device)

    # ---- one optimizer step ----------------------------------------------------------------
    def train_step(self, want_save: bool = False) -> dict:
        """Run one optimizer step (or skip it when the loss or gradients are not finite).
        Returns the step's metrics; `save` in them is True when any rank asked for a timed save."""
        cfg = self.cfg
        accum = accum_steps_at(
            self.tokens, self.micro_tokens, self.full_accum, cfg.batch_ramp_start, cfg.batch_ramp_tokens
        )
        step_tokens = accum * self.micro_tokens
        lr = lr_at(self.tokens + step_tokens, cfg.lr, self.plan["warmup"], self.plan["decay"], cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.d.device)
        for i in range(accum):
            x, y = self.loader.next_batch()  # (B, T) each
            with D.no_sync(self.wrapped, last=i == accum - 1), self.autocast:
                _, loss = self.model(x, y)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float()
        shared = torch.stack([loss_sum / accum, torch.tensor(float(want_save), device=self.d.device)])
        shared = D.all_reduce_sum(shared)  # (2,): summed losses, save votes
        loss_value = float(shared[0]) / self.d.world
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(loss_value) and math.isfinite(norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself on inf/NaN gradients
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        dt = time.perf_counter() - t0
        self.elapsed += dt
        self.step += 1
        self.tokens += step_tokens
        if finite:
            self.bad_streak = 0
        else:
            self.skipped += 1
            self.bad_streak += 1
        tps = step_tokens / dt
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": norm,
            "batch_tokens": step_tokens,
            "tokens_per_s": tps,
            "mfu": self.flops_per_token * tps / (self.peak * self.d.world),
            "skipped": self.skipped,
            "time": self.elapsed,
            "save": bool(shared[1] > 0),
        }

    # ---- evaluation and samples --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss (nats/token) and bits per byte over the first eval_batches windows of
        the val split (the same windows every time)."""
        if self.val_loader is None:
            return {}
        self.model.eval()
        self.val_loader.load_state_dict({"position": 0, "epoch": 0, "total": self.val_loader.total})
        sums = torch.zeros(4, dtype=torch.float64, device=self.d.device)
        for _ in range(self.cfg.eval_batches):
            x, y = self.val_loader.next_batch()
            with self.autocast:
                logits = self.model(x)  # (B, T, V)
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (B·T,)
            nbytes = self.token_bytes[y.flatten()]
            sums += torch.stack([nats.sum(), (nats * (nbytes > 0)).sum(), nbytes.sum(), torch.tensor(nats.numel())])
        sums = D.all_reduce_sum(sums)
        self.model.train()
        return {"val_loss": float(sums[0] / sums[3]), "val_bpb": float(sums[1] / (math.log(2) * sums[2]))}

    @torch.no_grad()
    def samples(self) -> list[dict]:
        """One sampled completion per prompt (every rank runs it, so FSDP can gather weights)."""
        from gptstack.infer.generate import generate
        from gptstack.infer.sampling import SamplingParams

        model = D.unwrap(self.wrapped)
        model.eval()
        allowed = self.tokenizer.decodable_mask(self.model_cfg.vocab_size)
        out = []
        for i, (prompt, ids) in enumerate(self.prompts):
            n = min(self.cfg.sample_tokens, self.model_cfg.block_size - len(ids))
            if not ids or n <= 0:
                continue
            params = SamplingParams(temperature=0.8, top_k=40, seed=self.cfg.seed + i)
            new = list(generate(model, ids, n, params, frozenset({self.tokenizer.eot_id}), allowed=allowed))
            out.append({"prompt": prompt, "completion": self.tokenizer.decode(new)})
        model.train()
        return out

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        """Write step-XXXXXX (every rank takes part; rank 0 writes), then keep the newest `keep`."""
        weights = D.full_model_state(self.wrapped, self.cfg.distributed)
        optim = D.full_optimizer_state(self.wrapped, self.optimizer, self.cfg.distributed)
        rng = {"cpu": torch.get_rng_state()}
        if self.d.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.d.device)
        rngs = D.gather_objects(rng)
        path = ckpt.step_dir(self.ckpt_dir, self.step)
        if self.d.main:
            state = {
                "optimizer": optim,
                "scheduler": {"tokens": self.tokens},  # lr and batch are functions of tokens (optim.py)
                "step": self.step,
                "tokens": self.tokens,
                "loader": self.loader.state_dict(),
                "rng": rngs,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "skipped": self.skipped,
                "elapsed": self.elapsed,
                "plan": self.plan,
                "world": self.d.world,
            }
            train = {**self.cfg.to_dict(), "data_tokenizer": self.tok_record}
            ckpt.save_checkpoint(
                self.base, path, step=self.step, tokenizer=self.tokenizer,
                train_config=train, training_state=state, tensors=weights,
            )  # fmt: skip
            for old in ckpt.list_checkpoints(self.ckpt_dir)[: -self.cfg.keep_checkpoints]:
                trash = old.with_name(f".tmp-{old.name}-pruned")  # renamed first: a kill mid-delete
                os.rename(old, trash)  # never leaves a half-deleted step-* folder behind
                shutil.rmtree(trash, ignore_errors=True)
        D.barrier()
        return path

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        cfg, main = self.cfg, self.d.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            for junk in self.ckpt_dir.glob(".tmp-step-*"):  # a save killed half way: never a step-* name
                shutil.rmtree(junk, ignore_errors=True)
            atomic_write(self.out / "train_config.json", json.dumps(self.cfg.to_dict(), indent=2).encode())
        D.barrier()
        log = MetricsLog(self.out / "metrics.jsonl", self.step if self.resume_from else None) if main else None
        tb = self._tensorboard() if main else None
        if main:
            self._announce()
        bar = tqdm(total=self.plan["tokens"], initial=self.tokens, unit="tok", unit_scale=True,
                   disable=not (main and cfg.progress), file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        last_save, saved_step = time.monotonic(), self.step
        last_eval: dict = {}
        samples: list[dict] = []
        self.model.train()
        try:
            while self.step < self.plan["steps"]:
                timed = cfg.checkpoint_minutes > 0 and time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes
                rec = self.train_step(want_save=main and timed)
                if self.bad_streak >= cfg.max_bad_steps:
                    newest = ckpt.list_checkpoints(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
                    raise TrainingError(
                        f"stopped at step {self.step}: {self.bad_streak} consecutive steps with a non-finite loss or "
                        f"gradient (last loss {rec['loss']}, grad norm {rec['grad_norm']}); lower the learning rate "
                        "or check the data. Last good checkpoint: "
                        + (str(newest[-1]) if newest else "none (no checkpoint was written yet)")
                    )
                last = self.step >= self.plan["steps"]
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    last_eval = self.evaluate()
                    samples = self.samples()
                    rec.update(last_eval, samples=samples)
                if main:
                    save_flag = rec.pop("save")
                    log.write(rec)
                    if tb:
                        for k, v in rec.items():
                            if isinstance(v, (int, float)) and k != "step":
                                tb.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, self.step)
                    bar.update(rec["batch_tokens"])
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}",
                                    mfu=f"{rec['mfu']:.1%}", refresh=False)  # fmt: skip
                else:
                    save_flag = rec.pop("save")
                periodic = (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or save_flag
                if (periodic and self.bad_streak == 0) or last:
                    self.save()
                    last_save, saved_step = time.monotonic(), self.step
        finally:
            bar.close()
            if log:
                log.close()
            if tb:
                tb.close()
        if saved_step != self.step:
            self.save()
        summary = self._summary(last_eval, samples)
        if main:
            from gptstack.report import write_pretrain_report

            summary["report"] = str(write_pretrain_report(self.out, summary))
        return summary

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tb"))

    def _announce(self) -> None:
        p = self.plan
        resumed = f"resuming {self.resume_from} at step {self.step:,}; " if self.resume_from else ""
        print(
            f"{resumed}training {self.n_params['total']:,} parameters on {self.d.world} × {self.d.device.type} "
            f"({self.dtype}, {self.cfg.distributed if self.d.active else 'single process'}): {p['steps']:,} steps, "
            f"{p['tokens']:,} tokens, {self.full_accum * self.micro_tokens:,} tokens per step; "
            f"MFU peak: {self.peak_source}",
            file=sys.stderr,
        )

    def _summary(self, last_eval: dict, samples: list[dict]) -> dict:
        records = read_metrics(self.out / "metrics.jsonl") if self.d.main else []
        tail = [r["tokens_per_s"] for r in records[len(records) // 10 :]] or [0.0]
        return {
            "run": str(self.out),
            "model": self.model_cfg.to_dict(),
            "params": self.n_params,
            "steps": self.step,
            "tokens": self.tokens,
            "skipped": self.skipped,
            "train_seconds": self.elapsed,
            "tokens_per_s": statistics.median(tail),
            "mfu": statistics.median(tail) * self.flops_per_token / (self.peak * self.d.world),
            "peak_source": self.peak_source,
            "world": self.d.world,
            "device": self.d.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "final_loss": records[-1]["loss"] if records else None,
            **last_eval,
            "samples": samples,
            "checkpoint": str(ckpt.step_dir(self.ckpt_dir, self.step)),
            "config": self.cfg.to_dict(),
        }


def pretrain(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train, then tear the process group down. Returns the run summary (rank 0's is complete)."""
    try:
        return Trainer(cfg, resume=resume).run()
    finally:
        D.teardown()


def make_config(config_file: str | None, preset: str | None, overrides: list[str], **fields: Any) -> TrainConfig:
    """A TrainConfig from, in increasing precedence: the preset's recipe (RECIPES), an optional JSON file,
    `key=value` overrides (TrainConfig fields first, else ModelConfig fields) and explicit fields (None
    values are ignored)."""
    from gptstack.config import parse_overrides

    if config_file:
        TrainConfig.from_file(config_file)  # validates the file with a clear error
    d: dict[str, Any] = dict(RECIPES.get(preset or "", {}))
    d.update(json.loads(Path(config_file).read_text()) if config_file else {})
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    train_items = [o for o in overrides if o.partition("=")[0] in train_keys]
    model_items = [o for o in overrides if o.partition("=")[0] not in train_keys]
    d.update(parse_overrides(train_items, TrainConfig))
    d["model_overrides"] = {**d.get("model_overrides", {}), **parse_overrides(model_items, ModelConfig)}
    if preset:
        d["model"] = preset
    d.update({k: v for k, v in fields.items() if v is not None})
    return TrainConfig.from_dict(d)
