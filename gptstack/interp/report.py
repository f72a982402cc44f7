"""The interp commands' runs and their outputs: JSON for programs, and beside it (same stem) PNG plots
and one self-contained HTML page (plots inlined as base64, token heat maps as coloured spans, tables).

`run_lens`, `run_heads` and `run_patch` each take a config, load the checkpoint (or .gguf) with its own
tokenizer, compute, then write every file through a temporary name and a rename, so a failure leaves
no half-written output. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gptstack.checkpoint import load_model
from gptstack.interp.heads import head_patterns, induction_scores, top_heads
from gptstack.interp.lens import TunedLens, lens_table
from gptstack.interp.patching import patch_sweep
from gptstack.model import GPT


@dataclass
class LensConfig:
    checkpoint: str  # checkpoint folder or .gguf file
    prompt: str = ""  # the text whose last token each layer's residual predicts from
    target: str | None = None  # a token to follow through the layers (its rank and probability), e.g. " Paris"
    tuned: str | None = None  # a tuned-lens file (gptstack interp tuned-lens) to read the layers through as well
    top: int = 5  # tokens listed per layer
    json: str = "lens.json"  # the JSON to write (HTML and PNG go beside it)


@dataclass
class HeadsConfig:
    checkpoint: str  # checkpoint folder or .gguf file
    prompt: str | None = None  # also record every head's attention pattern on this text
    induction: bool = False  # score induction heads on repeated random tokens (the default without --prompt)
    seq_len: int = 50  # induction: random tokens per copy
    batch_size: int = 4  # induction: sequences averaged
    seed: int = 0  # induction: random tokens
    json: str = "heads.json"  # the JSON to write (HTML and PNG go beside it)


@dataclass
class PatchConfig:
    checkpoint: str  # checkpoint folder or .gguf file
    clean: str = ""  # the prompt whose answer is the target
    corrupt: str = ""  # the same number of tokens, changed so the answer changes
    target: str = ""  # the clean answer's token, e.g. " Paris"
    against: str | None = None  # the corrupted answer's token: the metric becomes the logit difference
    point: str = (
        "resid_pre"  # the activation swept per layer and position: resid_pre|resid_mid|resid_post|attn.out|mlp.out
    )
    json: str = "patch.json"  # the JSON to write (HTML and PNG go beside it)


# ---- files -----------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _figure(draw) -> bytes:
    """PNG bytes of draw(fig) (matplotlib's Agg backend)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 4.5))
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(json_path: str, data: dict, title: str, body: str, pngs: dict[str, bytes]) -> list[Path]:
    """JSON, its PNGs (STEM.NAME.png) and the HTML page (STEM.html, the PNGs inlined) beside each other."""
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    imgs = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}">'
        for name, png in pngs.items()
    )
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:2px 6px;font-size:13px}.tok{font-family:monospace;white-space:pre;padding:1px}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}{imgs}</body></html>")  # fmt: skip
    written = []
    for name, png in pngs.items():
        written.append(out.with_name(f"{out.stem}.{name}.png"))
        _write(written[-1], png)
    written += [out.with_suffix(".html"), out]
    _write(written[-2], page.encode())
    _write(out, json.dumps(data, indent=1).encode())
    return written


def token_heat(tokens: list[str], values: list[float]) -> str:
    """Tokens as spans shaded by value in [0, 1] (the title attribute holds the number)."""
    spans = (
        f'<span class="tok" title="{v:.3f}" style="background:rgba(220,50,30,{max(0.0, min(1.0, v)):.3f})">'
        f"{html.escape(t)}</span>"
        for t, v in zip(tokens, values, strict=True)
    )
    return "<p>" + "".join(spans) + "</p>"


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _load(checkpoint: str) -> GPT:
    return load_model(checkpoint, require_tokenizer=True)


# ---- lens ------------------------------------------------------------------------------------------


def lens_plot(tables: dict[str, dict]) -> bytes:
    """The target's probability (or the top-1 token's) at each layer, one line per lens."""

    def draw(fig):
        ax = fig.add_subplot()
        for name, t in tables.items():
            key = "target_prob" if "target" in t else None
            ys = [r[key] if key else r["top"][0][1] for r in t["layers"]]
            ax.plot(range(len(ys)), ys, "o-", label=f"{name} lens")
        t = next(iter(tables.values()))
        what = f"p({t['target']!r})" if "target" in t else "top-1 probability"
        ax.set_xlabel("layer (resid_post)"), ax.set_ylabel(what), ax.set_ylim(0, 1), ax.grid(alpha=0.3)
        ax.legend(), ax.set_title(f"{what} after each layer: {t['prompt'][:60]!r}")

    return _figure(draw)


def lens_html(tables: dict[str, dict]) -> str:
    parts = []
    for name, t in tables.items():
        has = "target" in t
        rows = [
            [r["layer"], " ".join(f"{tok!r} {p:.2f}" for tok, p in r["top"])]
            + ([r["target_rank"], f"{r['target_prob']:.4f}"] if has else [])
            for r in t["layers"]
        ]
        header = ["layer", "top tokens"] + (["target rank", "target p"] if "target" in t else [])
        first = f"; the target is top-1 from layer {t['first_top1_layer']}" if "target" in t else ""
        parts.append(f"<h2>{name} lens{html.escape(first)}</h2>" + table(header, rows))
    return "".join(parts)


def run_lens(cfg: LensConfig, model: GPT | None = None) -> dict:
    """Logit lens (and the tuned lens if given) at the prompt's last token; writes JSON, PNG, HTML."""
    model = model if model is not None else _load(cfg.checkpoint)
    if not cfg.prompt:
        raise ValueError("interp lens needs --prompt TEXT")
    tuned = TunedLens.load(cfg.tuned, model) if cfg.tuned else None  # a bad file fails before any work
    tables = {"logit": lens_table(model, cfg.prompt, cfg.target, None, cfg.top)}
    if tuned is not None:
        tables["tuned"] = lens_table(model, cfg.prompt, cfg.target, tuned, cfg.top)
    data = {"checkpoint": cfg.checkpoint, **tables}
    write_outputs(cfg.json, data, f"lens: {cfg.prompt}", lens_html(tables), {"lens": lens_plot(tables)})
    return data


# ---- heads -----------------------------------------------------------------------------------------


def grid_plot(scores: list[list[float]], title: str) -> bytes:
    """A layer × head heat map of scores in [0, 1]."""

    def draw(fig):
        ax = fig.add_subplot()
        im = ax.imshow(torch.tensor(scores).T, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xlabel("layer"), ax.set_ylabel("head"), ax.set_title(title)
        fig.colorbar(im, ax=ax)

    return _figure(draw)


def run_heads(cfg: HeadsConfig, model: GPT | None = None) -> dict:
    """Induction scores per head (and every head's pattern on --prompt); writes JSON, PNG, HTML."""
    model = model if model is not None else _load(cfg.checkpoint)
    data: dict = {"checkpoint": cfg.checkpoint}
    body, pngs = "", {}
    if cfg.induction or cfg.prompt is None:
        ind = induction_scores(model, cfg.seq_len, cfg.batch_size, cfg.seed)
        ind["top"] = top_heads(ind["induction"], 10)
        data["induction"] = ind
        pngs["induction"] = grid_plot(ind["induction"], "induction score (repeated random tokens)")
        rows = [[L, h, f"{s:.3f}"] for L, h, s in ind["top"]]
        losses = f"loss on the first copy {ind['loss_first_copy']:.3f}, on the second {ind['loss_second_copy']:.3f}"
        body += f"<p>{losses} nats/token</p>" + table(["layer", "head", "induction score"], rows)
    if cfg.prompt is not None:
        tok = model.tokenizer
        ids = tok.encode_prompt(cfg.prompt)
        pat = head_patterns(model, torch.tensor([ids], device=model.lm_head.weight.device))[:, 0]  # (L, h, T, T)
        tokens = [tok.decode([t]) for t in ids]
        data["prompt"] = {"text": cfg.prompt, "tokens": tokens, "patterns": pat.tolist()}
        last = pat[:, :, -1]  # (L, h, T): where the last token looks
        strongest = last.amax(-1)
        pngs["last_token"] = grid_plot(strongest.tolist(), "max attention of the last token")
        body += "<h2>attention of the last token, per head</h2>" + "".join(
            f"<p>L{L}.H{h}</p>" + token_heat(tokens, last[L, h].tolist())
            for L in range(last.size(0))
            for h in range(last.size(1))
        )
    write_outputs(cfg.json, data, f"heads: {cfg.checkpoint}", body, pngs)
    return data


# ---- patching --------------------------------------------------------------------------------------


def patch_plot(effect: list[list[float]], tokens: list[str], point: str) -> bytes:
    def draw(fig):
        ax = fig.add_subplot()
        im = ax.imshow(torch.tensor(effect), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", origin="lower")
        ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=60, fontsize=7)
        ax.set_ylabel("layer"), ax.set_title(f"patching effect of the clean {point}")
        fig.colorbar(im, ax=ax)

    return _figure(draw)


def run_patch(cfg: PatchConfig, model: GPT | None = None) -> dict:
    """Activation patching of the clean run into the corrupted one per layer × position; writes JSON, PNG, HTML."""
    model = model if model is not None else _load(cfg.checkpoint)
    tok, device = model.tokenizer, model.lm_head.weight.device
    clean, corrupt = (torch.tensor([tok.encode_prompt(t)], device=device) for t in (cfg.clean, cfg.corrupt))
    if not cfg.target:
        raise ValueError("interp patch needs --target TOKEN")
    target = tok.encode(cfg.target)[0]
    against = tok.encode(cfg.against)[0] if cfg.against else None
    sweep = patch_sweep(model, clean, corrupt, target, against, cfg.point)
    tokens = [tok.decode([t]) for t in clean[0].tolist()]
    data = {"checkpoint": cfg.checkpoint, "clean": cfg.clean, "corrupt": cfg.corrupt, "tokens": tokens,
            "target": tok.decode([target]), "against": cfg.against, **sweep}  # fmt: skip
    best = [max(range(len(row)), key=row.__getitem__) for row in sweep["effect"]]
    body = (f"<p>metric clean {sweep['metric_clean']:.3f}, corrupted {sweep['metric_corrupt']:.3f}</p>"
            + table(["layer", "most restoring token", "effect"],
                    [[L, repr(tokens[p]), f"{sweep['effect'][L][p]:.3f}"] for L, p in enumerate(best)]))  # fmt: skip
    write_outputs(
        cfg.json, data, f"patching: {cfg.clean}", body, {"patch": patch_plot(sweep["effect"], tokens, cfg.point)}
    )
    return data
