"""Inference engine: batched generation (paged KV, continuous batching, prefix caching, speculative
decoding, structured output), single-stream generation and terminal chat.

    from lmstack.engine import LLMEngine, EngineConfig, SamplingParams, AsyncEngine
"""

from lmstack.engine.async_engine import AsyncEngine
from lmstack.engine.engine import (
    CompletionOutput,
    EngineConfig,
    EngineStats,
    LLMEngine,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
)
from lmstack.engine.sampling import SamplingParams, TokenLogprob

__all__ = [
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "PromptTooLongError",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
