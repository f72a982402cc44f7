"""Human-readable reports: model summaries, and the run report (report.md sections and PNG plots)."""

from __future__ import annotations

from pathlib import Path

from gptstack.config import ModelConfig, load_config
from gptstack.model import count_params, flops_per_token, kv_cache_bytes_per_token


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def model_config_of(spec: str) -> ModelConfig:
    """A preset, a config JSON, or a checkpoint folder's config."""
    path = Path(spec)
    if path.is_dir() or path.name == "latest":
        from gptstack.checkpoint import load_config as checkpoint_config

        return checkpoint_config(path)
    return load_config(spec)


def describe_model(spec: str, context: int | None = None) -> str:
    cfg = model_config_of(spec)
    params = count_params(cfg)
    flops = flops_per_token(cfg, context)
    kv = kv_cache_bytes_per_token(cfg, 2)
    kinds = cfg.attn_kinds
    attn = (
        "dense"
        if set(kinds) == {"dense"}
        else f"{kinds.count('local')}/{len(kinds)} layers local (band {cfg.attn_window})"
    )
    heads = f"{cfg.n_head} heads × {cfg.head_dim}" + (
        f", {cfg.n_kv_head} KV heads" if cfg.n_kv_head != cfg.n_head else ""
    )
    ffn = f"{cfg.mlp} d_ff={cfg.d_ff}" + (f", {cfg.n_expert} experts top-{cfg.n_expert_active}" if cfg.n_expert else "")
    rows = [
        ("model", spec),
        (
            "shape",
            f"{cfg.n_layer} layers × {cfg.n_embd} wide, {heads}, context {cfg.block_size}, vocab {cfg.vocab_size}",
        ),
        ("blocks", f"{'pre' if cfg.prenorm else 'post'}-LN {cfg.norm}, {cfg.pos} positions, {ffn}, attention {attn}"),
        ("parameters", f"{params['total']:,} ({_human(params['total'])})"),
        ("active per token", f"{params['active']:,} ({_human(params['active'])})"),
        (
            "FLOPs per token",
            f"train {_human(flops['train'])} (6N + attention at context {context or cfg.block_size}), "
            f"forward {_human(flops['forward'])}",
        ),
        ("KV cache per token", f"{kv:,} bytes in bf16/fp16 ({_human(kv, 'B')}), {2 * kv:,} in fp32"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- the run report ----------------------------------------------------------------------------
SECTION_START, SECTION_END = "<!-- gptstack:{name} -->", "<!-- /gptstack:{name} -->"


def write_section(report: Path, name: str, body: str, title: str = "# gptstack run report") -> Path:
    """Put `body` in report.md as the section `name`, replacing an earlier one (other stages keep theirs)."""
    start, end = SECTION_START.format(name=name), SECTION_END.format(name=name)
    text = report.read_text() if report.is_file() else title + "\n"
    block = f"{start}\n{body.strip()}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    report.write_text(text)
    return report


def plot_training(records: list[dict], path: Path) -> Path:
    """Train loss (raw and smoothed) and validation loss against tokens, and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in records]
    loss = [r["loss"] for r in records]
    smooth, ema = [], None
    for x in loss:
        if x == x and abs(x) != float("inf"):  # skip non-finite (skipped) steps
            ema = x if ema is None else 0.95 * ema + 0.05 * x
        smooth.append(ema)
    evals = [r for r in records if "val_loss" in r]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax.plot(tokens, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    ax.plot(tokens, smooth, color="tab:blue", label="train (EMA 0.95)")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange", label="val")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(tokens, [r["lr"] for r in records], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_pretrain_report(run_dir: str | Path, summary: dict) -> Path:
    """loss.png and the "pretrain" section of report.md, from metrics.jsonl and the run summary."""
    from gptstack.train.loop import read_metrics

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if records:
        plot_training(records, run_dir / "loss.png")
    cfg = ModelConfig.from_dict(summary["model"])
    params = summary["params"]
    val = (
        f"{summary['val_loss']:.4f} nats/token, {summary['val_bpb']:.4f} bits/byte" if "val_loss" in summary else "n/a"
    )
    rows = [
        ("model", f"{cfg.n_layer} layers × {cfg.n_embd} wide, {cfg.n_head} heads, context {cfg.block_size}, "
                  f"vocab {cfg.vocab_size}; {params['total']:,} parameters"),
        ("trained", f"{summary['steps']:,} steps, {summary['tokens']:,} tokens in {summary['train_seconds']:.0f} s "
                    f"on {summary['world']} × {summary['device']} ({summary['dtype']})"),
        ("throughput", f"{summary['tokens_per_s']:,.0f} tokens/s (median), MFU {summary['mfu']:.1%} "
                       f"(peak: {summary['peak_source']})"),
        ("final train loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"),
        ("validation", val),
        ("skipped steps", f"{summary['skipped']} (non-finite loss or gradient)"),
        ("checkpoint", summary["checkpoint"]),
    ]  # fmt: skip
    lines = ["## Pretraining", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if records:
        lines += ["![training loss and learning rate](loss.png)", ""]
    if summary["samples"]:
        lines += ["### Samples at the end of training", ""]
        for s in summary["samples"]:
            lines += [f"Prompt `{s['prompt']!r}`:", "", "```", s["prompt"] + s["completion"], "```", ""]
    return write_section(run_dir / "report.md", "pretrain", "\n".join(lines))
