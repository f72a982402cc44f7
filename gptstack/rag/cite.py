"""Grounding a chat in numbered sources, and the guarantee that its `[n]` markers name real ones.

    g = ground(retriever, messages, k=4, method="hybrid")   # the k best chunks, numbered 1..k
    engine_messages = g.messages                            # the last user turn now carries the sources
    text = g.filters[0].feed(piece) … + g.filters[0].flush()  # what may be shown, as it streams
    g.citations()                                           # [{"id": 1, "document", "source", "start", "end", "text"}]

The sources are numbered once, before a token is generated, so the ids a stream shows and the final
answer's `citations` list are the same list. The system message asks for `[n]` markers; the model is free
to write any, so markers are checked after decoding, in the stream (post-filtering, not constrained
decoding): a marker is `[3]` or a list `[1, 3]`, ids that are not sources (0, or over k) are removed, and a
marker left with none is removed whole. A `CitationFilter` holds back a tail that could still become a
marker (a run of `[`, digits, commas, spaces and `]` from its first `[`) until it is decided, and removes
until no invalid marker remains (a removal can join its neighbours into a new one: `[1[9]2]` → `[12]` →
``), so no prefix of the stream, nor the whole, ever contains an id that is not a source; feeding a text
in any pieces gives the same output as feeding it whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gptstack.rag.retrieve import Hit, Method, Retriever

MARKER = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]")  # [3], [1, 3], [ 2 ]
PENDING = re.compile(r"\[[\[\]\d,\s]*\Z")  # a tail that could still become (part of) a marker
SYSTEM = (
    "Answer the question using the numbered sources. Cite the source of each fact with its number in "
    "brackets, like [1]. Keep the answer short. If the sources do not contain the answer, say so."
)


def marker_ids(text: str) -> list[int]:
    """The source ids the markers of `text` cite, each once, in order of first citation."""
    ids: list[int] = []
    for m in MARKER.finditer(text):
        ids += [i for i in map(int, m.group(1).split(",")) if i not in ids]
    return ids


def clean(text: str, n_sources: int) -> str:
    """`text` with every id outside 1..n_sources taken out of its marker (an emptied marker goes whole),
    repeated until no marker holds one."""

    def keep(m: re.Match) -> str:
        ids = [int(i) for i in m.group(1).split(",")]
        valid = [str(i) for i in ids if 1 <= i <= n_sources]
        return m.group(0) if len(valid) == len(ids) else (f"[{', '.join(valid)}]" if valid else "")

    while (out := MARKER.sub(keep, text)) != text:
        text = out
    return text


@dataclass
class CitationFilter:
    """Streamed text in, text with only real source ids out (module docstring)."""

    n_sources: int
    held: str = ""

    def feed(self, piece: str) -> str:
        """What of `held + piece` can be shown now; a possible marker's tail stays held."""
        text = clean(self.held + piece, self.n_sources)
        tail = PENDING.search(text)
        cut = tail.start() if tail else len(text)
        self.held = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        """The held tail at the end of the stream (no marker can grow any more)."""
        out, self.held = clean(self.held, self.n_sources), ""
        return out


def sources_block(hits: list[Hit]) -> str:
    """The sources as the model reads them: `[n] (document) text`, one paragraph each."""
    return "\n\n".join(f"[{h.rank}] ({h.chunk.doc}) {h.chunk.text}" for h in hits)


def grounded_messages(messages: list[dict[str, str]], hits: list[Hit]) -> list[dict[str, str]]:
    """The conversation with the citation instruction in the system message (before any system text of
    the user's) and the sources in front of the last user message."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{SYSTEM}\n\n{out[0]['content']}"
    else:
        out.insert(0, {"role": "system", "content": SYSTEM})
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last]["content"] = f"Sources:\n\n{sources_block(hits)}\n\nQuestion: {out[last]['content']}"
    return out


@dataclass
class Grounding:
    """One request's sources (numbered by rank), its grounded messages and a filter per choice."""

    hits: list[Hit]
    messages: list[dict[str, str]]
    filters: dict[int, CitationFilter] = field(default_factory=dict)

    def filter(self, choice: int, piece: str, final: bool) -> str:
        """What choice `choice` may show of `piece` (the held tail too when `final`)."""
        f = self.filters.setdefault(choice, CitationFilter(len(self.hits)))
        return f.feed(piece) + (f.flush() if final else "")

    def citations(self) -> list[dict]:
        """The numbered sources: id (the `[n]` of the markers), document id, source, character span, text."""
        return [
            {"id": h.rank, "document": h.chunk.doc, "source": h.chunk.source, "start": h.chunk.start,
             "end": h.chunk.end, "text": h.chunk.text, "score": round(h.score, 6)}
            for h in self.hits
        ]  # fmt: skip


def ground(retriever: Retriever, messages: list[dict[str, str]], k: int = 4, method: Method = "hybrid") -> Grounding:
    """Retrieve for the last user message and ground the conversation in what was found."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise ValueError("retrieval needs a non-empty user message to search for")
    hits = retriever.search(users[-1], k, method)
    return Grounding(hits, grounded_messages(messages, hits) if hits else [dict(m) for m in messages])
