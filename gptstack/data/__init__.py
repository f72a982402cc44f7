"""The data pipeline: sources → extract → filter → PII → dedup → tokenize → shards, and the loader."""
