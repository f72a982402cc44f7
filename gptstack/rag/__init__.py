"""Retrieval-augmented generation with citations: chunk documents with their character offsets
(chunk.py), index them for BM25, dense (MiniLM) and hybrid search in a plain-file folder (index.py),
search it (retrieve.py), ground a chat in numbered sources whose `[n]` markers are checked as they
stream (cite.py), and measure all of it against questions with a known answer (evaluate.py)."""
