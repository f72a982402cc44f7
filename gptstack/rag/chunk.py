"""Documents cut into overlapping chunks that keep their character offsets.

A chunk is a span `[start, end)` of its document's text, so `doc.text[chunk.start:chunk.end] ==
chunk.text` always holds and a citation can point back at the exact characters it came from. Spans are
at most `size` characters; each cut falls at the best boundary in the last half of the window (a blank
line, then a line end, then a sentence end, then any whitespace; a hard cut only inside a word longer
than half a window), and the next chunk starts `overlap` characters earlier, moved forward to the start
of a word. Whitespace at either end of a span is left out of it.

    chunk_spans("First para.\\n\\nSecond one.", size=16, overlap=0)   # [(0, 11), (13, 24)]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"[.!?][\"')\]]*\s"), re.compile(r"\s"))


@dataclass(frozen=True)
class Chunk:
    doc: str  # the document's id
    source: str  # the file it came from (relative to the indexed folder, or the JSONL file and line)
    start: int  # character offset of the span in the document's text
    end: int  # one past its last character
    text: str  # the document's text[start:end]


def _cut(text: str, start: int, size: int) -> int:
    """Where the window text[start:start+size] ends: just after the best boundary in its last half."""
    end = start + size
    if end >= len(text):
        return len(text)
    for pattern in BREAKS:
        found = [m.end() for m in pattern.finditer(text, start + size // 2, end)]
        if found:
            return found[-1]
    return end  # one word longer than half a window: cut inside it


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without its leading and trailing whitespace."""
    piece = text[start:end]
    left = len(piece) - len(piece.lstrip())
    return start + left, start + len(piece.rstrip())


def chunk_spans(text: str, size: int = 800, overlap: int = 100) -> list[tuple[int, int]]:
    """The (start, end) spans of `text`'s chunks, in order; none for a blank text."""
    if size < 16 or not 0 <= overlap < size // 2:
        raise ValueError(f"chunk size must be >= 16 and overlap in [0, size/2), got size {size}, overlap {overlap}")
    spans, start = [], 0
    while start < len(text):
        end = _cut(text, start, size)
        span = _strip(text, start, end)
        if span[1] > span[0]:
            spans.append(span)
        if end >= len(text):
            break
        nxt = max(start + 1, end - overlap)
        word = re.compile(r"\s\S").search(text, nxt - 1, end)  # the next word's first character
        start = word.start() + 1 if overlap and word else end
    return spans


def chunk_document(doc: str, source: str, text: str, size: int = 800, overlap: int = 100) -> list[Chunk]:
    """A document's chunks (see chunk_spans)."""
    return [Chunk(doc, source, s, e, text[s:e]) for s, e in chunk_spans(text, size, overlap)]
