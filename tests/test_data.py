"""The data pipeline on real data: sources and bad input, extraction scored against annotated pages,
filters with their published rules, PII, the quality classifier, MinHash-LSH against its S-curve,
shards and manifest, determinism across executors, the loader, contamination."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_file

from gptstack.data.audit import RULE_PARAMETERS, PrepareError, byte_audit, check_kept, how_to_relax
from gptstack.data.contamination import contamination_report, read_task, shard_documents, task_ngram
from gptstack.data.dedup import MinHasher, clusters, dedup_keep, ngram_hashes, normalize, word_hashes
from gptstack.data.extract import extract_html, word_prf
from gptstack.data.filters import (
    FILTERS,
    C4Lines,
    Code,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    Language,
    build_filter,
    mask_pii,
)
from gptstack.data.loader import TokenLoader
from gptstack.data.pipeline import LocalExecutor, PrepareConfig, format_stats, prepare
from gptstack.data.quality import QualityClassifier
from gptstack.data.shards import open_shards, read_manifest
from gptstack.data.sources import Document, Skip, iter_documents
from gptstack.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def html() -> Path:
    """../shared/data/html: 120 real web pages (`<key>.html.gz`) and their annotated article text."""
    return shared_file("html/ground-truth.json").parent


@pytest.fixture(scope="module")
def gold(html) -> dict:
    """The annotation of each page: {key: {"articleBody": text, …}}."""
    return json.loads((html / "ground-truth.json").read_text())


@pytest.fixture(scope="module")
def articles(gold) -> list[str]:
    return [gold[k]["articleBody"] for k in sorted(gold)]


def english_articles(articles: list[str], n: int) -> list[str]:
    lang = Language()
    return [a for a in articles if lang(a)[0] is not None][:n]


# --- sources -----------------------------------------------------------------------------------------
def test_sources_read_every_format_and_skip_bad_input_with_a_reason(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("plain text")
    (d / "b.md").write_text("# heading")
    (d / "c.py").write_text("x = 1\n")
    (d / "sub" / "d.html").write_text("<html><body><p>hi</p></body></html>")
    (d / "e.txt.gz").write_bytes(gzip.compress(b"gzipped text"))
    (d / "f.md.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zstd text"))
    (d / "g.jsonl").write_text('{"text": "one"}\n{"body": "no text field"}\nnot json\n\n{"text": "two"}\n')
    pq.write_table(pa.table({"text": ["row0", None, "row2"]}), d / "h.parquet")
    (d / "i.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "j.txt").write_bytes(b"\xff\xfe broken utf-8 \xc3")
    (d / "k.txt").write_text("   \n ")
    (d / "l.txt").write_text("x" * 5000)
    (d / "m.txt.gz").write_bytes(b"not gzip at all")
    (d / "ignored.bin").write_bytes(b"\x00")
    out = list(iter_documents([d], max_bytes=4000))
    docs = {x.id: x for x in out if isinstance(x, Document)}
    skips = {x.id: x.reason for x in out if isinstance(x, Skip)}
    assert {k: v.text for k, v in docs.items()} == {
        "a.txt": "plain text", "b.md": "# heading", "c.py": "x = 1\n",
        "sub/d.html": "<html><body><p>hi</p></body></html>", "e.txt.gz": "gzipped text", "f.md.zst": "zstd text",
        "g.jsonl:1": "one", "g.jsonl:5": "two", "h.parquet:0": "row0", "h.parquet:2": "row2",
    }  # fmt: skip
    assert docs["c.py"].kind == "code" and docs["sub/d.html"].kind == "html" and docs["a.txt"].kind == "text"
    assert {x.source for x in out} == {"in"}
    assert skips == {
        "g.jsonl:2": "missing_field", "g.jsonl:3": "decode_error", "h.parquet:1": "missing_field",
        "i.parquet": "corrupt_file: ArrowInvalid", "j.txt": "decode_error", "k.txt": "empty", "l.txt": "too_large",
        "m.txt.gz": "corrupt_file: BadGzipFile",
    }  # fmt: skip


def test_default_corpus_is_the_standard_library():
    first = next(d for d in iter_documents() if isinstance(d, Document))
    assert first.source == "stdlib" and first.id.endswith(".py") and first.kind == "code"


# --- extraction --------------------------------------------------------------------------------------
def test_extraction_beats_trafilatura_defaults_on_annotated_pages(html, gold):
    import trafilatura

    ours, default = [], []
    for key in sorted(gold):
        page = gzip.decompress((html / f"{key}.html.gz").read_bytes())
        ours.append(word_prf(extract_html(page), gold[key]["articleBody"])[2])
        default.append(word_prf(trafilatura.extract(page) or "", gold[key]["articleBody"])[2])
    assert len(ours) == 120
    assert np.mean(default) == pytest.approx(0.946, abs=0.003)  # the baseline, reproduced
    assert np.mean(ours) >= np.mean(default) and np.mean(ours) > 0.96


def test_word_prf():
    assert word_prf("a b c", "a b c") == (1.0, 1.0, 1.0)
    p, r, f = word_prf("a a b", "a b b c")
    assert (p, r) == (2 / 3, 2 / 4) and f == pytest.approx(2 * p * r / (p + r))
    assert word_prf("", "a") == (0.0, 0.0, 0.0)


# --- filters -----------------------------------------------------------------------------------------
def test_real_articles_pass_the_web_filters(articles):
    english = english_articles(articles, 20)
    for f in (GopherRepetition(), GopherQuality(), FineWebQuality()):
        kept = sum(f(a)[0] is not None for a in english)
        assert kept >= 16, (f.name, kept)


@pytest.mark.parametrize(
    "flt, text, rule",
    [
        (GopherQuality(), "too short a document", "min_doc_words"),
        (GopherQuality(), " ".join(["a"] * 60), "min_avg_word_length"),
        (GopherQuality(), " ".join(["extraordinarily"] * 60), "max_avg_word_length"),
        (GopherQuality(), " ".join(["#tag the and"] * 30), "symbol_word_ratio"),
        (GopherQuality(), "\n".join(["- item one of the list and more"] * 20), "bullet_lines_ratio"),
        (
            GopherQuality(),
            "\n".join(["this line trails off and the rest of the story is left for the reader to imagine..."] * 20),
            "ellipsis_lines_ratio",
        ),
        (GopherQuality(), " ".join(["1234 5678 the and"] * 20), "alpha_words_ratio"),
        (GopherQuality(), " ".join(["words without any stop word here"] * 20), "stop_words"),
        (GopherRepetition(), "same paragraph here\n\n" * 10 + "different one", "dup_para_frac"),
        (GopherRepetition(), ("repeated line\n" * 5) + "unique words here and there\n" * 1, "dup_line_frac"),
        (C4Lines(), "The first sentence. Lorem ipsum dolor sit amet.", "lorem_ipsum"),
        (C4Lines(), "def f() { return 1; } is code.", "curly_bracket"),
        (C4Lines(), "Only one good sentence here.\nmenu\nhome", "too_few_sentences"),
        (FineWebQuality(), "no punctuation here at all\nnor here either my friend\n" * 3 + "x", "line_punct_ratio"),
        (
            FineWebQuality(),
            "Short.\nTiny.\nSmall.\nA very much longer line that ends properly.\n" * 1,
            "short_line_ratio",
        ),
        (Code(), "x = 1\n" + "y" * 1001, "max_line_length"),
        (Code(), "# Auto-generated by a tool. DO NOT EDIT.\nx = 1\n", "autogenerated"),
        (Code(), "#" * 50 + "\n" + "-" * 50, "alnum_fraction"),
        (Language(), "Ceci est un texte écrit en français, il parle du temps qu'il fait aujourd'hui.", "not_en"),
    ],
)
def test_each_rule_drops_what_it_names(flt, text, rule):
    assert flt(text) == (None, rule)


def test_c4_keeps_only_terminal_punctuation_lines_and_strips_citations():
    text = (
        "Navigation menu\nThe river rises in the hills.[1] It flows east to the sea.\n"
        "Please enable javascript to view this page.\nRead our privacy policy before you continue.\n"
        "Many fish live in it, and birds too. Farmers water their fields from it. Boats carry grain down it.\n"
        "Click here"
    )
    out, rule = C4Lines()(text)
    assert rule is None
    assert out == (
        "The river rises in the hills. It flows east to the sea.\n"
        "Many fish live in it, and birds too. Farmers water their fields from it. Boats carry grain down it."
    )


def test_filter_parameters_override_and_unknown_ones_fail():
    assert build_filter("gopher_quality", min_doc_words=3)("the cat and the dog sat with me today")[1] is None
    with pytest.raises(ValueError, match="has no parameter 'min_words'"):
        build_filter("gopher_quality", min_words=3)
    with pytest.raises(ValueError, match="unknown filter 'bloom'"):
        build_filter("bloom")


def test_pii_is_masked_and_non_personal_numbers_are_kept():
    text = (
        "Write to jane.doe+news@example.co.uk or call (555) 123-4567, +44 20 7946 0958.\n"
        "Server 8.8.8.8 and 2001:4860:4860:0:0:0:0:8888; router 192.168.1.1, loopback 127.0.0.1.\n"
        "Python 3.11.7 came out in 2023; pi is 3.14159; ids 1999 2000 2001; @decorator\n"
    )
    out, counts = mask_pii(text)
    assert counts == {"email": 1, "phone": 2, "ip": 2}
    assert "jane.doe" not in out and "8.8.8.8" not in out and "123-4567" not in out
    for kept in ("192.168.1.1", "127.0.0.1", "3.11.7", "3.14159", "1999 2000 2001", "@decorator"):
        assert kept in out
    assert "<EMAIL_ADDRESS>" in out and "<PHONE_NUMBER>" in out and "<IP_ADDRESS>" in out


# --- quality classifier ------------------------------------------------------------------------------
def _page_text(html: Path, key: str) -> str:
    """Everything a browser would show of a raw page: menus, footers, ads and the article."""
    import lxml.html

    root = lxml.html.fromstring(gzip.decompress((html / f"{key}.html.gz").read_bytes()))
    for bad in root.xpath("//script|//style|//noscript"):
        bad.drop_tree()
    return " ".join(root.text_content().split())


def test_quality_classifier_separates_articles_from_raw_pages(html, gold, tmp_path):
    keys = sorted(gold)
    positive = [gold[k]["articleBody"] for k in keys[:60]]
    negative = [_page_text(html, k) for k in keys[60:]]  # other pages, so no article is in both sets
    model, report = QualityClassifier.train(positive, negative)
    assert report["heldout_accuracy"] >= 0.8
    path = model.save(tmp_path / "q.npz")
    again = QualityClassifier.load(path)
    np.testing.assert_allclose(again.score(positive[:5]), model.score(positive[:5]), rtol=1e-5)
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a quality classifier"):
        QualityClassifier.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("score", [0.2, 0.6, 0.9, 1.0])
def test_pareto_keep_rate_matches_its_definition(score):
    # numpy's pareto(a) is Lomax: P(X > x) = (1 + x)^-a, so P(keep) = (2 - score)^-9.
    n = 4000
    kept = sum(QualityClassifier.keep(score, f"doc-{i}", seed=3) for i in range(n))
    p = (2 - score) ** -9
    assert abs(kept / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9
    assert QualityClassifier.keep(score, "doc-7", 3) == QualityClassifier.keep(score, "doc-7", 3)


# --- dedup -------------------------------------------------------------------------------------------
def _shingle_set(words: list[str]) -> set[int]:
    return set(ngram_hashes(word_hashes(words), 5).tolist())


def test_minhash_lsh_follows_the_s_curve_on_planted_near_duplicates():
    rng = random.Random(0)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(20000)]
    hasher = MinHasher()  # 14 bands × 8 rows
    texts, pairs, sims = [], [], []
    for level in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        for _ in range(50):
            base = rng.choices(vocab, k=400)
            copy = list(base)
            # Replacing a word changes ≤5 shingles; pick the count that lands near the target Jaccard.
            k = round(len(base) * (1 - level) / (1 + level) / 5 * 1.2) or 1
            for pos in rng.sample(range(len(copy)), k):
                copy[pos] = rng.choice(vocab)
            a, b = _shingle_set(base), _shingle_set(copy)
            sims.append(len(a & b) / len(a | b))
            pairs.append((len(texts), len(texts) + 1))
            texts += [" ".join(base), " ".join(copy)]
    sig = hasher.signatures([normalize(t) for t in texts])
    found = {tuple(p) for p in hasher.candidate_pairs(sig).tolist()}
    detected = np.array([p in found for p in pairs])
    sims = np.array(sims)
    planted = set(pairs)
    assert all(p in planted for p in found), "unrelated documents (Jaccard ≈ 0) must never pair"
    for lo, hi in [(0.0, 0.45), (0.45, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]:
        sel = (sims >= lo) & (sims < hi)
        if sel.sum() < 10:
            continue
        p = hasher.probability(sims[sel])  # each pair's own predicted probability
        expected, sd = p.sum(), np.sqrt((p * (1 - p)).sum())
        assert abs(detected[sel].sum() - expected) <= 3 * sd + 1, (lo, hi, detected[sel].sum(), expected)
    assert detected[sims > 0.85].mean() > 0.97 and detected[sims < 0.45].mean() < 0.03
    assert hasher.threshold == pytest.approx(0.685, abs=0.001)


def test_exact_dedup_ignores_case_spacing_and_punctuation_and_keeps_the_first():
    texts = ["Hello, World!  The end.", "hello world the end", "Something else entirely here", "HELLO WORLD. THE END"]
    hasher = MinHasher()
    keys, sig = hasher.features(texts)
    assert dedup_keep(keys, sig, hasher).tolist() == [0, 1, 0, 1]


def test_union_find_joins_chains_to_their_smallest_member():
    assert clusters(6, np.array([[4, 5], [1, 4], [2, 3]])).tolist() == [0, 1, 2, 2, 1, 1]


# --- the pipeline ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_dir(html, gold, articles, tmp_path_factory):
    """A mixed corpus: 30 real articles as .txt, an exact and a near duplicate, two pages of HTML, some
    stdlib-like code with an e-mail in it, a JSONL source with a bad line, and junk."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "web").mkdir()
    (d / "code").mkdir()
    (d / "chat").mkdir()
    english = english_articles(articles, 36)
    for i, a in enumerate(english[:30]):
        (d / "web" / f"a{i:02d}.txt").write_text(a)
    respaced = "\n".join("  ".join(line.split()) + "   " for line in english[0].splitlines())
    (d / "web" / "dup_exact.txt").write_text(respaced)  # equal after normalisation
    words = english[1].split()
    words[len(words) // 2] = "CHANGED"
    (d / "web" / "dup_near.txt").write_text(" ".join(words))
    for key in sorted(gold)[-2:]:  # pages whose articles are not among the .txt ones
        (d / "web" / f"{key[:8]}.html.gz").write_bytes((html / f"{key}.html.gz").read_bytes())
    import inspect
    import json as json_module

    (d / "code" / "json_init.py").write_text(inspect.getsource(json_module) + "\n# maintainer: bob@example.com\n")
    (d / "code" / "one.py").write_text("def add(a, b):\n    return a + b\n")
    lines = [json.dumps({"text": a}) for a in english[30:]] + ['{"oops": 1}']
    (d / "chat" / "x.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _prepare(corpus_dir, out, executor=None, **kw):
    inputs = [str(corpus_dir / s) for s in ("web", "code", "chat")]
    settings = {"tokenizer": "bytes", "shard_tokens": 40_000, "val_fraction": 0.1, **kw}
    return prepare(PrepareConfig(out=str(out), inputs=inputs, **settings), executor or LocalExecutor(1), progress=False)


def test_prepare_writes_checked_shards_and_a_manifest_that_accounts_for_every_document(corpus_dir, tmp_path):
    m = _prepare(corpus_dir, tmp_path / "out", keep_text=True)
    assert m["dtype"] == "uint16" and m["filters"]["dedup"] == {"exact": 1, "fuzzy": 1}
    assert m["skipped"] == {"missing_field": 1}
    assert m["pii"]["email"] >= 1
    read = sum(s["documents_read"] for s in m["sources"].values())
    dropped = sum(sum(rules.values()) for rules in m["filters"].values()) + sum(m["skipped"].values())
    kept = [json.loads(line) for line in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    assert read == 30 + 2 + 2 + 2 + 7 and read == dropped + len(kept)
    assert all("bob@example.com" not in d["text"] for d in kept)
    # Shards hold exactly the kept documents (each once at weight 1), recoverable at <|endoftext|>.
    from_shards = sorted(shard_documents(tmp_path / "out", ("train", "val")))
    assert from_shards == sorted(d["text"] for d in kept)
    assert len(m["splits"]["train"]["shards"]) > 1 and m["splits"]["val"]["documents"] >= 1
    open_shards(tmp_path / "out", "train", verify=True)
    table = format_stats(read_manifest(tmp_path / "out"))
    assert "| dedup | exact | 1 |" in table and "MB/s per core" in table
    # the byte audit: what was kept is exactly the kept documents' text; every drop is attributed
    audit = m["audit"]
    assert audit["kept_bytes"] == sum(len(d["text"].encode()) for d in kept)
    assert audit["dropped"]["dedup/exact"] > 0 and audit["dropped"]["dedup/fuzzy"] > 0
    assert "c4/lines_removed" in audit["dropped"] and m["warnings"] == []  # web text loses lines, not most of it
    assert "text:" in table and "reached the filters" in table


def test_mixture_weights_repeat_sources_as_recorded(corpus_dir, tmp_path):
    base = _prepare(corpus_dir, tmp_path / "w1", val_fraction=0.0)
    up = _prepare(corpus_dir, tmp_path / "w2", val_fraction=0.0, mixture={"chat": 3, "web": 0.5})
    assert up["sources"]["chat"]["train_tokens"] == 3 * base["sources"]["chat"]["train_tokens"]
    assert up["sources"]["code"]["train_tokens"] == base["sources"]["code"]["train_tokens"]
    ratio = up["sources"]["web"]["train_tokens"] / base["sources"]["web"]["train_tokens"]
    assert 0.2 < ratio < 0.8 and up["sources"]["web"]["weight"] == 0.5
    assert sum(s["share"] for s in up["sources"].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mixture names sources"):
        _prepare(corpus_dir, tmp_path / "w3", mixture={"nope": 2})


def test_prepare_is_deterministic_across_worker_counts_and_refuses_other_settings(corpus_dir, tmp_path):
    one = _prepare(corpus_dir, tmp_path / "a")
    two = _prepare(corpus_dir, tmp_path / "b", executor=LocalExecutor(2))
    for split in ("train", "val"):
        assert [s["sha256"] for s in one["splits"][split]["shards"]] == [
            s["sha256"] for s in two["splits"][split]["shards"]
        ]
    again = _prepare(corpus_dir, tmp_path / "a")  # same arguments: nothing to do
    assert again["fingerprint"] == one["fingerprint"]
    with pytest.raises(ValueError, match="prepared with other inputs or settings"):
        _prepare(corpus_dir, tmp_path / "a", seed=1)


@pytest.mark.slow
def test_dask_cluster_gives_byte_identical_shards(corpus_dir, tmp_path):
    from gptstack.data.pipeline import DaskExecutor

    local = _prepare(corpus_dir, tmp_path / "local")
    executor = DaskExecutor(workers=2)
    try:
        dask = _prepare(corpus_dir, tmp_path / "dask", executor=executor)
    finally:
        executor.close()
    for split in ("train", "val"):
        for a, b in zip(local["splits"][split]["shards"], dask["splits"][split]["shards"], strict=True):
            assert (tmp_path / "local" / a["file"]).read_bytes() == (tmp_path / "dask" / b["file"]).read_bytes()


def test_token_dtype_follows_the_vocabulary(corpus_dir, tmp_path):
    m = _prepare(corpus_dir, tmp_path / "cl", tokenizer="cl100k_base", dedup="exact", pii=False)
    assert m["dtype"] == "uint32" and m["tokenizer"]["n_vocab"] > 65536


# --- when prepare keeps nothing, or little --------------------------------------------------------------
@pytest.fixture(scope="module")
def shakespeare() -> Path:
    """Tiny Shakespeare: one 1.1 MB file of 200k words, so a single document."""
    return shared_file("text/tinyshakespeare.txt")


def test_prepare_that_keeps_nothing_fails_naming_the_rule_and_the_fix(shakespeare, tmp_path):
    cfg = PrepareConfig(out=str(tmp_path / "s"), inputs=[str(shakespeare)], tokenizer="bytes")
    with pytest.raises(PrepareError) as e:
        prepare(cfg, LocalExecutor(1), progress=False)
    message = str(e.value)
    assert "kept no documents" in message and "gopher_quality/max_doc_words dropped the most text" in message
    assert """--filters '{"gopher_quality": {"max_doc_words": 2000000}}'""" in message, message
    assert "max_doc_words is 100000 now" in message and """'{"gopher_quality": false}'""" in message
    assert not (tmp_path / "s" / "manifest.json").exists()  # no shard folder for pretrain to reject later


def test_prepare_that_drops_most_bytes_says_so_loudly(shakespeare, tmp_path):
    relaxed = {"gopher_quality": {"max_doc_words": 2_000_000}}  # the advice of the error above
    cfg = PrepareConfig(out=str(tmp_path / "s"), inputs=[str(shakespeare)], tokenizer="bytes", filters=relaxed)
    m = prepare(cfg, LocalExecutor(1), progress=False)
    assert m["splits"]["train"]["documents"] == 1 and m["splits"]["train"]["tokens"] > 300_000
    # C4 keeps only lines that end in terminal punctuation: speaker names and most verse lines go
    audit = m["audit"]
    assert audit["text_bytes"] == shakespeare.stat().st_size and 0.5 < audit["dropped_fraction"] < 0.9
    assert next(iter(audit["dropped"])) == "c4/lines_removed"
    (warning,) = m["warnings"]
    assert warning.startswith("WARNING: data prepare dropped") and "most of it by c4/lines_removed" in warning
    assert """--filters '{"c4": false}' turns the c4 filter off""" in warning
    assert format_stats(read_manifest(tmp_path / "s")).endswith(warning)  # the last thing `data prepare` prints


def test_each_relaxing_hint_names_a_real_option():
    for (name, rule), (param, _) in RULE_PARAMETERS.items():
        assert param in {f.name for f in dataclasses.fields(FILTERS[name])}, (name, rule, param)
    assert """'{"gopher_quality": {"min_stop_words": 0}}'""" in how_to_relax("gopher_quality/stop_words", {}, 0)
    raised = how_to_relax("gopher_quality/max_doc_words", {"gopher_quality": {"max_doc_words": 200_000}}, 0)
    assert '"max_doc_words": 4000000' in raised and "is 200000 now" in raised  # from the current setting
    assert """'{"fineweb": {"char_duplicates_ratio": 1.0}}'""" in how_to_relax("fineweb/char_dup_ratio", {}, 0)
    assert how_to_relax("gopher_repetition/top_2gram", {}, 0) == (
        """--filters '{"gopher_repetition": false}' turns the gopher_repetition filter off"""
    )
    assert "--dedup none" in how_to_relax("dedup/fuzzy", {}, 0)
    assert "--max-doc-bytes N reads larger documents (now 8,000,000)" in how_to_relax("read/too_large", {}, 8_000_000)
    with pytest.raises(PrepareError, match="read no documents"):
        check_kept(0, byte_audit(0, 0, {}), {}, {}, {}, 0)
    with pytest.raises(PrepareError, match=r"read/too_large removed the most documents.*--max-doc-bytes"):
        check_kept(0, byte_audit(0, 0, {}), {}, {"too_large": 2}, {}, 8_000_000)


# --- loader ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shard_dir(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    _prepare(corpus_dir, out)
    return out


def test_loader_reads_the_stream_in_order_across_shards(shard_dir):
    stream = np.concatenate([np.asarray(s, dtype=np.int64) for s in open_shards(shard_dir, "train")])
    loader = TokenLoader(shard_dir, batch_size=4, seq_len=64)
    for step in range(30):
        x, y = loader.next_batch()
        start = step * 4 * 64
        window = stream[start : start + 4 * 64 + 1]
        assert x.shape == (4, 64) and x.dtype == torch.int64
        assert (x.flatten().numpy() == window[:-1]).all() and (y.flatten().numpy() == window[1:]).all()


def test_ranks_together_read_what_one_process_reads(shard_dir):
    single = TokenLoader(shard_dir, batch_size=6, seq_len=32)
    ranks = [TokenLoader(shard_dir, batch_size=3, seq_len=32, rank=r, world_size=2) for r in range(2)]
    for _ in range(single.total // (6 * 32) + 5):  # long enough to wrap into a new epoch
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert single.epoch == ranks[0].epoch >= 1


def test_loader_resumes_exactly_from_its_state(shard_dir):
    a = TokenLoader(shard_dir, batch_size=2, seq_len=48)
    for _ in range(17):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(40)]
    b = TokenLoader(shard_dir, batch_size=2, seq_len=48)
    b.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON (it goes in checkpoints)
    for ex, got in zip(expected, (b.next_batch() for _ in range(40)), strict=True):
        assert torch.equal(ex[0], got[0]) and torch.equal(ex[1], got[1])


def test_loader_refuses_bad_requests_and_damaged_shards(shard_dir, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="fewer than one step needs"):
        TokenLoader(shard_dir, batch_size=1000, seq_len=1000)
    with pytest.raises(ValueError, match="no 'test' split"):
        TokenLoader(shard_dir, 1, 8, split="test")
    with pytest.raises(FileNotFoundError, match="not a shard folder"):
        TokenLoader(tmp_path, 1, 8)
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    shard = broken / read_manifest(broken)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="wrong size"):
        TokenLoader(broken, 1, 8)


# --- contamination -----------------------------------------------------------------------------------
def test_contamination_finds_the_planted_items(articles, tmp_path):
    lines = shared_file("eval/arc_easy.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines[:200]]
    task = tmp_path / "arc_easy.jsonl"
    task.write_text("\n".join(json.dumps(x) for x in items) + "\n")
    texts = read_task(task)
    long_enough = [i for i, t in enumerate(texts) if len(normalize(t)) >= 13]
    planted = [long_enough[3], long_enough[50], long_enough[151]]
    train = articles[:10] + [f"Some page quoting a test.\n{texts[i]}\nMore text after it." for i in planted]
    report = contamination_report(train, {"arc_easy": texts})["arc_easy"]
    assert report["dirty_items"] == planted and report["items"] == 200 and report["ngram"] == 13
    report = contamination_report(train, {"arc_easy": texts}, ngram=None)["arc_easy"]  # appendix C's n
    assert report["dirty_items"] == planted
    lengths = sorted(len(normalize(t)) for t in texts)
    assert report["ngram"] == int(np.clip(np.percentile(lengths, 5), 8, 13))
    assert task_ngram([["w"] * 3] * 20) == 8 and task_ngram([["w"] * 10] * 20) == 10
    assert task_ngram([["w"] * 40] * 20) == 13
    assert report["too_short"] == sum(len(normalize(t)) < report["ngram"] for t in texts)


def test_contamination_reads_shards(shard_dir):
    docs = list(shard_documents(shard_dir))
    report = contamination_report(docs, {"copy": [docs[0][:2000], "completely unrelated words " * 3]})["copy"]
    assert report["dirty_items"] == [0]
    tok = get_tokenizer(shard_dir / "tokenizer")
    assert tok.name == "bytes"


# --- interruption ------------------------------------------------------------------------------------
RUN = """
import sys
from gptstack.data.pipeline import LocalExecutor, PrepareConfig, prepare
cfg = PrepareConfig(out=sys.argv[1], inputs=sys.argv[2:], tokenizer="cl100k_base", shard_tokens=20_000,
                    chunk_bytes=40_000)
prepare(cfg, LocalExecutor(1), progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0.8, 2.0, 3.5])
def test_prepare_killed_anywhere_resumes_to_identical_shards(tmp_path, kill_after):
    import signal
    import subprocess
    import sys
    import time

    from gptstack.data.sources import default_corpus

    inputs = [str(default_corpus() / p) for p in ("email", "json", "http", "asyncio")]
    subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "ref"), *inputs], check=True)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(out), *inputs])
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "manifest.json").exists():  # finished before the kill: then it must be whole
        open_shards(out, "train", verify=True)
    assert not list(out.glob("*.tmp*")) or not (out / "manifest.json").exists()
    subprocess.run([sys.executable, "-c", RUN, str(out), *inputs], check=True)
    ref, got = read_manifest(tmp_path / "ref"), read_manifest(out)
    assert ref["splits"] == got["splits"]
    for split in ("train", "val"):
        open_shards(out, split, verify=True)
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(p.name for p in (tmp_path / "ref").glob("*.bin"))
    assert not list(out.glob(".work-*"))
