"""Processes, devices and parallel wrappers: one process, DDP or FSDP2 under torchrun (gloo on CPU,
NCCL on GPU), full (unsharded) state dicts for checkpoints, and the peak FLOP/s that MFU divides by.

Launch: `torchrun --nproc-per-node N -m gptstack.cli pretrain …` (or `torchrun $(which gptstack) …`).
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

# Dense bf16/fp16 tensor-core peak FLOP/s from the vendors' data sheets (no sparsity), by name fragment.
# fp32 peaks are the non-tensor-core (FMA) rates; TF32 is not used by default.
GPU_PEAKS = [  # (name fragment, bf16/fp16 peak, fp32 peak)
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),  # SXM
    ("GH200", 989e12, 67e12),
    ("B200", 2250e12, 80e12),
    ("A100", 312e12, 19.5e12),
    ("A10G", 125e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Start the process group when launched by torchrun, and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, mode: str, d: Dist) -> nn.Module:
    """Wrap for data parallelism: 'ddp' (replicated weights, all-reduced gradients) or 'fsdp' (FSDP2
    `fully_shard` per block and at the root: sharded weights, gradients and optimizer state)."""
    if not d.active:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"distributed mode {mode!r} is not one of ddp, fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT under DDP's `.module` and torch.compile's `_orig_mod`."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def no_sync(model: nn.Module, last: bool):
    """Context for one micro-batch of gradient accumulation: skip the gradient all-reduce (DDP) or
    reduce-scatter (FSDP2) on all but the last micro-batch."""
    import contextlib

    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    base = unwrap(model)
    if hasattr(base, "set_requires_gradient_sync"):
        base.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def resync():
            try:
                yield
            finally:
                base.set_requires_gradient_sync(True)

        return resync()
    return contextlib.nullcontext()


def full_model_state(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights (complete on rank 0; FSDP ranks > 0 get {})."""
    if mode == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> dict:
    """Optimizer state keyed by parameter name (the same layout in every mode, so a run saved under DDP
    resumes under FSDP2 or on one process). Complete on rank 0."""
    if mode == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    sd = optimizer.state_dict()
    names = [n for g in optimizer.param_groups for n in g["names"]]
    state = {names[i]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["names"])} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, mode: str) -> None:
    if mode == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    names = [n for g in optimizer.param_groups for n in g["names"]]
    index = {n: i for i, n in enumerate(names)}
    saved = [n for g in state["param_groups"] for n in g["params"]]
    if sorted(saved) != sorted(names):
        raise ValueError("the checkpoint's optimizer state does not cover the model's parameters")
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    for g, live in zip(groups, optimizer.param_groups, strict=True):
        g["names"] = live["names"]
    optimizer.load_state_dict({"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups})


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_objects(obj) -> list:
    """Every rank's `obj`, on every rank (a list of one on a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from). GPUs: the data-sheet table above. CPU: a measured
    fp32 matmul rate (median of 15 1024³ products on this process's threads)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, half, single in GPU_PEAKS:
            if fragment in name:
                low = dtype in (torch.bfloat16, torch.float16)
                return (half if low else single), f"{name} data sheet, {'bf16/fp16' if low else 'fp32'} dense"
        return float("nan"), f"{name}: not in the peak table (MFU not reported)"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    rate = 2 * n**3 / sorted(times)[len(times) // 2]
    return rate, f"measured CPU fp32 matmul, {torch.get_num_threads()} threads ({rate / 1e9:.0f} GFLOP/s)"
