"""Inference: the KV cache, sampling and generation loops."""
