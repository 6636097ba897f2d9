"""Inference engine: generation with a KV cache, sampling, terminal chat."""
