"""The logit lens and the tuned lens: what each layer's residual stream would predict if it were the last.

Logit lens (nostalgebraist 2020): decode blocks.L.resid_post with the model's own final norm and LM
head, `lm_head(ln_f(h_L))`. At the last layer this is the model's forward, operation for operation,
so its logits equal the model's (tested bitwise).

Tuned lens (Belrose et al. 2023): one affine translator per layer, h ↦ h + A_L h + b_L, trained so
that lm_head(ln_f(h_L + A_L h_L + b_L)) matches the final distribution: the loss is KL(p_final ‖
p_lens) over text. The last layer's translator is the identity (nothing to translate). Training on a
CPU is dominated by the LM head (V × D per token per layer, forward and backward), so each
translator starts from the closed-form least-squares map of h_L onto the final residual (ridge
regression over every training token: cheap, and already most of the way) and KL fine-tuning
follows for `steps` minibatches. The file is one safetensors with the shapes in its metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from gptstack.checkpoint import load_model
from gptstack.interp.hooks import run_with_cache, stack
from gptstack.model import GPT


class LensError(ValueError):
    """A lens file that does not fit the model, or input the lens cannot read."""


def decode(model: GPT, h: Tensor) -> Tensor:
    """Logits (..., V) from residuals (..., D) through the model's final norm and LM head."""
    return model.lm_head(model.transformer.ln_f(h))


def residuals(model: GPT, idx: Tensor) -> tuple[Tensor, Tensor]:
    """(logits (B, T, V), resid_post of every layer (n_layer, B, T, D)) from one forward."""
    logits, cache = run_with_cache(model, idx, ["blocks.*.resid_post"])
    return logits, stack(cache, "resid_post", model.config.n_layer)


class TunedLens(nn.Module):
    """Affine translators for layers 0 … n_layer-2 (zero-initialised: the logit lens); the last layer
    is read as is."""

    def __init__(self, n_layer: int, d: int):
        super().__init__()
        self.n_layer = n_layer
        self.translators = nn.ModuleList(nn.Linear(d, d) for _ in range(n_layer - 1))
        for t in self.translators:
            nn.init.zeros_(t.weight), nn.init.zeros_(t.bias)

    def forward(self, layer: int, h: Tensor) -> Tensor:
        if layer == self.n_layer - 1:
            return h
        return h + self.translators[layer](h)

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        info = {"n_layer": str(self.n_layer), "d": str(self.translators[0].in_features), **(meta or {})}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in info.items()})
        tmp.replace(path)  # never a half-written lens
        return path

    @classmethod
    def load(cls, path: str | Path, model: GPT) -> TunedLens:
        """The lens in `path`, checked against `model`'s depth and width."""
        try:
            with safe_open(str(path), "pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (OSError, SafetensorError) as e:
            raise LensError(f"{path}: not a tuned-lens file ({e})") from None
        want = (model.config.n_layer, model.config.n_embd)
        got = (int(meta.get("n_layer", -1)), int(meta.get("d", -1)))
        if got != want:
            raise LensError(f"{path}: lens for n_layer, n_embd = {got}, the model has {want}")
        lens = cls(*want)
        lens.load_state_dict(tensors)
        return lens.to(model.lm_head.weight.device)


def lens_logits(model: GPT, idx: Tensor, lens: TunedLens | None = None, at: int = -1) -> tuple[Tensor, Tensor]:
    """(per-layer logits (n_layer, B, V) at position `at`, the model's logits (B, V) there), in fp32."""
    with torch.no_grad():
        logits, res = residuals(model, idx)
        h = res[:, :, at]  # (n_layer, B, D)
        if lens is not None:
            h = torch.stack([lens(i, h[i]) for i in range(len(h))])
        return decode(model, h).float(), logits[:, at].float()


def token_texts(tok, ids: list[int], vocab_size: int) -> list[str]:
    """Each id's text; ids the tokenizer cannot decode (padding rows of the embedding) as <id>."""
    ok = tok.decodable_mask(vocab_size)
    return [tok.decode([i]) if ok[i] else f"<{i}>" for i in ids]


def _token(tok, text: str) -> int:
    ids = tok.encode(text)
    if not ids:
        raise LensError(f"target {text!r} encodes to no tokens")
    return ids[0]  # a multi-token target is ranked by its first token


def lens_table(model: GPT, prompt: str, target: str | None = None, lens: TunedLens | None = None, k: int = 5) -> dict:
    """Per layer at the prompt's last token: the top-k tokens with probabilities, and the target's rank
    (0 = top-1) and probability; `first_top1_layer`: the first layer from which the target stays top-1."""
    tok = model.tokenizer
    idx = torch.tensor([tok.encode_prompt(prompt)], device=model.lm_head.weight.device)
    per_layer, final = lens_logits(model, idx, lens)
    probs = per_layer[:, 0].softmax(-1)  # (n_layer, V)
    tid = _token(tok, target) if target is not None else None
    rows = []
    for i, p in enumerate(probs):
        vals, ids = p.topk(k)
        texts = token_texts(tok, ids.tolist(), probs.size(-1))
        row = {"layer": i, "top": [[t, float(v)] for v, t in zip(vals, texts, strict=True)]}
        if tid is not None:
            row["target_rank"], row["target_prob"] = int((p > p[tid]).sum()), float(p[tid])
        rows.append(row)
    out = {"prompt": prompt, "tokens": [tok.decode([t]) for t in idx[0].tolist()], "lens": "tuned" if lens else "logit"}
    out["layers"] = rows
    if tid is not None:
        out["target"], out["target_id"] = tok.decode([tid]), tid
        ranks = [r["target_rank"] for r in rows]
        out["first_top1_layer"] = next((i for i in range(len(ranks)) if all(r == 0 for r in ranks[i:])), None)
    out["final_top"] = token_texts(tok, [int(final[0].argmax())], probs.size(-1))[0]
    return out


# ---- training ---------------------------------------------------------------------------------------


@dataclass
class TunedLensConfig:
    checkpoint: str  # checkpoint folder or .gguf file whose residual stream the lens reads
    data: list[str] = field(default_factory=list)  # text files to train on (the last windows are held out)
    out: str = "lens.safetensors"  # the lens file to write (its held-out KL report goes to OUT.json)
    seq_len: int = 128  # tokens per window
    max_windows: int = 64  # windows read from the data in all, training and held out
    held_out: float = 0.25  # fraction of the windows held out for the per-layer KL report
    steps: int = 30  # KL fine-tuning minibatches after the least-squares start (0: the closed form alone)
    batch_size: int = 2  # windows per minibatch
    lr: float = 1e-3  # Adam learning rate of the KL fine-tuning
    ridge: float = 1e-2  # ridge penalty of the least-squares start, relative to the mean squared residual
    seed: int = 0  # minibatch order


def text_windows(model: GPT, files: list[str], seq_len: int, max_windows: int) -> Tensor:
    """Consecutive (seq_len,) windows of the files' tokens (each window opens with the model's BOS if it
    uses one), at most max_windows: (N, seq_len) int64."""
    if not files:
        raise LensError("no --data files given to train the lens on")
    tok, ids = model.tokenizer, []
    for f in files:
        try:
            ids += tok.encode(Path(f).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise LensError(f"{f}: cannot read ({e.strerror})") from None
    n = seq_len - len(tok.bos_prefix)
    rows = [tok.bos_prefix + ids[i : i + n] for i in range(0, len(ids) - n + 1, n)][:max_windows]
    if len(rows) < 2:
        raise LensError(f"{', '.join(files)}: {len(ids)} tokens, fewer than two windows of {seq_len}")
    return torch.tensor(rows)


def lens_kl(model: GPT, windows: Tensor, lens: TunedLens | None = None, batch: int = 2) -> list[float]:
    """Mean KL(p_final ‖ p_lens) in nats per token for every layer over `windows` (N, T)."""
    n_layer = model.config.n_layer
    total, count = torch.zeros(n_layer, dtype=torch.float64), 0
    with torch.no_grad():
        for rows in windows.split(batch):
            logits, res = residuals(model, rows.to(model.lm_head.weight.device))
            target = logits.float().log_softmax(-1).flatten(0, 1)  # (N, V)
            for i in range(n_layer):
                h = res[i] if lens is None else lens(i, res[i])
                q = decode(model, h).float().log_softmax(-1).flatten(0, 1)
                total[i] += F.kl_div(q, target, log_target=True, reduction="sum").item()
            count += target.size(0)
    return (total / count).tolist()


def least_squares_start(model: GPT, windows: Tensor, ridge: float, batch: int = 2) -> TunedLens:
    """Each translator as the ridge-regression map of h_L onto the final residual h_last - h_L."""
    n, d = model.config.n_layer, model.config.n_embd
    xtx, xty = torch.zeros(n - 1, d + 1, d + 1, dtype=torch.float64), torch.zeros(n - 1, d + 1, d, dtype=torch.float64)
    with torch.no_grad():
        for rows in windows.split(batch):
            _, res = residuals(model, rows.to(model.lm_head.weight.device))
            res = res.flatten(1, 2).double().cpu()  # (n_layer, N, D)
            x = torch.cat([res[:-1], torch.ones_like(res[:-1, :, :1])], dim=-1)  # (n-1, N, D+1)
            xtx += x.transpose(1, 2) @ x
            xty += x.transpose(1, 2) @ (res[-1:] - res[:-1])
    lam = ridge * xtx.diagonal(dim1=1, dim2=2)[:, :d].mean(-1)  # (n-1,) scaled to each layer's energy
    # Cholesky, not linalg.solve: batched LU fails inside MKL at torch.set_num_threads(2) (DLASWP error)
    chol = torch.linalg.cholesky(xtx + lam[:, None, None] * torch.eye(d + 1, dtype=torch.float64))
    sol = torch.cholesky_solve(xty, chol)  # (n-1, D+1, D)
    lens = TunedLens(n, d)
    with torch.no_grad():
        for i, t in enumerate(lens.translators):
            t.weight.copy_(sol[i, :d].T), t.bias.copy_(sol[i, d])
    return lens.to(model.lm_head.weight.device)


def kl_finetune(model: GPT, lens: TunedLens, windows: Tensor, cfg: TunedLensConfig) -> list[float]:
    """Adam on the summed per-layer KL(p_final ‖ p_lens); the model stays frozen. Returns the loss per step."""
    opt = torch.optim.Adam(lens.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    losses = []
    try:
        for _ in range(cfg.steps):
            rows = windows[torch.randint(len(windows), (cfg.batch_size,), generator=gen)]
            with torch.no_grad():
                logits, res = residuals(model, rows.to(model.lm_head.weight.device))
                target = logits.float().log_softmax(-1).flatten(0, 1)
            opt.zero_grad(set_to_none=True)
            step = 0.0
            for i in range(model.config.n_layer - 1):  # one layer's graph at a time: V-wide logits are large
                q = decode(model, lens(i, res[i])).float().log_softmax(-1).flatten(0, 1)
                loss = F.kl_div(q, target, log_target=True, reduction="batchmean")
                loss.backward()
                step += loss.item()
            opt.step()
            losses.append(step / (model.config.n_layer - 1))
    finally:
        for p, g in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(g)
    return losses


def train_tuned_lens(cfg: TunedLensConfig, model: GPT | None = None) -> dict:
    """Fit a tuned lens to cfg.checkpoint's model on cfg.data; write it to cfg.out and the held-out KL per
    layer (logit lens, least-squares start, tuned lens) to cfg.out + '.json'. Returns that report."""
    model = model if model is not None else load_model(cfg.checkpoint, require_tokenizer=True)
    windows = text_windows(model, cfg.data, cfg.seq_len, cfg.max_windows)
    n_test = max(1, math.ceil(len(windows) * cfg.held_out))
    train, test = windows[:-n_test], windows[-n_test:]
    lens = least_squares_start(model, train, cfg.ridge, cfg.batch_size)
    start_kl = lens_kl(model, test, lens, cfg.batch_size)
    losses = kl_finetune(model, lens, train, cfg)
    report = {
        "checkpoint": cfg.checkpoint, "data": cfg.data, "train_tokens": train.numel(), "held_out_tokens": test.numel(),
        "steps": cfg.steps, "train_loss": losses,
        "kl_logit_lens": lens_kl(model, test, None, cfg.batch_size),
        "kl_least_squares": start_kl, "kl_tuned_lens": lens_kl(model, test, lens, cfg.batch_size),
    }  # fmt: skip
    lens.save(cfg.out, {"checkpoint": cfg.checkpoint, "train_tokens": train.numel()})
    Path(cfg.out + ".json").write_text(json.dumps(report, indent=1))
    return report
