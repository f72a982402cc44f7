"""Pretraining: the GPT-3 recipe on token shards, on one CPU or under torchrun (DDP / FSDP2).

    trainer = Trainer(TrainConfig(data="runs/stdlib", out="runs/tiny", model="tiny", max_steps=100))
    summary = trainer.run()

`Trainer(cfg)` first plans the run (train/plan.py: data, tokenizer, model config, batch geometry,
length, resume point, all checked before any compute), then builds the loaders, the model, the
optimizer and the precision context. One optimizer step = `accum` micro-batches of (batch_size,
seq_len) on every process; `accum` follows the batch ramp up to `plan.full_accum`. The learning rate
and the batch are functions of the tokens trained on (train/optim.py), so a checkpoint's training
state (weights, optimizer, tokens, loader cursor, RNG states, step) resumes bit-exactly on CPU.

Run folder:
    RUN_DIR/train_config.json            the resolved TrainConfig (a valid --config file)
    RUN_DIR/metrics.jsonl                one JSON object per step (train/metrics.py)
    RUN_DIR/checkpoints/step-XXXXXX/     checkpoint folders (checkpoint.py), the newest `keep` kept
    RUN_DIR/report.md, RUN_DIR/loss.png  written at the end (train/report.py)
    RUN_DIR/tb/                          TensorBoard events, when tensorboard is installed
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptstack import checkpoint
from gptstack.config import ConfigError
from gptstack.data.loader import TokenLoader
from gptstack.data.shards import atomic_write
from gptstack.infer.generate import generate
from gptstack.infer.sampling import SamplingParams
from gptstack.model import build_model
from gptstack.train import distributed
from gptstack.train.config import TrainConfig, parse_budget
from gptstack.train.metrics import RunLog, read_metrics
from gptstack.train.optim import accum_steps_at, build_adamw, lr_at, param_groups
from gptstack.train.plan import Schedule, plan_run, schedule
from gptstack.train.report import write_pretrain_report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training stopped and cannot go on by itself; the message says why and what is safe on disk."""


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg, self.d = cfg, distributed.setup(cfg.device)
        self.plan = plan_run(cfg, self.d.world, resume)  # every input is checked before any compute
        self.tokenizer, self.model_cfg = self.plan.tokenizer, self.plan.model
        self.out, self.ckpt_dir = self.plan.out, self.plan.checkpoints
        self.loader, self.val_loader = self._loaders()
        state = self._resume_state() if self.plan.resume_from else None
        self.dtype, self.autocast, self.scaler = precision(cfg.dtype, self.d.device)
        self._build_model()
        self.peak, self.peak_source = distributed.peak_flops(self.d.device, self.dtype)
        self.step, self.tokens, self.skipped, self.bad_streak, self.elapsed = 0, 0, 0, 0, 0.0
        if state is not None:
            self._restore(state)
        else:
            torch.manual_seed(cfg.seed + self.d.rank)
            self.schedule = self.plan.schedule or self._timed_schedule()
        self.token_bytes = self._token_bytes()
        self.prompts = encodable_prompts(self.tokenizer, cfg.sample_prompts)

    # ---- set-up helpers --------------------------------------------------------------------
    def _loaders(self) -> tuple[TokenLoader, TokenLoader | None]:
        """The train loader, and a val loader when the val split holds more than one micro-batch."""
        plan, d = self.plan, self.d

        def loader(split: str) -> TokenLoader:
            return TokenLoader(plan.data, self.cfg.batch_size, plan.seq_len, split, d.rank, d.world, d.device)

        val_tokens = plan.manifest["splits"].get("val", {}).get("tokens", 0)
        return loader("train"), loader("val") if val_tokens > plan.micro_tokens else None

    def _resume_state(self) -> dict:
        """The checkpoint's training state, after its checksums (plan_run checked model and tokenizer)."""
        folder, meta = checkpoint.read_meta(self.plan.resume_from)
        checkpoint.verify_files(folder, meta)  # checksums before anything is unpickled
        state = checkpoint.load_training_state(folder)
        if not state or "optimizer" not in state:
            raise ConfigError(f"cannot resume from {folder}: it has no training state (optimizer.pt)")
        if state["loader"]["total"] != self.loader.total:
            raise ConfigError(
                f"cannot resume from {folder}: it was trained on a {state['loader']['total']:,}-token stream, "
                f"{self.plan.data} has {self.loader.total:,} train tokens (different data)"
            )
        return state

    def _build_model(self) -> None:
        """`base` (the GPT), `wrapped` (DDP/FSDP), `model` (wrapped, maybe compiled) and the AdamW."""
        cfg = self.cfg
        self.base = build_model(self.model_cfg, self.d.device, seed=cfg.seed)
        if self.plan.resume_from:
            checkpoint.load_weights(self.base, self.plan.resume_from, verify=False)  # verified in _resume_state
        self.base.activation_checkpointing = cfg.activation_checkpointing
        self.wrapped = distributed.wrap(self.base, cfg.distributed, self.d)
        self.optimizer = build_adamw(
            param_groups(self.wrapped, cfg.weight_decay, cfg.decay_embeddings),
            cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.fused_adamw,
        )  # fmt: skip
        self.model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _restore(self, state: dict) -> None:
        distributed.load_optimizer_state(self.wrapped, self.optimizer, state["optimizer"], self.cfg.distributed)
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
        timed = self.cfg.budget is not None and parse_budget(self.cfg.budget) is not None
        self.schedule = Schedule(**state["plan"]) if timed else self.plan.schedule  # a timed run keeps its length

    def _timed_schedule(self) -> Schedule:
        """The schedule of a wall-clock budget, sized from the measured training speed."""
        plan = self.plan
        rate = self._probe_tokens_per_s()
        return schedule(self.cfg, plan.micro_tokens, plan.full_accum, plan.n_params["total"], tokens_per_s=rate)

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
                t0 = time.perf_counter()
                self._forward_backward(1)
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
        full_accum = self.plan.full_accum
        step_s = full_accum * statistics.median(micro[1:]) + statistics.median(update[1:])
        rate = torch.tensor([full_accum * self.plan.micro_tokens / step_s], device=self.d.device)
        rate = distributed.all_reduce_sum(rate) / self.d.world
        return 0.9 * float(rate)

    def _token_bytes(self) -> torch.Tensor:
        """(V,) UTF-8 bytes of each token id, for bits per byte (see token_byte_counts)."""
        return token_byte_counts(self.tokenizer, self.model_cfg.vocab_size).to(self.d.device)

    def _sync(self) -> None:
        if self.d.device.type == "cuda":
            torch.cuda.synchronize(self.d.device)

    # ---- one optimizer step ----------------------------------------------------------------
    def train_step(self, want_save: bool = False) -> dict:
        """Run one optimizer step (or skip it when the loss or gradients are not finite).
        Returns the step's metrics; `save` in them is True when any rank asked for a timed save."""
        cfg, plan = self.cfg, self.plan
        accum = accum_steps_at(self.tokens, plan.micro_tokens, plan.full_accum, cfg.batch_ramp_start,
                               cfg.batch_ramp_tokens)  # fmt: skip
        step_tokens = accum * plan.micro_tokens
        lr = lr_at(self.tokens + step_tokens, cfg.lr, self.schedule.warmup, self.schedule.decay, cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = self._forward_backward(accum)
        shared = torch.stack([loss_sum / accum, torch.tensor(float(want_save), device=self.d.device)])
        shared = distributed.all_reduce_sum(shared)  # (2,): summed losses, save votes
        loss = float(shared[0]) / self.d.world
        norm, finite = self._update(loss)
        self._sync()
        dt = time.perf_counter() - t0
        self._count_step(step_tokens, dt, finite)
        tps = step_tokens / dt
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "batch_tokens": step_tokens,
            "tokens_per_s": tps,
            "mfu": plan.flops_per_token * tps / (self.peak * self.d.world),
            "skipped": self.skipped,
            "time": self.elapsed,
            "save": bool(shared[1] > 0),
        }

    def _forward_backward(self, accum: int) -> torch.Tensor:
        """Forward and backward over `accum` micro-batches; gradients of the mean loss. Returns the summed
        loss (a scalar tensor)."""
        loss_sum = torch.zeros((), device=self.d.device)
        for i in range(accum):
            x, y = self.loader.next_batch()  # (B, T) each
            with distributed.no_sync(self.wrapped, last=i == accum - 1), self.autocast:
                _, loss = self.model(x, y)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float()
        return loss_sum

    def _update(self, loss: float) -> tuple[float, bool]:
        """Clip and step (no step when the loss or the gradient norm is not finite); (grad norm, finite)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(loss) and math.isfinite(norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself on inf/NaN gradients
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, finite

    def _count_step(self, step_tokens: int, seconds: float, finite: bool) -> None:
        self.elapsed += seconds
        self.step += 1
        self.tokens += step_tokens
        if finite:
            self.bad_streak = 0
        else:
            self.skipped += 1
            self.bad_streak += 1

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
        sums = distributed.all_reduce_sum(sums)
        self.model.train()
        return {"val_loss": float(sums[0] / sums[3]), "val_bpb": float(sums[1] / (math.log(2) * sums[2]))}

    @torch.no_grad()
    def samples(self) -> list[dict]:
        """One sampled completion per prompt (every rank runs it, so FSDP can gather weights)."""
        model = distributed.unwrap(self.wrapped)
        model.eval()
        allowed = self.tokenizer.decodable_mask(self.model_cfg.vocab_size)
        out = []
        for i, (prompt, ids) in enumerate(self.prompts):
            n = min(self.cfg.sample_tokens, self.model_cfg.block_size - len(ids))
            if not ids or n <= 0:
                continue
            params = SamplingParams(temperature=0.8, top_k=40, seed=self.cfg.seed + i, max_tokens=n)
            new = list(generate(model, ids, params, frozenset({self.tokenizer.eot_id}), allowed=allowed))
            out.append({"prompt": prompt, "completion": self.tokenizer.decode(new)})
        model.train()
        return out

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        """Write step-XXXXXX (every rank takes part; rank 0 writes), then keep the newest `keep`."""
        weights = distributed.full_model_state(self.wrapped, self.cfg.distributed)
        optim = distributed.full_optimizer_state(self.wrapped, self.optimizer, self.cfg.distributed)
        rng = {"cpu": torch.get_rng_state()}
        if self.d.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.d.device)
        rngs = distributed.gather_objects(rng)
        path = checkpoint.step_dir(self.ckpt_dir, self.step)
        if self.d.main:
            train = {**self.cfg.to_dict(), "data_tokenizer": self.plan.tokenizer_record}
            checkpoint.save_checkpoint(
                self.base, path, step=self.step, tokenizer=self.tokenizer,
                train_config=train, training_state=self._training_state(optim, rngs), tensors=weights,
            )  # fmt: skip
            self._prune_checkpoints()
        distributed.barrier()
        self._last_save, self._saved_step = time.monotonic(), self.step
        return path

    def _training_state(self, optim: dict, rngs: list) -> dict:
        """optimizer.pt: everything besides the weights that an exact resume needs."""
        return {
            "optimizer": optim,
            "scheduler": {"tokens": self.tokens},  # lr and batch are functions of tokens (optim.py)
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "rng": rngs,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "skipped": self.skipped,
            "elapsed": self.elapsed,
            "plan": self.schedule.to_dict(),
            "world": self.d.world,
        }

    def _prune_checkpoints(self) -> None:
        discard_checkpoints(checkpoint.list_checkpoints(self.ckpt_dir)[: -self.cfg.keep_checkpoints])

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the planned step, evaluating every eval_every steps and checkpointing every
        checkpoint_every steps or checkpoint_minutes, and at the end. Returns the run summary (rank 0's
        holds the report's path)."""
        cfg = self.cfg
        self._open_run_folder()
        log = RunLog(self.out, self.step if self.plan.resume_from else None, self.schedule.tokens, self.tokens,
                     cfg.progress, cfg.tensorboard) if self.d.main else None  # fmt: skip
        self._last_save, self._saved_step = time.monotonic(), self.step
        last_eval: dict = {}
        samples: list[dict] = []
        self.model.train()
        try:
            while self.step < self.schedule.steps:
                rec = self.train_step(want_save=self.d.main and self._timed_save_due())
                self._stop_if_diverging(rec)
                final = self.step >= self.schedule.steps
                if final or (cfg.eval_every and self.step % cfg.eval_every == 0):
                    last_eval, samples = self.evaluate(), self.samples()
                    rec.update(last_eval, samples=samples)
                vote = rec.pop("save")
                if log:
                    log.write(rec)
                periodic = vote or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                if final or (periodic and self.bad_streak == 0):
                    self.save()
        finally:
            if log:
                log.close()
        if self._saved_step != self.step:
            self.save()
        return self._finish(last_eval, samples)

    def _open_run_folder(self) -> None:
        """RUN_DIR with its checkpoints folder and train_config.json (rank 0), then a barrier."""
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            clear_interrupted(self.ckpt_dir)
            atomic_write(self.out / "train_config.json", json.dumps(self.cfg.to_dict(), indent=2).encode())
            self._announce()
        distributed.barrier()

    def _timed_save_due(self) -> bool:
        minutes = self.cfg.checkpoint_minutes
        return minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes

    def _stop_if_diverging(self, rec: dict) -> None:
        if self.bad_streak < self.cfg.max_bad_steps:
            return
        newest = checkpoint.list_checkpoints(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        raise TrainingError(
            f"stopped at step {self.step}: {self.bad_streak} consecutive steps with a non-finite loss or "
            f"gradient (last loss {rec['loss']}, grad norm {rec['grad_norm']}); lower the learning rate "
            "or check the data. Last good checkpoint: "
            + (str(newest[-1]) if newest else "none (no checkpoint was written yet)")
        )

    def _announce(self) -> None:
        p, s = self.plan, self.schedule
        resumed = f"resuming {p.resume_from} at step {self.step:,}; " if p.resume_from else ""
        print(
            f"{resumed}training {p.n_params['total']:,} parameters on {self.d.world} × {self.d.device.type} "
            f"({self.dtype}, {self.cfg.distributed if self.d.active else 'single process'}): {s.steps:,} steps, "
            f"{s.tokens:,} tokens, {p.full_accum * p.micro_tokens:,} tokens per step; "
            f"MFU peak: {self.peak_source}",
            file=sys.stderr,
        )

    def _finish(self, last_eval: dict, samples: list[dict]) -> dict:
        summary = self._summary(last_eval, samples)
        if self.d.main:
            summary["report"] = str(write_pretrain_report(self.out, summary))
        return summary

    def _summary(self, last_eval: dict, samples: list[dict]) -> dict:
        records = read_metrics(self.out / "metrics.jsonl") if self.d.main else []
        tail = [r["tokens_per_s"] for r in records[len(records) // 10 :]] or [0.0]
        return {
            "run": str(self.out),
            "model": self.model_cfg.to_dict(),
            "params": self.plan.n_params,
            "steps": self.step,
            "tokens": self.tokens,
            "skipped": self.skipped,
            "train_seconds": self.elapsed,
            "tokens_per_s": statistics.median(tail),
            "mfu": statistics.median(tail) * self.plan.flops_per_token / (self.peak * self.d.world),
            "peak_source": self.peak_source,
            "world": self.d.world,
            "device": self.d.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "final_loss": records[-1]["loss"] if records else None,
            **last_eval,
            "samples": samples,
            "checkpoint": str(checkpoint.step_dir(self.ckpt_dir, self.step)),
            "config": self.cfg.to_dict(),
        }


def token_byte_counts(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64: the bytes each id decodes to, exactly (`decode_bytes([id])`: a byte-fallback
    token is its one byte, an added token such as Gemma's newline runs its text), 0 for special ids and
    ids the tokenizer lacks. Every id is counted, also where two ids share bytes (a vocabulary's
    `ranks` keeps only one of them). One pass over the vocabulary: ~1 s for Gemma's 262,144 ids."""
    ids = torch.nonzero(tokenizer.decodable_mask(vocab_size))[:, 0].tolist()
    special = tokenizer.special_ids
    counts = [0 if i in special else len(tokenizer.decode_bytes([i])) for i in ids]
    out = torch.zeros(vocab_size, dtype=torch.long)
    out[torch.tensor(ids, dtype=torch.long)] = torch.tensor(counts, dtype=torch.long)
    return out


def clear_interrupted(root: Path) -> None:
    """Finish what a killed run left in a checkpoints folder: a save's .tmp-step-* folder (written by the
    save alone, so removed whole) and a prune's .pruned-step-* one (only the files we wrote)."""
    for junk in root.glob(".tmp-step-*"):
        shutil.rmtree(junk, ignore_errors=True)
    for junk in root.glob(".pruned-step-*"):
        checkpoint.remove_checkpoint(junk)


def discard_checkpoints(folders: list[Path]) -> None:
    """Delete checkpoint folders, each renamed to a .pruned-* name first: a kill mid-delete never leaves a
    half-deleted step-* folder behind (the next run's clean-up finishes it). Only the files a checkpoint
    says we wrote are deleted (checkpoint.remove_checkpoint): a user's file inside one stays."""
    for old in folders:
        trash = old.with_name(f".pruned-{old.name}")
        os.rename(old, trash)
        checkpoint.remove_checkpoint(trash)


def precision(
    dtype: str, device: torch.device
) -> tuple[torch.dtype, contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """(compute dtype, autocast context, GradScaler or None) for TrainConfig.dtype on `device`:
    auto = bf16 autocast on CUDA and fp32 on CPU; fp16 needs a GradScaler."""
    dt = DTYPES.get(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    autocast = torch.autocast(device.type, dtype=dt) if dt != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type) if dt == torch.float16 else None
    return dt, autocast, scaler


def encodable_prompts(tokenizer, prompts: list[str]) -> list[tuple[str, list[int]]]:
    """(prompt, ids) of the sample prompts this tokenizer can encode (a `chars` vocabulary may lack some)."""
    out = []
    for prompt in prompts:
        try:
            out.append((prompt, tokenizer.encode(prompt)))
        except ValueError as e:
            print(f"skipping sample prompt {prompt!r}: {e}", file=sys.stderr)
    return out


def pretrain(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train, then tear the process group down. Returns the run summary (rank 0's is complete)."""
    try:
        return Trainer(cfg, resume=resume).run()
    finally:
        distributed.teardown()
