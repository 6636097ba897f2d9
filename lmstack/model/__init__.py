"""Model definitions: the decoder-only Transformer (dense and MoE)."""

from lmstack.model.transformer import KVCache, ModelOutput, Transformer

__all__ = ["KVCache", "ModelOutput", "Transformer"]
