"""Self-describing checkpoint folders, written atomically, loaded without executing code.

    step-000123/
      model.safetensors   weights (a tied lm_head is stored once, as transformer.wte.weight)
      config.json         {"format", "version", "model": ModelConfig, "tokenizer", "train", "step",
                           "files": {name: {"bytes", "sha256"}}}
      optimizer.pt        optional training state (optimizer, scheduler, RNG, loader cursor),
                          loaded with torch.load(weights_only=True)
      tokenizer/          optional tokenizer folder when the model uses a trained tokenizer
      vision.safetensors  optional vision tower (encoder + projector, gptstack/vision.py) and
      vision.json         its VisionConfig (shape, preprocessing, placeholder id): load_vision()

A quantized model (transforms/quantize.py) stores its codes, scales and minimums in model.safetensors and
says how in config.json's "quantization" entry; `load_model` rebuilds that structure before loading.

A folder is written under a temporary name beside its destination and renamed into place, so a
crash never leaves a half checkpoint under a `step-*` name. `resolve()` maps a run folder, a
checkpoints folder, or `…/latest` to the newest complete step. Loading verifies sizes and SHA-256
checksums and every tensor name and shape before touching the model: a truncated, corrupt or
mismatched checkpoint is refused with an error naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gptstack.config import ConfigError, ModelConfig
from gptstack.config import load_config as load_config_spec
from gptstack.files import read_json, sha256
from gptstack.interop.gguf import load_gguf, read_gguf_metadata
from gptstack.model import GPT, build_model
from gptstack.tokenizer import BaseTokenizer, get_tokenizer, tokenizer_from_gguf
from gptstack.transforms.quantize import GROUP_SIZE, quantize, quantized_structure
from gptstack.vision import VisionConfig, VisionTower

FORMAT = "gptstack-checkpoint"
VERSION = 1
STEP_RE = re.compile(r"^step-(\d+)$")
VISION_WEIGHTS, VISION_CONFIG = "vision.safetensors", "vision.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the problem."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save_checkpoint(
    model: GPT,
    path: str | Path,
    *,
    step: int | None = None,
    tokenizer: Any = None,
    train_config: dict | None = None,
    training_state: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    heads: dict[str, torch.Tensor] | None = None,
    vision: VisionTower | None = None,
) -> Path:
    """Write `model` (and optional training state) to the folder `path`, atomically.
    `tokenizer`: None, a stock name ('cl100k_base', 'o200k_base', 'bytes'), or a Tokenizer, whose
    files are then copied into the checkpoint (stock tokenizers are stored by name only).
    `tensors`: the weights to write instead of `model.state_dict()` (an unsharded FSDP state dict).
    `heads`: extra tensors outside the language model (a reward, value or task head), written to
    heads.safetensors; the checkpoint still loads as a plain model, and load_heads() reads them.
    `vision`: the vision tower, written to vision.safetensors + vision.json (load_vision() reads them)."""
    path = Path(path)
    ours = check_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"  # a fresh name: nothing to clear
    tmp.mkdir()
    try:
        _write_folder(tmp, model, step, tokenizer, train_config, training_state, tensors, heads, vision)
        _replace_dir(tmp, path, ours)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only our own temporary folder
        raise
    return path


def _write_folder(tmp: Path, model: GPT, step, tokenizer, train_config, training_state, tensors, heads, vision) -> None:
    """The checkpoint's files inside the temporary folder `tmp`, config.json (with every file's size and
    SHA-256, the tokenizer folder's included) last."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in (tensors or model.state_dict()).items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the same tensor as transformer.wte.weight
    save_file(tensors, tmp / "model.safetensors", metadata={"format": FORMAT})
    if heads:
        save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, tmp / "heads.safetensors")
    if vision is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in vision.state_dict().items()}, tmp / VISION_WEIGHTS)
        _write_synced(tmp / VISION_CONFIG, json.dumps(vision.config.to_dict(), indent=2))
    if training_state is not None:
        torch.save(training_state, tmp / "optimizer.pt")
    tokenizer_ref = _save_tokenizer(tokenizer, tmp)
    files = {
        p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config.to_dict(),
        "tokenizer": tokenizer_ref,
        "train": train_config or {},
        "step": step,
        "files": files,
    }
    if getattr(model, "quantization", None):  # transforms/quantize.py: how the linear layers are stored
        meta["quantization"] = model.quantization
    _write_synced(tmp / "config.json", json.dumps(meta, indent=2))


def _save_tokenizer(tokenizer: Any, folder: Path) -> str | None:
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    if tokenizer.name in ("cl100k_base", "o200k_base", "bytes"):
        return tokenizer.name
    tokenizer.save(folder / "tokenizer")
    return "tokenizer"


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, dst: Path, ours: set[str]) -> None:
    """Rename tmp → dst. An existing dst (one of our checkpoints, see check_destination) is moved aside
    first; after the rename the files it held that we wrote (`ours`) are removed by name."""
    for p in tmp.rglob("*"):  # make the data durable before the name appears
        if not p.is_file():
            continue
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    old = None
    if dst.exists():
        old = dst.parent / f".old-{dst.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:  # put the old checkpoint back
            os.rename(old, dst)
        raise
    if old is not None:
        _remove_written(old, ours)


# --- where a checkpoint may be written ------------------------------------------------------------------
def check_destination(path: str | Path) -> set[str]:
    """Refuse to write a checkpoint at `path` unless it does not exist, is an empty folder, or is one of
    our checkpoint folders holding only files its config.json says we wrote. Returns those files'
    relative paths (what replacing the folder may delete). Anything else in the way (a user's folder, a
    run folder, a notes.txt beside the weights) is refused by name: a save never deletes a file it did
    not write."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise CheckpointError(f"{path} exists and is not a folder; choose another output path")
    if not path.exists() or not any(path.iterdir()):
        return set()
    ours = _written_files(path)
    if ours is None:
        raise CheckpointError(
            f"{path} is a non-empty folder that is not a gptstack checkpoint; refusing to write over it "
            "(choose a new or empty folder)"
        )
    foreign = [rel for rel in _entries(path) if rel not in ours and not any(o.startswith(rel + "/") for o in ours)]
    if foreign:
        raise CheckpointError(
            f"{path}: replacing this checkpoint would delete {path / foreign[0]}, which it did not write "
            f"({len(foreign)} such entr{'y' if len(foreign) == 1 else 'ies'}); move them or choose another folder"
        )
    return ours


def _written_files(folder: Path) -> set[str] | None:
    """Relative paths of the files a checkpoint folder's config.json says we wrote; None for a folder that
    is not a readable gptstack checkpoint. Checkpoints from before config.json listed the tokenizer
    folder's files: those files count as ours when config.json names the folder."""
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        return None
    ours = {"config.json", *meta["files"]}
    if meta.get("tokenizer") == "tokenizer" and not any(n.startswith("tokenizer/") for n in ours):
        ours |= set(_entries(folder / "tokenizer", "tokenizer/"))
    return ours


def _entries(folder: Path, prefix: str = "") -> list[str]:
    """Relative paths of everything under `folder` (files, links, folders), never following a link."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):  # os.walk lists a link to a folder, never enters it
        rel = Path(dirpath).relative_to(folder).as_posix()
        base = prefix + ("" if rel == "." else rel + "/")
        out += [base + name for name in sorted(dirnames + filenames)]
    return out


def _remove_written(old: Path, ours: set[str]) -> None:
    """Delete the files of `old` that are in `ours`, then its emptied folders; anything else stays."""
    for rel in sorted(_entries(old), key=lambda r: (-r.count("/"), r == "config.json")):  # deepest, config last
        p = old / rel
        if p.is_dir() and not p.is_symlink():
            with contextlib.suppress(OSError):  # not empty: it holds something we did not write
                p.rmdir()
        elif rel in ours:
            p.unlink()
    with contextlib.suppress(OSError):
        old.rmdir()


def remove_checkpoint(folder: str | Path) -> None:
    """Delete a checkpoint folder: the files its config.json says we wrote (config.json last, so a kill
    half way leaves a folder this can finish), then its emptied folders. A file someone else put there
    stays, and so does the folder holding it; a folder that is not our checkpoint is left alone."""
    ours = _written_files(Path(folder))
    if ours is not None:
        _remove_written(Path(folder), ours)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step folders under root, oldest first (temporary folders never match step-*)."""
    root = Path(root)
    steps = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / "config.json").is_file()]
    return sorted(steps, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from: the folder itself, `…/latest`, a folder of step-* folders, or a run
    folder holding checkpoints/."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    root = path.parent if path.name == "latest" else path
    for candidate in (root, root / "checkpoints"):
        if candidate.is_dir() and (found := list_checkpoints(candidate)):
            return found[-1]
    if not root.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(f"no checkpoint under {path} (expected config.json or step-* folders)")


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """Resolve `path` and return (folder, parsed config.json), validated."""
    folder = resolve(path)
    cfg_path = folder / "config.json"
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{cfg_path}: not a gptstack checkpoint (format field missing or wrong)")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{cfg_path}: checkpoint format version {meta['version']} is newer than {VERSION}")
    return folder, meta


def verify_files(folder: Path, meta: dict) -> None:
    for name, info in meta.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{p}: truncated or altered: {size} bytes, expected {info['bytes']}")
        if sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p}: corrupt: SHA-256 checksum does not match config.json")


def load_config(path: str | Path) -> ModelConfig:
    _, meta = read_meta(path)
    try:
        return ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{resolve(path) / 'config.json'}: invalid model config: {e}") from None


def load_weights(model: GPT, path: str | Path, verify: bool = True) -> None:
    """Copy a checkpoint's weights into `model`, after checking every name and shape (nothing is
    copied unless everything matches)."""
    folder, meta = read_meta(path)
    file = check_weights(model, folder, meta, verify)
    params = model.state_dict()
    try:
        with safe_open(file, framework="pt", device="cpu") as f, torch.no_grad():
            for k in f.keys():  # noqa: SIM118 (safe_open is no dict)
                params[k].copy_(f.get_tensor(k))
    except SafetensorError as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def check_weights(model: GPT, folder: Path, meta: dict, verify: bool = True) -> Path:
    """model.safetensors of `folder`, once its sizes and checksums (`verify`) and every tensor name and
    shape match `model`, which may be a meta-device model: a checkpoint is refused before anything is
    allocated for it."""
    if verify:
        verify_files(folder, meta)
    file = folder / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    params = model.state_dict()
    expected = set(params) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            _check_names(file, keys, expected)
            for k in keys:
                shape = tuple(f.get_slice(k).get_shape())
                if shape != tuple(params[k].shape):
                    raise CheckpointError(
                        f"{file}: tensor {k} has shape {shape}, the model expects {tuple(params[k].shape)} "
                        "(a checkpoint of another architecture?)"
                    )
    except SafetensorError as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    return file


def _check_names(file: Path, found: set[str], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = [f"missing {len(missing)} tensors (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})"] if unexpected else []
        raise CheckpointError(f"{file}: does not match the model config: {'; '.join(parts)}")


# --- the memory a config implies, bounded before anything is built ----------------------------------
LAYER_OBJECT_BYTES = 64 << 10  # Python objects of one block's modules (measured: 45 KB on the meta device)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes that building a model from a config takes, worked out on the meta device (nothing allocated)."""

    weights: int  # parameters and saved buffers (quantized codes), each tied tensor once
    derived: int  # buffers computed at load, never saved: the RoPE cos/sin tables, (block_size, head_dim) fp32 each
    transient: int  # extra at the peak: the derived tables are recomputed beside their placeholders
    objects: int  # the Python objects of n_layer blocks

    @property
    def total(self) -> int:
        return self.weights + self.derived + self.transient + self.objects


def _meta_model(cfg: ModelConfig, quantization: dict | None, where: str | Path) -> GPT:
    """`cfg`'s model on the meta device, with the quantized structure `quantization` describes."""
    with torch.device("meta"):
        model = GPT(cfg)
        if quantization:
            try:
                quantized_structure(model, quantization)
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{where}: bad quantization entry ({e})") from None
    return model


def _tensor_bytes(model: GPT) -> tuple[int, int]:
    """(saved, derived) bytes of a meta model's tensors: parameters and persistent buffers, and the
    buffers that state_dict leaves out."""
    saved = {id(t): t for t in (*model.parameters(), *model.state_dict(keep_vars=True).values())}
    derived = {id(b): b for b in model.buffers() if id(b) not in saved}
    return _nbytes(saved.values()), _nbytes(derived.values())


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_memory(cfg: ModelConfig, quantization: dict | None = None, where: str | Path = "config") -> MemoryEstimate:
    """What building `cfg` (with `quantization`) takes, from meta-device models of one and two layers: every
    block holds the same tensors, so n layers hold one's bytes + (n-1)·(a block's bytes). That keeps the
    count free for a hostile n_layer too, whose meta model alone would take 45 KB per layer."""
    one, two = (_tensor_bytes(_meta_model(cfg.replace(n_layer=n), quantization, where)) for n in (1, 2))
    weights = one[0] + (cfg.n_layer - 1) * (two[0] - one[0])
    # to_empty() allocates placeholders for the derived tables and init_buffers() computes new ones beside
    # them; rope_tables' intermediate angle table adds less than the tables again: ≤ 1.75 × them at the peak
    # (a real build is measured against this in tests/test_hardening_files.py)
    return MemoryEstimate(weights, one[1], one[1] * 7 // 4, cfg.n_layer * LAYER_OBJECT_BYTES)


def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes a new model may take on `device`: free memory of a CUDA device, else the system's available
    RAM (MemAvailable, capped by a cgroup limit); None where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    found = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        found.append(int(next(ln for ln in lines if ln.startswith("MemAvailable:")).split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):  # cgroup v2: "max" (no limit) fails int()
        cg = Path("/sys/fs/cgroup")
        found.append(int((cg / "memory.max").read_text()) - int((cg / "memory.current").read_text()))
    if not found:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(found) if found else None


def check_config_memory(
    cfg: ModelConfig,
    *,
    where: str | Path = "model config",
    quantization: dict | None = None,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    copies: int = 1,
) -> MemoryEstimate:
    """Refuse (CheckpointError naming `where`) a config whose model would not fit: the estimate, with
    `copies` copies of the weights (an import holds the source model too), against `limit` bytes
    (default: what `available_memory(device)` reports). Call it before building anything."""
    est = estimate_memory(cfg, quantization, where)
    need = est.total + (copies - 1) * est.weights
    limit = available_memory(device) if limit is None else limit
    if limit is not None and need > limit:
        raise CheckpointError(
            f"{where}: this model needs {_gb(need)} to build (weights {_gb(est.weights * copies)}, RoPE tables "
            f"{_gb(est.derived + est.transient)}; block_size {cfg.block_size:,}, n_layer {cfg.n_layer:,}, "
            f"n_embd {cfg.n_embd:,}), more than the {_gb(limit)} available on {torch.device(device).type}; "
            "refused before allocating it"
        )
    return est


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
    verify: bool = True,
    require_tokenizer: bool = False,
    keep_quantized: bool = False,
) -> GPT:
    """The checkpoint's model in eval mode, with `.tokenizer` set (None when it names none).
    `path` may also be a llama.cpp GGUF file (interop/gguf.py; `keep_quantized`: hold its Q4_0/Q4_1/Q8_0
    tensors as codes). `tokenizer` (a spec such as "cl100k_base" or a Tokenizer) overrides the one the
    checkpoint names; `require_tokenizer` (the engine and the scorer): refuse a checkpoint that ends up
    with none, or with one that has more ids than the model's vocabulary."""
    if Path(path).is_file():  # a checkpoint is a folder: a file is a GGUF (whose reader refuses anything else)
        model = load_gguf(
            path, device, keep_quantized, check=lambda c: check_config_memory(c, where=path, device=device)
        )
        model.tokenizer = model.tokenizer if tokenizer is None else resolve_tokenizer(tokenizer)
        _check_tokenizer(path, model.tokenizer, model.config, require_tokenizer)
        return model
    folder = resolve(path)
    cfg = load_config(folder)
    _, meta = read_meta(folder)
    tok = load_tokenizer(folder) if tokenizer is None else resolve_tokenizer(tokenizer)
    _check_tokenizer(path, tok, cfg, require_tokenizer)
    where, quantization = folder / "config.json", meta.get("quantization")
    check_config_memory(cfg, where=where, quantization=quantization, device=device)  # before any allocation
    model = _meta_model(cfg, quantization, where)
    check_weights(model, folder, meta, verify)  # checksums, names and shapes against the meta model: nothing built yet
    model.to_empty(device=device)
    model.tie_weights()
    model.init_buffers()
    load_weights(model, folder, verify=False)  # verified just above
    model.tokenizer = tok
    return model.eval()


def _check_tokenizer(path: str | Path, tok: Any, cfg: ModelConfig, required: bool) -> None:
    if required and tok is None:
        raise CheckpointError(f"{path} names no tokenizer: pass --tokenizer cl100k_base|o200k_base|bytes|DIR")
    if required and tok.n_vocab > cfg.vocab_size:
        raise CheckpointError(f"tokenizer {tok.name} has {tok.n_vocab} tokens, the model only {cfg.vocab_size}")


def load_heads(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The head tensors a post-training stage saved with the model ({} when there are none)."""
    folder, meta = read_meta(path)
    if verify:
        verify_files(folder, meta)
    file = folder / "heads.safetensors"
    if not file.is_file():
        return {}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def load_vision(
    path: str | Path, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[VisionTower, VisionConfig] | None:
    """The checkpoint's vision tower (eval mode) and its config; None for a text-only checkpoint or a
    GGUF file. Checksums, every tensor name and shape are checked before a weight is copied."""
    if Path(path).is_file():
        return None
    folder, meta = read_meta(path)
    if not (folder / VISION_CONFIG).is_file():
        return None
    if verify:
        verify_files(folder, meta)
    try:
        cfg = VisionConfig.from_dict(read_json(folder / VISION_CONFIG, CheckpointError))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / VISION_CONFIG}: invalid vision config: {e}") from None
    tower = VisionTower(cfg, pretrained=False)
    load_vision_weights(tower, folder)
    return tower.to(device).eval(), cfg


def load_vision_weights(tower: VisionTower, path: str | Path) -> None:
    """Copy vision.safetensors into `tower` when every name and shape matches (else nothing is copied)."""
    file = resolve(path) / VISION_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    expected = tower.state_dict()
    try:
        tensors = load_file(file)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    _check_names(file, set(tensors), set(expected))
    wrong = [k for k, v in tensors.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{file}: tensor {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the tower "
                              f"expects {tuple(expected[wrong[0]].shape)}")  # fmt: skip
    tower.load_state_dict(tensors, strict=True)


def load_tokenizer(path: str | Path):
    """The tokenizer a checkpoint names, or None."""
    folder, meta = read_meta(path)
    ref = meta.get("tokenizer")
    if ref is None:
        return None
    return get_tokenizer(folder / ref if ref == "tokenizer" else ref)


def resolve_tokenizer(spec: str | Path | BaseTokenizer) -> BaseTokenizer:
    """The tokenizer `spec` names, wherever a user holds one: a stock name, a tokenizer or HF folder
    (tokenizer.get_tokenizer), a gptstack checkpoint or run folder (the tokenizer it names), or a GGUF
    file (its tokenizer.ggml.* metadata). A tokenizer is returned as it is. Every `--tokenizer` option
    reads its value through this."""
    if isinstance(spec, BaseTokenizer):
        return spec
    path = Path(spec)
    if path.is_file():
        return tokenizer_from_gguf(read_gguf_metadata(path), origin=str(path))
    if path.is_dir() and _is_checkpoint(path):
        tok = load_tokenizer(path)
        if tok is None:
            raise CheckpointError(f"{path} names no tokenizer")
        return tok
    return get_tokenizer(spec)


def _is_checkpoint(path: Path) -> bool:
    """A gptstack checkpoint or run folder (an HF model folder's config.json is not ours)."""
    try:
        read_meta(path)
    except CheckpointError:
        return False
    return True


def load_training_state(path: str | Path) -> dict | None:
    """optimizer.pt as saved (tensors, numbers, strings, containers), loaded with weights_only=True."""
    folder = resolve(path)
    file = folder / "optimizer.pt"
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError/EOFError on bad files
        raise CheckpointError(f"{file}: cannot be loaded safely ({type(e).__name__}: {str(e)[:200]})") from None


@dataclass
class InitConfig:
    model: str  # preset name or config JSON
    out: str  # checkpoint folder to write
    tokenizer: str = "cl100k_base"  # cl100k_base | o200k_base | bytes | a tokenizer or HF folder | CKPT | FILE.gguf
    seed: int = 0  # initialisation seed
    overrides: dict = field(default_factory=dict)  # ModelConfig fields to change (the CLI's --set key=value)


def init_checkpoint(cfg: InitConfig) -> tuple[Path, int]:
    """Write a freshly initialised model whose vocabulary fits the tokenizer: (folder, parameters)."""
    check_destination(cfg.out)  # before any work: never over a folder that is not ours
    tok = resolve_tokenizer(cfg.tokenizer)
    model_cfg = load_config_spec(cfg.model, **{"vocab_size": tok.n_vocab, **cfg.overrides})
    if model_cfg.vocab_size < tok.n_vocab:
        raise ConfigError(f"vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tok.n_vocab}")
    check_config_memory(model_cfg, where=cfg.model)
    model = build_model(model_cfg, seed=cfg.seed)
    path = save_checkpoint(model, cfg.out, step=0, tokenizer=tok, train_config={"init_seed": cfg.seed})
    return path, sum(p.numel() for p in model.parameters())


@dataclass
class QuantizeConfig:
    checkpoint: str  # checkpoint folder, run folder, or …/latest
    out: str  # checkpoint folder to write
    method: Literal["int8", "int4"] = "int8"  # int8 per output channel, int4 in groups
    group_size: int = GROUP_SIZE  # int4 group size (32, 64, 128)


def quantize_checkpoint(cfg: QuantizeConfig) -> dict:
    """Write the checkpoint quantized (transforms/quantize.py): {"path", "bytes_before", "bytes_after"}."""
    check_destination(cfg.out)  # before any work: never over a folder that is not ours
    model = load_model(cfg.checkpoint)
    _, meta = read_meta(cfg.checkpoint)
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantize(model, cfg.method, cfg.group_size)
    path = save_checkpoint(
        model, cfg.out, step=meta.get("step"), tokenizer=model.tokenizer, train_config=meta.get("train")
    )
    return {"path": path, "bytes_before": before, "bytes_after": (Path(path) / "model.safetensors").stat().st_size}
