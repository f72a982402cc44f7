"""Interoperability with other ecosystems (transformers)."""
