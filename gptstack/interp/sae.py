"""A sparse autoencoder for one layer's activation: `gptstack interp sae CKPT --data … --layer L --out DIR`.

The SAE reads x (D,) at one hook point of block L (the residual stream after the block by default, or the
MLP's output) and writes it as a sparse, non-negative combination of n = expansion·D learned directions:

    z = act((x·s - b_dec) W_enc + b_enc)      x̂ = (z W_dec + b_dec) / s

with act ReLU (plus an L1 penalty on z, Anthropic's "Towards Monosemanticity") or TopK (keep the k largest
pre-activations, ReLU'd; Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), and s a fixed
scalar that makes E‖x·s‖² = D on the first buffer, so one l1 and lr fit every model. Each decoder row is
held at unit norm (the gradient's component along the row is removed before each step and the row
renormalised after), so sparsity cannot be bought by shrinking z and growing W_dec. b_dec starts at the
mean activation, W_enc at W_dec's transpose.

Activations stream from the model (the forward stops after the hook point) into a shuffled buffer; the
first `skip` positions of each row are left out (the attention sink's outlier norms would dominate the
loss). A latent that has not fired for `dead_tokens` training tokens is dead; every `resample_every` steps
the dead ones are resampled (Anthropic): each takes the direction of a high-error input's residual
x - x̂ (drawn ∝ ‖x - x̂‖²) as its decoder row, the same direction × 0.2 × the mean alive encoder norm as
its encoder column, bias 0, and fresh Adam moments.

Metrics, on held-out text (the text file's last `val_fraction`, or the shard folder's val split):
FVU = Σ‖x - x̂‖² / Σ‖x - x̄‖² (fraction of variance unexplained), L0 = mean latents active per token, dead
latents (never fired on the held-out tokens, and dead by the training window), and CE loss recovered =
(L_zero - L_sae) / (L_zero - L_clean), the model's next-token loss with x̂ spliced into the forward
(through interp.hooks' patching) against the clean forward and the forward with the activation zeroed at
the same positions: 100% when x̂ = x, 0% when x̂ = 0. Saved: DIR/sae.safetensors (W_enc, b_enc, W_dec,
b_dec, scale) and DIR/sae.json (shape, kind, where it reads, the config, the metrics); `load_sae` reads them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from gptstack.checkpoint import load_model
from gptstack.data.shards import atomic_write
from gptstack.interp.hooks import patched
from gptstack.interp.neurons import InterpDataError, activations_at, batches, resolve_layer, token_pieces, token_rows
from gptstack.model import GPT

FORMAT = "gptstack-sae/1"
SITES = ("resid_post", "resid_mid", "resid_pre", "mlp.out", "attn.out")  # (B, T, D) points of a block


class SAEError(ValueError):
    """An SAE folder that cannot be read."""


@dataclass
class SAEConfig:
    checkpoint: str  # checkpoint folder, run folder, or GGUF file
    data: str  # a UTF-8 text file or a shard folder: trains on its train split, measures on the val split
    out: str  # output folder: sae.safetensors and sae.json
    layer: int | None = None  # the block whose activation the SAE learns (default: n_layer // 2)
    site: Literal["resid_post", "resid_mid", "resid_pre", "mlp.out", "attn.out"] = "resid_post"  # the block's point
    kind: Literal["topk", "relu"] = "topk"  # TopK (k latents per token) or ReLU with an L1 penalty
    expansion: int = 8  # latents per input dimension
    k: int = 32  # topk: active latents per token
    l1: float = 5.0  # relu: L1 coefficient on the latents (inputs scaled to E|x|² = D)
    lr: float = 1e-3  # Adam learning rate
    train_tokens: int = 262_144  # activations trained on (the split repeats if shorter)
    batch_tokens: int = 1024  # activations per optimizer step
    buffer_tokens: int = 32_768  # activations gathered and shuffled before training on them
    eval_tokens: int = 16_384  # held-out tokens for FVU, L0, dead latents and CE loss recovered
    dead_tokens: int = 65_536  # a latent that has not fired for this many training tokens is dead
    resample_every: int = 0  # resample dead latents every N steps (0: never)
    seq_len: int = 128  # tokens per row the model reads
    batch_size: int = 8  # rows per model forward
    skip: int = 1  # leading positions of each row left out (the attention sink)
    val_fraction: float = 0.1  # text files: the last fraction (cut at a line end) is the val split
    seed: int = 0  # initialisation and shuffling
    device: str = "cpu"  # torch device
    progress: bool = True  # show a progress bar


class SparseAutoencoder(nn.Module):
    """x (N, D) → latents z (N, n) → x̂ (N, D), in the activation's own units (the scale is inside)."""

    def __init__(self, d_in: int, n_latents: int, kind: str = "topk", k: int = 32):
        super().__init__()
        if kind not in ("topk", "relu") or not 0 < k <= n_latents:
            raise ValueError(f"an SAE is topk or relu with 0 < k <= {n_latents} latents, got {kind!r}, k={k}")
        self.kind, self.k = kind, k
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def init_weights(self, sample: Tensor, seed: int = 0) -> None:
        """Unit-norm random decoder rows, W_enc = W_decᵀ, the scale from `sample` (N, D) and b_dec its mean."""
        g = torch.Generator().manual_seed(seed)
        self.W_dec.copy_(F.normalize(torch.randn(self.W_dec.shape, generator=g), dim=-1))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.scale.fill_(math.sqrt(sample.size(-1) / sample.float().square().sum(-1).mean().clamp_min(1e-12)))
        self.b_dec.copy_(sample.float().mean(0) * self.scale)

    def encode(self, x: Tensor) -> Tensor:
        pre = (x.float() * self.scale - self.b_dec) @ self.W_enc + self.b_enc  # (N, n)
        if self.kind == "relu":
            return F.relu(pre)
        vals, where = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, where, F.relu(vals))

    def decode(self, z: Tensor) -> Tensor:
        return (z @ self.W_dec + self.b_dec) / self.scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)
        return self.decode(z).to(x.dtype), z

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove each decoder row's gradient component along the row (the unit-norm constraint's tangent)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(-1, keepdim=True) * w


# ---- activations ------------------------------------------------------------------------------------------


def point_name(layer: int, site: str) -> str:
    if site not in SITES:
        raise ValueError(f"--site {site!r} is not one of {', '.join(SITES)}")
    return f"blocks.{layer}.{site}"


def row_batches(model: GPT, cfg: SAEConfig, split: str, max_tokens: int = 0) -> Iterator[Tensor]:
    """(b, T) token rows of cfg.data's split, up to max_tokens tokens (0: all)."""
    pieces = token_pieces(cfg.data, model.tokenizer, model.config.vocab_size, split, cfg.val_fraction)
    return batches(token_rows(pieces, cfg.seq_len, max_tokens), cfg.batch_size)


def activation_stream(model: GPT, cfg: SAEConfig) -> Iterator[Tensor]:
    """Training activations (N, D), one model batch at a time without the skipped positions; the train split
    repeats until the caller stops."""
    name, device = point_name(cfg.layer, cfg.site), next(model.parameters()).device
    while True:
        seen = False
        for idx in row_batches(model, cfg, "train"):
            seen = True
            acts = activations_at(model, idx.to(device), name)  # (b, T, D)
            yield acts[:, cfg.skip :].reshape(-1, acts.size(-1)).float()
        if not seen:
            raise InterpDataError(f"{cfg.data}: fewer than --seq-len {cfg.seq_len} tokens in the train split")


def shuffled(stream: Iterator[Tensor], buffer_tokens: int, batch_tokens: int, g: torch.Generator):
    """Minibatches (batch_tokens, D) drawn from successive shuffled buffers of about buffer_tokens."""
    while True:
        parts, n = [], 0
        while n < buffer_tokens:
            parts.append(next(stream))
            n += parts[-1].size(0)
        buf = torch.cat(parts)
        buf = buf[torch.randperm(buf.size(0), generator=g, device="cpu").to(buf.device)]
        for i in range(0, buf.size(0) - batch_tokens + 1, batch_tokens):
            yield buf[i : i + batch_tokens]


# ---- training -----------------------------------------------------------------------------------------------


def sae_loss(sae: SparseAutoencoder, x: Tensor, l1: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, z, squared error per token) on x (N, D), in the scaled units: Σ_d (x - x̂)² per token, plus
    l1 · Σ z for ReLU (unit-norm decoder rows make z's size the feature's)."""
    z = sae.encode(x)
    err = ((z @ sae.W_dec + sae.b_dec) - x.float() * sae.scale).square().sum(-1)  # (N,)
    loss = err.mean() + (l1 * z.sum(-1).mean() if sae.kind == "relu" else 0.0)
    return loss, z, err


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, opt: torch.optim.Adam, dead: Tensor, x: Tensor, g: torch.Generator) -> int:
    """Re-initialise the dead latents (bool (n,)) from inputs x (N, D) with large reconstruction error."""
    ids = dead.nonzero().flatten()
    if ids.numel() == 0:
        return 0
    x_hat, _ = sae(x)
    resid = (x - x_hat).float() * sae.scale  # (N, D)
    weight = resid.square().sum(-1).cpu().double()
    picks = torch.multinomial(weight / weight.sum(), ids.numel(), replacement=True, generator=g).to(x.device)
    direction = F.normalize(resid[picks], dim=-1)  # (d, D)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[ids] = direction
    sae.W_enc[:, ids] = direction.T * 0.2 * enc_norm
    sae.b_enc[ids] = 0.0
    for p, index in ((sae.W_dec, (ids,)), (sae.W_enc, (slice(None), ids)), (sae.b_enc, (ids,))):
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in opt.state.get(p, {}):
                opt.state[p][moment][index] = 0.0
    return int(ids.numel())


def train_sae(sae: SparseAutoencoder, minibatches: Iterator[Tensor], cfg: SAEConfig) -> dict:
    """Adam on `minibatches` for cfg.train_tokens tokens; returns the training log and the dead-latent state."""
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    steps = max(1, cfg.train_tokens // cfg.batch_tokens)
    since = torch.zeros(sae.W_dec.size(0), dtype=torch.long, device=sae.W_dec.device)  # tokens since each fired
    g, log, resampled, t0 = torch.Generator().manual_seed(cfg.seed + 1), [], 0, time.perf_counter()
    bar = tqdm(total=steps * cfg.batch_tokens, unit="tok", unit_scale=True, desc="sae", disable=not cfg.progress)
    for step in range(1, steps + 1):
        x = next(minibatches)
        loss, z, err = sae_loss(sae, x, cfg.l1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
        since += x.size(0)
        since[(z > 0).any(0)] = 0
        if cfg.resample_every and step % cfg.resample_every == 0 and step < steps:
            resampled += resample_dead(sae, opt, since >= cfg.dead_tokens, x, g)
            since[since >= cfg.dead_tokens] = 0  # a fresh latent gets a fresh window
        if step % max(1, steps // 50) == 0 or step == steps:
            xs = x.float() * sae.scale
            fvu = err.sum() / (xs - xs.mean(0)).square().sum()
            log.append({"step": step, "tokens": step * x.size(0), "loss": loss.item(), "fvu": fvu.item(),
                        "l0": (z > 0).sum(-1).float().mean().item()})  # fmt: skip
        bar.update(x.size(0))
    bar.close()
    dead = int((since >= cfg.dead_tokens).sum()) if steps * cfg.batch_tokens >= cfg.dead_tokens else None
    return {"log": log, "steps": steps, "resampled": resampled, "dead_in_training": dead,
            "train_seconds": time.perf_counter() - t0}  # fmt: skip


# ---- evaluation ---------------------------------------------------------------------------------------------


def splice_losses(model: GPT, rows: Iterator[Tensor], name: str, reconstruct: Callable[[Tensor], Tensor], skip: int):
    """Next-token loss (nats/token) of the clean forward, with `name` zeroed, and with it replaced by
    reconstruct(x) ((N, D) → (N, D)), at every position from `skip` on (earlier ones pass through);
    recovered = (zero - spliced) / (zero - clean)."""
    device, sums, count = next(model.parameters()).device, {"clean": 0.0, "zero": 0.0, "spliced": 0.0}, 0

    def splice(fn: Callable[[Tensor], Tensor]):
        def patch(value: Tensor) -> Tensor:  # value (B, T, D)
            out = value.clone()
            out[:, skip:] = fn(value[:, skip:].reshape(-1, value.size(-1))).view_as(value[:, skip:]).to(value.dtype)
            return out

        return patch

    with torch.no_grad():
        for idx in rows:
            idx = idx.to(device)
            targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)  # (B, T), last ignored
            n = targets[:, :-1].numel()
            sums["clean"] += model(idx, targets)[1].item() * n
            for key, fn in (("zero", torch.zeros_like), ("spliced", reconstruct)):
                with patched(model, {name: splice(fn)}):
                    sums[key] += model(idx, targets)[1].item() * n
            count += n
    if count == 0:
        raise InterpDataError("no held-out rows to measure the loss on")
    out = {k: v / count for k, v in sums.items()}
    gap = out["zero"] - out["clean"]
    out["recovered"] = (out["zero"] - out["spliced"]) / gap if gap else math.nan
    out["tokens"] = count
    return out


class ReconstructionStats:
    """Σ‖x - x̂‖², Σx, Σ‖x‖², active latents and which latents fired, over the tokens an SAE reconstructs."""

    def __init__(self, sae: SparseAutoencoder):
        self.sae, self.n = sae, 0
        self.err = self.sq = self.active = 0.0
        self.sum = torch.zeros(sae.W_dec.size(1), dtype=torch.float64)
        self.fired = torch.zeros(sae.W_dec.size(0), dtype=torch.bool)

    def __call__(self, x: Tensor) -> Tensor:  # x (N, D) → x̂ (N, D), recording as it goes
        x_hat, z = self.sae(x)
        xd = x.double().cpu()
        self.n += x.size(0)
        self.err += (xd - x_hat.double().cpu()).square().sum().item()
        self.sum += xd.sum(0)
        self.sq += xd.square().sum().item()
        self.active += (z > 0).sum().item()
        self.fired |= (z > 0).any(0).cpu()
        return x_hat

    def metrics(self) -> dict:
        total_var = self.sq - self.sum.square().sum().item() / self.n  # Σ‖x - x̄‖²
        return {"fvu": self.err / total_var, "l0": self.active / self.n, "dead_on_heldout": int((~self.fired).sum()),
                "heldout_tokens": self.n}  # fmt: skip


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, model: GPT, cfg: SAEConfig) -> dict:
    """FVU, L0, dead latents and CE loss recovered on cfg.eval_tokens held-out tokens."""
    stats = ReconstructionStats(sae)
    rows = row_batches(model, cfg, "val", cfg.eval_tokens)
    ce = splice_losses(model, rows, point_name(cfg.layer, cfg.site), stats, cfg.skip)
    return {**stats.metrics(), "ce_clean": ce["clean"], "ce_zero": ce["zero"], "ce_sae": ce["spliced"],
            "ce_recovered": ce["recovered"]}  # fmt: skip


# ---- files and the command ----------------------------------------------------------------------------------


def save_sae(sae: SparseAutoencoder, folder: str | Path, meta: dict) -> Path:
    """DIR/sae.safetensors then DIR/sae.json (written last, each atomically): a folder with the JSON is whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    tmp = folder / ".sae.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(folder / "sae.safetensors")
    info = {"format": FORMAT, "d_in": sae.W_dec.size(1), "n_latents": sae.W_dec.size(0), "kind": sae.kind,
            "k": sae.k, **meta}  # fmt: skip
    atomic_write(folder / "sae.json", json.dumps(info, indent=2).encode())
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> tuple[SparseAutoencoder, dict]:
    """The SAE in DIR and its sae.json record."""
    folder = Path(folder)
    meta_path, weights = folder / "sae.json", folder / "sae.safetensors"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAEError(f"{meta_path}: not a readable SAE record ({e})") from None
    if meta.get("format") != FORMAT:
        raise SAEError(f"{meta_path}: not a {FORMAT} record")
    sae = SparseAutoencoder(meta["d_in"], meta["n_latents"], meta["kind"], meta["k"])
    try:
        sae.load_state_dict(load_file(str(weights), device=str(device)))
    except (OSError, SafetensorError, RuntimeError) as e:
        raise SAEError(f"{weights}: {str(e).splitlines()[0]}") from None
    return sae.to(device), meta


def train_and_measure(cfg: SAEConfig) -> dict:
    """Train an SAE on one layer's activation, measure it on held-out text, and save it to cfg.out."""
    model = load_model(cfg.checkpoint, cfg.device)
    cfg = dataclasses.replace(cfg, layer=resolve_layer(model, cfg.layer, cfg.seq_len, cfg.skip, dense=False))
    point = point_name(cfg.layer, cfg.site)
    D = model.config.n_embd
    sae = SparseAutoencoder(D, cfg.expansion * D, cfg.kind, cfg.k)  # refuses a bad kind or k before any work
    if cfg.batch_tokens > cfg.buffer_tokens:
        raise ValueError(f"--batch-tokens {cfg.batch_tokens} exceeds --buffer-tokens {cfg.buffer_tokens}")
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    stream = activation_stream(model, cfg)
    first = next(stream)
    sae.init_weights(first.cpu(), cfg.seed)
    sae.to(first.device)
    g = torch.Generator().manual_seed(cfg.seed)
    trained = train_sae(sae, shuffled(_chain(first, stream), cfg.buffer_tokens, cfg.batch_tokens, g), cfg)
    metrics = evaluate_sae(sae, model, cfg)
    meta = {"checkpoint": cfg.checkpoint, "layer": cfg.layer, "site": cfg.site, "point": point,
            "config": dataclasses.asdict(cfg), "metrics": metrics, "training": trained}  # fmt: skip
    save_sae(sae, cfg.out, meta)
    extra = {k: v for k, v in trained.items() if k != "log"}
    return {"point": point, **metrics, **extra, "n_latents": sae.W_dec.size(0)}


def _chain(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest
