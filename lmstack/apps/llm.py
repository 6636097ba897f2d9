"""The chat model the applications talk to: the engine's library API (`LLMEngine`), in-process.

RAG answers, the agent loop and the MCP `generate` tool render a conversation with the model's own chat
template, check it against the context, and generate through `LLMEngine.generate` (batched, the same
scheduler and sampler the server uses). Nothing here samples tokens itself.
"""

from __future__ import annotations

from typing import Any

from lmstack.engine import EngineConfig, LLMEngine, SamplingParams
from lmstack.errors import LmstackError, require


class ChatModel:
    def __init__(self, engine: LLMEngine, name: str = ""):
        require(engine.tokenizer is not None, f"{name} has no tokenizer; save the model with its tokenizer files")
        require(
            bool(engine.tokenizer.chat_template),
            f"{name} has no chat template; the applications need a chat (instruct) model",
        )
        self.engine, self.name = engine, name

    @classmethod
    def from_ref(cls, ref: str, device: str = "auto", dtype: str | None = None) -> ChatModel:
        return cls(LLMEngine.from_ref(ref, EngineConfig(device=device, dtype=dtype)), ref)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def context(self) -> int:
        return self.engine.model_cfg.max_seq_len

    def prompt_ids(
        self, messages: list[dict[str, Any]], max_new_tokens: int, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Rendered and tokenized conversation; an error when it leaves no room for `max_new_tokens`."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        ids = self.tokenizer.encode(text)
        if len(ids) + max_new_tokens > self.context:
            raise LmstackError(
                f"the prompt needs {len(ids)} tokens plus {max_new_tokens} for the reply, but {self.name}'s context "
                f"is {self.context} tokens; shorten the question or lower --max-new-tokens"
            )
        return ids

    def try_prompt_ids(self, messages: list[dict[str, Any]], max_new_tokens: int, tools=None) -> list[int] | None:
        """`prompt_ids`, or None when the conversation does not fit."""
        try:
            return self.prompt_ids(messages, max_new_tokens, tools)
        except LmstackError:
            return None

    def complete(self, prompts: list[list[int]], params: SamplingParams) -> list[str]:
        """Generated text for each prompt, in order (one batched engine call)."""
        return [out.outputs[0].text for out in self.engine.generate(prompts, params)]

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams, tools=None) -> str:
        return self.complete([self.prompt_ids(messages, params.max_new_tokens, tools)], params)[0]
