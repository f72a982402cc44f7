"""Measuring retrieval and citation against questions whose answer is known by construction.

A question is the start of a sentence of a document, to be completed with its next word, where that
word occurs (as a whole word) in exactly one document of the corpus. So the relevant chunks are
exactly the chunks whose text contains the answer, and every measure is exact, with no judge:

- retrieval recall@k: the fraction of questions with a relevant chunk among the top k; MRR: the mean
  reciprocal rank of the first relevant chunk (0 past DEPTH);
- citation precision: of the `[n]` ids a reply cites (after the CitationFilter), the fraction whose
  source contains the answer; citation recall: the fraction of questions whose reply cites one that does;
- answer match: the reply contains the answer as a whole word (case-insensitive); exact match: the reply's
  first word, markers, punctuation and case aside, is the answer.

The reader is any chat model behind our engine; `read` asks it each question with and without the
sources, so the difference in answer match is the hallucination that retrieval removes, measured.
Corpora: `stdlib_docstrings()` (module docstrings of the running Python's standard library) and any list
of (id, text) documents (the benchmark uses the 120 annotated articles of ../shared/data/html).
"""

from __future__ import annotations

import ast
import random
import re
import string
from collections import Counter
from dataclasses import dataclass

from gptstack.data.sources import default_corpus
from gptstack.infer.engine import Engine
from gptstack.infer.sampling import SamplingParams
from gptstack.rag.cite import MARKER, Grounding, grounded_messages, marker_ids
from gptstack.rag.retrieve import Hit, Method, Retriever

WORD = re.compile(r"\b[A-Za-z]+(?:['-][A-Za-z]+)*\b|\b\d+\b")  # inner ' or - allowed: "don't", "pretty-printed"
SENTENCE = re.compile(r"(?:[^.!?\n]|[.!?](?!\s|$))+[.!?](?=\s|$)")  # a period inside "0.5" does not end one


@dataclass(frozen=True)
class Question:
    id: str
    question: str  # the start of a sentence, up to the answer (its next word)
    answer: str
    doc: str  # the one document the answer occurs in


def stdlib_docstrings(min_chars: int = 300, limit: int | None = None) -> list[tuple[str, str]]:
    """(module name, docstring) of the standard library's top-level modules with a docstring of at
    least `min_chars` characters, sorted by name."""
    out = []
    for path in sorted(default_corpus().glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=True)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) >= min_chars:
            out.append((path.stem, doc))
    return out[:limit]


def _word_counts(docs: list[tuple[str, str]]) -> Counter:
    """How many documents each candidate word occurs in."""
    counts: Counter = Counter()
    for _, text in docs:
        counts.update(set(WORD.findall(text)))
    return counts


def _candidate(word: str) -> bool:
    """An answer worth asking for: a word of 5+ characters or a number of 3+ digits."""
    return len(word) >= (3 if word.isdigit() else 5)


def cloze_questions(docs: list[tuple[str, str]], n: int, seed: int = 0, max_words: int = 40) -> list[Question]:
    """Up to `n` questions, at most one per document: the start of a sentence (8 to `max_words` words)
    up to a word that occurs in that document only and not earlier in the sentence, after at least 6
    words; the answer is that next word. Deterministic for a seed."""
    counts, rng = _word_counts(docs), random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    out = []
    for i in order:
        doc, text = docs[i]
        sentences = [s.strip() for s in SENTENCE.findall(text) if 8 <= len(s.split()) <= max_words]
        rng.shuffle(sentences)
        for s in sentences:
            found = [m for m in WORD.finditer(s) if counts[m.group()] == 1 and _candidate(m.group())]
            found = [m for m in found if len(s[: m.start()].split()) >= 6]
            found = [m for m in found if not re.search(rf"\b{re.escape(m.group())}\b", s[: m.start()])]
            if found:
                m = rng.choice(found)
                out.append(Question(f"q{len(out)}", s[: m.start()].rstrip(), m.group(), doc))
                break
        if len(out) == n:
            break
    return out


def relevant(hit: Hit, q: Question) -> bool:
    """Whether a chunk holds the answer (only chunks of q.doc can: the answer occurs nowhere else)."""
    return re.search(rf"\b{re.escape(q.answer)}\b", hit.chunk.text) is not None


def retrieval_metrics(retriever: Retriever, questions: list[Question], method: Method, ks=(1, 3, 5)) -> dict:
    """recall@k for each k, MRR over the top DEPTH, and the mean fraction of the top max(ks) that is relevant."""
    depth, hits_at, rr, frac = 20, Counter(), 0.0, 0.0
    for q in questions:
        ranked = [relevant(h, q) for h in retriever.search(q.question, depth, method)]
        first = ranked.index(True) + 1 if True in ranked else None
        rr += 1 / first if first else 0.0
        hits_at.update(k for k in ks if first and first <= k)
        frac += sum(ranked[: max(ks)]) / max(ks)
    n = max(1, len(questions))
    out = {f"recall@{k}": hits_at[k] / n for k in ks}
    return {**out, "mrr": rr / n, f"precision@{max(ks)}": frac / n, "questions": len(questions)}


def normalize(text: str) -> str:
    text = MARKER.sub(" ", text).lower()
    return " ".join(text.translate(str.maketrans("", "", string.punctuation)).split())


def answer_scores(reply: str, answer: str) -> tuple[bool, bool]:
    """(exact match: the reply's first word is the answer; answer match: the answer occurs in the reply as
    a whole word), both case-insensitive, markers and punctuation aside."""
    found = re.search(rf"\b{re.escape(answer.lower())}\b", reply.lower()) is not None
    return normalize(reply).split()[:1] == [normalize(answer)], found


def question_prompt(q: Question) -> str:
    return f"Complete the sentence with its next word.\n\n{q.question}"


def read(
    engine: Engine,
    retriever: Retriever,
    questions: list[Question],
    k: int = 3,
    method: Method = "hybrid",
    max_tokens: int = 16,
) -> dict:
    """Ask the engine's model each question without and with retrieval (greedy); answer and citation
    measures of both (module docstring), and the replies."""  # fmt: skip
    tok, params = engine.tokenizer, SamplingParams(temperature=0.0, max_tokens=max_tokens)
    groundings = []
    for q in questions:
        hits = retriever.search(q.question, k, method)
        ask = [{"role": "user", "content": question_prompt(q)}]
        groundings.append(Grounding(hits, grounded_messages(ask, hits)))
    plain = [tok.encode_chat([{"role": "user", "content": question_prompt(q)}], add_generation_prompt=True)[0]
             for q in questions]  # fmt: skip
    grounded = [tok.encode_chat(g.messages, add_generation_prompt=True)[0] for g in groundings]
    outs = engine.generate(plain + grounded, params)
    replies = [o.text for o in outs[: len(questions)]]
    cited = [g.filter(0, o.text, final=True) for g, o in zip(groundings, outs[len(questions) :], strict=True)]
    answers = {"without": _answers(questions, replies), "with": _answers(questions, cited)}
    answers["with"] |= _citations(questions, groundings, cited)
    rows = zip(questions, replies, cited, strict=True)
    answers["replies"] = [{"id": q.id, "answer": q.answer, "without": a, "with": b} for q, a, b in rows]
    return answers


def _answers(questions: list[Question], replies: list[str]) -> dict:
    scores = [answer_scores(r, q.answer) for q, r in zip(questions, replies, strict=True)]
    n = max(1, len(questions))
    return {"exact_match": sum(e for e, _ in scores) / n, "answer_match": sum(f for _, f in scores) / n}


def _citations(questions: list[Question], groundings: list[Grounding], replies: list[str]) -> dict:
    cited = good = answered = with_markers = 0
    for q, g, r in zip(questions, groundings, replies, strict=True):
        ids = marker_ids(r)
        ok = [relevant(g.hits[i - 1], q) for i in ids]  # the filter guarantees 1 <= i <= len(g.hits)
        cited, good = cited + len(ids), good + sum(ok)
        answered += any(ok)
        with_markers += bool(ids)
    n = max(1, len(questions))
    return {"citation_precision": good / cited if cited else None, "citation_recall": answered / n,
            "replies_with_markers": with_markers / n}  # fmt: skip
