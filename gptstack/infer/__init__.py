"""Inference: the KV cache, sampling, speculative decoding and the engine."""
