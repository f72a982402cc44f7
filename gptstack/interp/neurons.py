"""Top-activating dataset examples of MLP neurons, streamed: `gptstack interp neurons CKPT --data … --layer L`.

A neuron is one unit of `blocks.L.mlp.post` (B, T, F): the nonlinearity's output that c_proj reads (for
SwiGLU/GeGLU the gated product). Text flows through the model in rows of `seq_len` tokens, `batch_size`
rows a forward, and each forward stops right after block L computes the neurons (`activations_at`), so the
layers above cost nothing. The data is a text file (read in 1 MiB pieces cut at line ends, tokenized with
the model's tokenizer, its last `val_fraction` the val split as nanoGPT splits Shakespeare) or a shard
folder from `gptstack data prepare` (its memory-mapped splits); neither is ever held in memory whole.

Memory is bounded by the answer, not the data: `RunningTopK` keeps, per neuron, the K largest activations
seen so far with the (row, position) they came from, the tokens around them and the neuron's activation on
each of those tokens (K × F × C values for a context of C tokens). Each batch contributes its own top K per
neuron, merged with the running K by one topk over the 2K candidates, so the result equals a brute-force
topk over all activations at once (tested). Running sums give each neuron's mean, standard deviation, max
and activation frequency (the fraction of tokens where it is > 0). The first `skip` positions of every row
are left out of both: a row's first token is the attention sink, whose activations are outliers that would
crowd every neuron's top list with meaningless first tokens.

Written (interp.report.write_outputs, each file through a temporary name): the JSON (`--json OUT`) and beside
it a self-contained HTML page (OUT with .html) that shows each neuron's top examples as a token heat map of
its activation.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from gptstack.checkpoint import load_model
from gptstack.data.shards import open_shards, read_manifest
from gptstack.interp.hooks import HookError, patched
from gptstack.interp.report import token_heat, write_outputs
from gptstack.model import GPT, MoE

TEXT_BLOCK = 1 << 20  # bytes of a text file read (and tokenized) at a time
SHARD_BLOCK = 1 << 20  # tokens of a shard copied out of its memory map at a time


class InterpDataError(ValueError):
    """--data that cannot be read as text or shards, or that has too few tokens."""


@dataclass
class NeuronsConfig:
    checkpoint: str  # checkpoint folder, run folder, or GGUF file
    data: str  # a UTF-8 text file, or a shard folder from `gptstack data prepare`
    json: str  # output JSON; the HTML heat map is written beside it (.html)
    layer: int | None = None  # the block whose MLP neurons (blocks.L.mlp.post) are read (default: n_layer // 2)
    top: int = 10  # top-activating examples kept per neuron
    neurons: list[int] | None = None  # only these neuron indices (default: every neuron of the layer)
    split: Literal["all", "train", "val"] = "all"  # which part of the data to stream
    val_fraction: float = 0.1  # text files: the last fraction (cut at a line end) is the val split
    seq_len: int = 128  # tokens per row the model reads
    batch_size: int = 8  # rows per forward
    max_tokens: int = 0  # stop after this many tokens (0: the whole split)
    before: int = 12  # context tokens shown before each example's token
    after: int = 4  # context tokens shown after it
    skip: int = 1  # leading positions of each row left out (the attention sink)
    device: str = "cpu"  # torch device
    progress: bool = True  # show a progress bar


# ---- data: token rows from a text file or a shard folder ---------------------------------------------------


def text_split(path: Path, split: str, val_fraction: float) -> tuple[int, int]:
    """Byte range [start, end) of `split` in a text file: val is the part after the first line end past
    (1 - val_fraction) of the bytes."""
    size = path.stat().st_size
    if split == "all":
        return 0, size
    with open(path, "rb") as f:
        f.seek(int(size * (1 - val_fraction)))
        f.readline()  # to the next line end
        cut = min(f.tell(), size)
    return (0, cut) if split == "train" else (cut, size)


def text_pieces(path: Path, start: int, end: int) -> Iterator[str]:
    """The text of bytes [start, end) in pieces of about TEXT_BLOCK, each cut after a line end."""

    def decode(data: bytes, at: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InterpDataError(f"{path}: not UTF-8 text ({e.reason} at byte {at + e.start:,})") from None

    carry, left = b"", end - start
    with open(path, "rb") as f:
        f.seek(start)
        while left > 0 and (block := f.read(min(TEXT_BLOCK, left))):
            left -= len(block)
            data = carry + block
            cut = data.rfind(b"\n") + 1 if left > 0 else len(data)
            carry = data[cut:]
            if cut:
                yield decode(data[:cut], end - left - len(data))
    if carry:
        yield decode(carry, end - len(carry))


def shard_pieces(folder: Path, split: str, vocab_size: int) -> Iterator[np.ndarray]:
    """A shard folder's split (or all its splits) as int64 token blocks; ids must fit the model."""
    manifest = read_manifest(folder)
    n_vocab = manifest.get("tokenizer", {}).get("n_vocab", 0)
    if n_vocab > vocab_size:
        raise InterpDataError(f"{folder}: its tokenizer has {n_vocab:,} ids, the model only {vocab_size:,}")
    for name in manifest["splits"] if split == "all" else [split]:
        for shard in open_shards(folder, name):
            for i in range(0, len(shard), SHARD_BLOCK):
                yield np.asarray(shard[i : i + SHARD_BLOCK], dtype=np.int64)


def token_pieces(data: str | Path, tokenizer, vocab_size: int, split: str = "all", val_fraction: float = 0.1):
    """Token blocks (int64 arrays) of a text file or a shard folder's split, in order."""
    path = Path(data)
    if path.is_dir():
        yield from shard_pieces(path, split, vocab_size)
    elif path.is_file():
        if tokenizer is None:
            raise InterpDataError(f"{path}: a text file needs a model with a tokenizer")
        for text in text_pieces(path, *text_split(path, split, val_fraction)):
            yield np.asarray(tokenizer.encode(text), dtype=np.int64)
    else:
        raise InterpDataError(f"{path}: no such text file or shard folder")


def token_rows(pieces: Iterator[np.ndarray], seq_len: int, max_tokens: int = 0) -> Iterator[np.ndarray]:
    """Consecutive rows (seq_len,) of the stream; a last row shorter than seq_len is dropped."""
    buf, sent = np.zeros(0, np.int64), 0
    for piece in pieces:
        buf = np.concatenate([buf, piece])
        while len(buf) >= seq_len and (not max_tokens or sent < max_tokens):
            yield buf[:seq_len]
            buf, sent = buf[seq_len:], sent + seq_len
        if max_tokens and sent >= max_tokens:
            return


def batches(rows: Iterator[np.ndarray], batch_size: int) -> Iterator[Tensor]:
    """(b, T) tensors of up to batch_size rows."""
    group = []
    for row in rows:
        group.append(row)
        if len(group) == batch_size:
            yield torch.from_numpy(np.stack(group))
            group = []
    if group:
        yield torch.from_numpy(np.stack(group))


# ---- activations ----------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the capturing patch once the wanted activation exists: the layers above never run."""


@torch.no_grad()
def activations_at(model: GPT, idx: Tensor, name: str) -> Tensor:
    """The activation `name` (a hook point, e.g. blocks.3.mlp.post) on idx (B, T), running the forward
    only as far as that point."""
    got: dict[str, Tensor] = {}

    def grab(value: Tensor) -> None:
        got["value"] = value.detach()
        raise _Stop

    try:
        with patched(model, {name: grab}):
            model(idx)
    except _Stop:
        pass
    if "value" not in got:
        raise HookError(f"the forward never reached {name}")
    return got["value"]


def resolve_layer(model: GPT, layer: int | None, seq_len: int, skip: int, dense: bool = True) -> int:
    """`layer` (None: the middle one, n_layer // 2), refused when the model lacks it (or, with `dense`, when
    it has no dense MLP neurons), and rows the model cannot read refused too."""
    n = model.config.n_layer
    layer = n // 2 if layer is None else layer
    if not 0 <= layer < n:
        raise ValueError(f"--layer {layer} is outside the model's {n} layers (0..{n - 1})")
    if seq_len > model.config.block_size:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {model.config.block_size}")
    if not 0 <= skip < seq_len:
        raise ValueError(f"--skip {skip} must be below --seq-len {seq_len}")
    return layer
    if dense and isinstance(model.transformer.h[layer].mlp, MoE):
        raise ValueError(f"layer {layer} is a mixture of experts: it has no dense MLP neurons")


# ---- the running top K -----------------------------------------------------------------------------------


class RunningTopK:
    """Per column (neuron) of a stream of (B, T, F) activations: the k largest values, where they were (row
    and position), and their context window (tokens and this neuron's activations, C = before + 1 + after,
    token -1 and activation NaN outside the row); plus running sums for mean, std, max and frequency."""

    def __init__(self, k: int, n: int, before: int, after: int, skip: int = 0):
        self.k, self.skip = k, skip
        self.offsets = torch.arange(-before, after + 1)  # (C,)
        C = len(self.offsets)
        self.values = torch.full((k, n), -math.inf)  # (k, F) sorted descending per column
        self.rows = torch.full((k, n), -1, dtype=torch.long)
        self.pos = torch.full((k, n), -1, dtype=torch.long)
        self.tokens = torch.full((k, n, C), -1, dtype=torch.long)
        self.acts = torch.full((k, n, C), math.nan)
        self.count, self.sum, self.sumsq = 0, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.positive, self.max = torch.zeros(n, dtype=torch.long), torch.full((n,), -math.inf)

    def update(self, acts: Tensor, idx: Tensor, row0: int) -> None:
        """acts (B, T, F) of the rows idx (B, T), which are rows row0.. of the stream."""
        B, T, F = acts.shape
        acts = acts.float()
        counted = acts[:, self.skip :].reshape(-1, F)  # (N, F) the positions that count
        self.count += counted.size(0)
        self.sum += counted.sum(0, dtype=torch.float64)
        self.sumsq += counted.double().square().sum(0)
        self.positive += (counted > 0).sum(0)
        self.max = torch.maximum(self.max, counted.amax(0))
        ranked = acts.clone()
        ranked[:, : self.skip] = -math.inf
        vals, where = ranked.reshape(B * T, F).topk(min(self.k, B * T), dim=0)  # (k', F)
        b, t = where // T, where % T
        ctx = t[..., None] + self.offsets  # (k', F, C) positions in the row
        inside = (ctx >= 0) & (ctx < T)
        flat = b[..., None] * T + ctx.clamp(0, T - 1)  # (k', F, C) into the (B·T) rows
        neuron = torch.arange(F).view(1, F, 1).expand_as(flat)
        ctx_acts = acts.reshape(B * T, F)[flat, neuron].masked_fill(~inside, math.nan)
        ctx_tokens = idx.reshape(-1)[flat].masked_fill(~inside, -1)
        self._merge(vals, row0 + b, t, ctx_tokens, ctx_acts)

    def _merge(self, vals: Tensor, rows: Tensor, pos: Tensor, tokens: Tensor, acts: Tensor) -> None:
        both = torch.cat([self.values, vals])  # (k + k', F)
        self.values, sel = both.topk(self.k, dim=0)  # (k, F)
        self.rows = torch.cat([self.rows, rows]).gather(0, sel)
        self.pos = torch.cat([self.pos, pos]).gather(0, sel)
        sel3 = sel[..., None].expand(-1, -1, self.tokens.size(-1))  # (k, F, C)
        self.tokens = torch.cat([self.tokens, tokens]).gather(0, sel3)
        self.acts = torch.cat([self.acts, acts]).gather(0, sel3)

    def stats(self) -> dict[str, Tensor]:
        """Per column: mean, std, max and frequency (fraction > 0) over the counted positions."""
        n = max(self.count, 1)
        mean = self.sum / n
        var = (self.sumsq / n - mean.square()).clamp_min(0)
        return {"mean": mean, "std": var.sqrt(), "max": self.max, "frequency": self.positive.double() / n}


# ---- the command ----------------------------------------------------------------------------------------


def stream_neurons(model: GPT, cfg: NeuronsConfig) -> tuple[RunningTopK, list[int], dict]:
    """Stream cfg.data through `model` and keep the top examples of layer cfg.layer's neurons."""
    cfg = dataclasses.replace(cfg, layer=resolve_layer(model, cfg.layer, cfg.seq_len, cfg.skip))
    F = model.config.d_ff
    chosen = list(range(F)) if cfg.neurons is None else list(cfg.neurons)
    if bad := [i for i in chosen if not 0 <= i < F]:
        raise ValueError(f"--neurons {bad[0]} is outside layer {cfg.layer}'s {F} neurons (0..{F - 1})")
    name = f"blocks.{cfg.layer}.mlp.post"
    top = RunningTopK(cfg.top, len(chosen), cfg.before, cfg.after, cfg.skip)
    pieces = token_pieces(cfg.data, model.tokenizer, model.config.vocab_size, cfg.split, cfg.val_fraction)
    rows, device = 0, next(model.parameters()).device
    bar = tqdm(total=cfg.max_tokens or None, unit="tok", unit_scale=True, desc=name, disable=not cfg.progress)
    for idx in batches(token_rows(pieces, cfg.seq_len, cfg.max_tokens), cfg.batch_size):
        acts = activations_at(model, idx.to(device), name)[..., chosen].cpu()  # (b, T, |chosen|)
        top.update(acts, idx, rows)
        rows += idx.size(0)
        bar.update(idx.numel())
    bar.close()
    if rows == 0:
        raise InterpDataError(f"{cfg.data}: fewer than --seq-len {cfg.seq_len} tokens in split {cfg.split!r}")
    return top, chosen, {"layer": cfg.layer, "point": name, "rows": rows, "tokens": rows * cfg.seq_len}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def neuron_records(top: RunningTopK, chosen: list[int], tokenizer, seq_len: int) -> list[dict]:
    """One JSON record per neuron: its statistics and its top examples, best first."""
    stats = {k: v.tolist() for k, v in top.stats().items()}
    pieces = {}  # token id → its text

    def text(i: int) -> str:
        if i not in pieces:
            pieces[i] = tokenizer.decode([i]) if tokenizer is not None else str(i)
        return pieces[i]

    out = []
    for j, neuron in enumerate(chosen):
        examples = []
        for r in range(top.k):
            if not math.isfinite(top.values[r, j]):
                continue  # fewer counted positions than k
            inside = top.tokens[r, j] >= 0
            ids, acts = top.tokens[r, j][inside].tolist(), top.acts[r, j][inside].tolist()
            row, pos = int(top.rows[r, j]), int(top.pos[r, j])
            center = int((inside & (top.offsets < 0)).sum())  # the example's index in ids
            examples.append({"activation": float(top.values[r, j]), "row": row, "pos": pos,
                             "offset": row * seq_len + pos, "center": center, "ids": ids,
                             "tokens": [text(i) for i in ids], "acts": acts})  # fmt: skip
        record = {"neuron": neuron, **{k: _finite(v[j]) for k, v in stats.items()}, "examples": examples}
        out.append(record)
    return out


def heatmap_html(result: dict) -> str:
    """The page's body: per neuron its statistics and each top example's tokens shaded by the neuron's
    activation relative to its largest top activation (hover a token for its value)."""
    parts = [f"<p>{html.escape(result['checkpoint'])} on {html.escape(result['data'])}: {result['tokens']:,} tokens "
             f"in {result['rows']:,} rows of {result['seq_len']}</p>"]  # fmt: skip
    for rec in result["neurons"]:
        peak = max((e["activation"] for e in rec["examples"]), default=0.0)
        parts.append(f'<h2 id="n{rec["neuron"]}">neuron {rec["neuron"]}</h2><p>mean {rec["mean"]:.4f}, '
                     f'max {rec["max"] or 0:.3f}, active on {rec["frequency"] or 0:.1%} of tokens</p>')  # fmt: skip
        for e in rec["examples"]:
            shade = [a / peak if peak > 0 else 0.0 for a in e["acts"]]
            parts.append(f"<b>{e['activation']:.3f}</b>" + token_heat(e["tokens"], shade))
    return "".join(parts)


def neurons(cfg: NeuronsConfig) -> dict:
    """Top-activating examples and statistics of one layer's MLP neurons; writes the JSON and HTML."""
    model = load_model(cfg.checkpoint, cfg.device)
    top, chosen, info = stream_neurons(model, cfg)
    result = {"checkpoint": cfg.checkpoint, "data": cfg.data, "split": cfg.split,
              "seq_len": cfg.seq_len, "skip": cfg.skip, **info,
              "neurons": neuron_records(top, chosen, model.tokenizer, cfg.seq_len)}  # fmt: skip
    write_outputs(cfg.json, result, f"layer {info['layer']} MLP neurons", heatmap_html(result), {})
    return result
