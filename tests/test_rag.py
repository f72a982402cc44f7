"""Retrieval with citations: chunk spans, BM25 against bm25s and a hand count, dense recall on real
text, the index folder's round trip and refusals, the citation filter's guarantee, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file

from gptstack import cli
from gptstack.rag.chunk import chunk_document, chunk_spans
from gptstack.rag.cite import CitationFilter, clean, grounded_messages, marker_ids
from gptstack.rag.evaluate import cloze_questions, retrieval_metrics, stdlib_docstrings
from gptstack.rag.index import Index, RagError
from gptstack.rag.retrieve import RagIndexConfig, Retriever, build_index, fuse, ranking

bm25s = __import__("bm25s") if os.environ.get("CI") else pytest.importorskip("bm25s", reason="the rag extra (bm25s)")


def write_jsonl(path: Path, docs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    return path


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, str]]:
    """30 real documents: standard library module docstrings of 400+ characters (87 chunks of 800)."""
    return stdlib_docstrings(min_chars=400)[:30]


@pytest.fixture(scope="module")
def built(docs, tmp_path_factory) -> Path:
    """An index of `docs` (BM25 and MiniLM), built once by the library's own entry point."""
    root = tmp_path_factory.mktemp("rag")
    cfg = RagIndexConfig(str(write_jsonl(root / "docs.jsonl", docs)), str(root / "index"), progress=False)  # fmt: skip
    build_index(cfg)
    return root / "index"


# ---- chunks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,overlap", [(100, 0), (300, 40), (800, 100)])
def test_chunk_spans_are_exact_bounded_and_cover_the_text(size, overlap):
    text = shared_file("text/tinyshakespeare.txt").read_text()[:30_000]
    chunks = chunk_document("shakespeare", "tinyshakespeare.txt", text, size, overlap)
    assert chunks and all(text[c.start : c.end] == c.text for c in chunks)
    assert all(0 < len(c.text) <= size and c.text == c.text.strip() for c in chunks)
    starts = [c.start for c in chunks]
    assert starts == sorted(set(starts))
    covered = np.zeros(len(text), bool)
    for c in chunks:
        covered[c.start : c.end] = True
    missed = [i for i in np.flatnonzero(~covered) if not text[i].isspace()]
    assert missed == [], f"characters in no chunk at {missed[:5]}"
    repeated = sum(a.end - b.start for a, b in itertools.pairwise(chunks) if a.end > b.start)
    assert repeated <= overlap * len(chunks)


def test_chunks_cut_at_paragraphs_and_refuse_bad_sizes():
    assert chunk_spans("First para.\n\nSecond one.", size=16, overlap=0) == [(0, 11), (13, 24)]
    assert chunk_spans("   \n ", 16, 0) == []
    with pytest.raises(ValueError, match="chunk size"):
        chunk_spans("text", size=100, overlap=60)


# ---- BM25 ------------------------------------------------------------------------------------------


def test_bm25_scores_are_lucene_bm25_by_hand(tmp_path):
    texts = ["apple banana apple", "banana cherry", "cherry cherry cherry date"]
    index = Index.build(chunk_document_list(texts), None, {})
    # Lucene BM25, k1 1.5, b 0.75: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    # tf part = tf / (tf + k1 (1 - b + b dl / avgdl)); document lengths 3, 2, 4 terms
    avg = 3.0

    def term(tf: int, df: int, dl: int) -> float:
        idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
        return idf * tf / (tf + 1.5 * (1 - 0.75 + 0.75 * dl / avg))

    expected = [term(2, 1, 3) + term(1, 2, 3), term(1, 2, 2), 0.0]  # query "apple banana"
    np.testing.assert_allclose(index.bm25_scores("Apple, banana!"), expected, rtol=1e-5)
    assert not index.bm25_scores("zebra").any()  # a term the corpus lacks scores nothing


def chunk_document_list(texts: list[str]):
    return [c for i, t in enumerate(texts) for c in chunk_document(f"d{i}", f"d{i}", t, 800, 0)]


def test_bm25_ranks_as_bm25s_does_on_real_text(built, docs):
    retriever = Retriever.load(str(built))
    texts = [c.text for c in retriever.index.chunks]
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    for q in cloze_questions(docs, 10, seed=1):
        ours = [texts.index(h.chunk.text) for h in retriever.search(q.question, 5, "bm25")]
        ids, scores = ref.retrieve(bm25s.tokenize([q.question], stopwords="en", show_progress=False), k=5,
                                   show_progress=False)  # fmt: skip
        ours_scores = [h.score for h in retriever.search(q.question, 5, "bm25")]
        np.testing.assert_allclose(ours_scores, scores[0][: len(ours)], rtol=1e-5)
        assert set(ours) == set(ids[0][: len(ours)].tolist()) or np.unique(scores[0]).size < 5


# ---- dense and hybrid ------------------------------------------------------------------------------


def test_dense_and_hybrid_find_the_answer_on_real_text(built, docs):
    retriever = Retriever.load(str(built))
    questions = cloze_questions(docs, 30, seed=0)
    assert len(questions) >= 25
    for q in questions:  # by construction the answer is in exactly one document
        assert [d for d, t in docs if re.search(rf"\b{re.escape(q.answer)}\b", t)] == [q.doc], q
    dense = retrieval_metrics(retriever, questions, "dense")
    hybrid = retrieval_metrics(retriever, questions, "hybrid")
    bm25 = retrieval_metrics(retriever, questions, "bm25")
    assert dense["recall@5"] >= 0.8, dense
    assert hybrid["recall@5"] >= max(0.9, min(bm25["recall@5"], dense["recall@5"])), (bm25, dense, hybrid)


def test_reciprocal_rank_fusion_by_hand():
    fused = fuse([np.array([2, 0]), np.array([0, 1, 2])], 3)
    np.testing.assert_allclose(fused, [1 / 62 + 1 / 61, 1 / 62, 1 / 61 + 1 / 63])
    assert ranking(np.array([1.0, 3.0, 3.0, 0.5]), 3).tolist() == [1, 2, 0]  # ties: the earlier chunk first


# ---- the index folder ------------------------------------------------------------------------------


def test_index_round_trip_and_search_agree(built):
    a = Retriever.load(str(built))
    b = Retriever(Index.load(built), a.embedder)
    assert a.index.chunks == b.index.chunks and np.array_equal(a.index.vectors, b.index.vectors)
    for method in ("bm25", "dense", "hybrid"):
        assert a.search("heap queue algorithm", 4, method) == b.search("heap queue algorithm", 4, method)
    heap = a.search("heap queue algorithm priority queue", 3, "hybrid")
    assert heap[0].chunk.doc == "heapq", [h.chunk.doc for h in heap]


def test_a_corrupt_or_missing_index_is_refused_by_name(built, tmp_path):
    with pytest.raises(RagError, match="does not exist"):
        Index.load(tmp_path / "nowhere")
    for name, damage in [("index.json", lambda p: p.write_text("{not json")),
                         ("chunks.jsonl", lambda p: p.write_bytes(p.read_bytes()[:-40])),
                         ("embeddings.npy", lambda p: p.write_bytes(p.read_bytes()[:-4])),
                         ("bm25/vocab.index.json", lambda p: p.unlink())]:  # fmt: skip
        copy = tmp_path / name.replace("/", "_")
        _copy_tree(built, copy)
        damage(copy / name)
        with pytest.raises(RagError) as e:
            Index.load(copy)
        assert name.split("/")[-1] in str(e.value), str(e.value)


def _copy_tree(src: Path, dst: Path) -> None:
    for p in src.rglob("*"):
        if p.is_file():
            (dst / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / p.relative_to(src)).write_bytes(p.read_bytes())


def test_bad_corpora_write_nothing(tmp_path):
    out = tmp_path / "index"
    blank = write_jsonl(tmp_path / "blank.jsonl", [("a", "  "), ("b", "\n")])
    with pytest.raises(RagError, match="no text to index"):
        build_index(RagIndexConfig(str(blank), str(out), dense=False, progress=False))
    dup = write_jsonl(tmp_path / "dup.jsonl", [("a", "one text"), ("a", "another")])
    with pytest.raises(RagError, match="appears twice"):
        build_index(RagIndexConfig(str(dup), str(out), dense=False, progress=False))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    with pytest.raises(RagError, match=r"broken\.jsonl:2"):
        build_index(RagIndexConfig(str(broken), str(out), dense=False, progress=False))
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    mine = tmp_path / "mine"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("keep me")
    ok = write_jsonl(tmp_path / "ok.jsonl", [("a", "some text to index")])
    with pytest.raises(RagError, match="not an index folder"):
        build_index(RagIndexConfig(str(ok), str(mine), dense=False, progress=False))
    assert (mine / "notes.txt").read_text() == "keep me"
    build_index(RagIndexConfig(str(ok), str(out), dense=False, progress=False))  # an index may be replaced
    build_index(RagIndexConfig(str(ok), str(out), dense=False, progress=False))
    with pytest.raises(RagError, match="no embeddings"):
        Retriever.load(str(out)).search("text", 1, "dense")


def test_a_folder_of_html_and_text_is_indexed_with_paths(tmp_path):
    pages = sorted(shared_file("html/ground-truth.json").parent.glob("*.html.gz"))[:2]
    folder = tmp_path / "docs"
    folder.mkdir()
    for p in pages:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "notes.md").write_text("# Notes\n\nThe quokka is a small marsupial of Rottnest Island.\n")
    r = build_index(RagIndexConfig(str(folder), str(tmp_path / "index"), dense=False, progress=False))
    assert r["documents"] == 3
    hit = Retriever.load(str(tmp_path / "index")).search("quokka marsupial", 1, "bm25")[0]
    assert (hit.chunk.doc, hit.chunk.source) == ("notes.md", (folder / "notes.md").as_posix())
    gold = json.loads(shared_file("html/ground-truth.json").read_text())[pages[0].name.split(".")[0]]["articleBody"]
    chunks = [c for c in Retriever.load(str(tmp_path / "index")).index.chunks if c.doc == pages[0].name]
    assert chunks and gold.split()[5] in " ".join(c.text for c in chunks)  # the article's text, not its markup


# ---- citations -------------------------------------------------------------------------------------


def test_a_citation_id_that_does_not_exist_is_never_emitted_in_any_split():
    assert clean("a [1] b [7] c [1, 9] d [0][2] e [1[9]2]", 2) == "a [1] b  c [1] d [2] e "
    rng = random.Random(0)
    alphabet = ["[", "]", "1", "2", "3", "9", ",", " ", "x", "[1]", "[5]", "[2, 3]", "[12]"]
    for _ in range(2000):
        n = rng.randint(0, 3)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        whole = CitationFilter(n)
        expected = whole.feed(text) + whole.flush()
        f, shown, at = CitationFilter(n), "", 0
        while at < len(text):
            step = rng.randint(1, 6)
            shown += f.feed(text[at : at + step])
            assert all(1 <= i <= n for i in marker_ids(shown)), (text, n, shown)
            at += step
        shown += f.flush()
        assert shown == expected and all(1 <= i <= n for i in marker_ids(shown)), (text, n, shown)


def test_grounded_messages_number_the_sources(built):
    hits = Retriever.load(str(built)).search("heap queue", 2, "bm25")
    messages = grounded_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}], hits)
    assert messages[0]["content"].endswith("Be brief.") and "[1]" in messages[0]["content"]
    assert messages[1]["content"].startswith("Sources:\n\n[1] (") and "\n\n[2] (" in messages[1]["content"]
    assert messages[1]["content"].endswith("Question: Q?") and hits[0].chunk.text in messages[1]["content"]


# ---- the CLI -----------------------------------------------------------------------------------------


def test_cli_index_and_query(tmp_path, capsys, docs):
    src = write_jsonl(tmp_path / "docs.jsonl", docs[:10])
    assert cli.main(["rag", "index", str(src), "--out", str(tmp_path / "idx"), "--no-dense", "--no-progress"]) == 0
    assert "indexed 10 documents" in capsys.readouterr().out
    query = ["rag", "query", str(tmp_path / "idx"), "--text", docs[3][1][:200], "--k", "2", "--method", "bm25"]
    assert cli.main([*query, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["doc"] == docs[3][0] and rows[0]["rank"] == 1 and len(rows) == 2
    text = dict(docs)[rows[0]["doc"]]
    assert text[rows[0]["start"] : rows[0]["end"]] == rows[0]["text"] and rows[0]["source"].endswith("docs.jsonl:4")
    assert cli.main(["rag", "query", str(tmp_path / "idx"), "--text", "x", "--method", "dense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no embeddings" in err[0], err
    assert cli.main(["rag", "query", str(tmp_path / "missing"), "--text", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
