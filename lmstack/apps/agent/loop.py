"""The agent loop: generate, parse tool calls from the chat template's tool syntax, run them, feed back.

Conversations are OpenAI-format messages rendered by the server's tool layer (`lmstack.serve.tools`):
templates that know tools (Qwen2.5-style) render them natively; others (ChatML, e.g. SmolLM2) get the
Hermes `<tool_call>` convention in the system prompt. The same parser reads the calls back, so the agent
and the HTTP server agree on the syntax. Every step is recorded in the trace.

Nothing a model or a tool does ends the loop early with a crash: malformed call JSON, an unknown tool,
bad arguments, a tool that raises or hangs (abandoned after `tool_timeout` seconds) all become an
error message the model sees on its next step. The loop stops at a plain answer or after `max_steps`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmstack.apps.agent.tools import MAX_RESULT_CHARS, Tool, ToolError
from lmstack.apps.llm import ChatModel
from lmstack.engine import SamplingParams
from lmstack.errors import LmstackError, require
from lmstack.serve.protocol import ChatMessage, FunctionCall, FunctionDefinition, ToolCall
from lmstack.serve.protocol import Tool as ToolSpec
from lmstack.serve.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, forced_call_schema, parse_tool_calls, render_messages

SYSTEM = "You are a helpful assistant. Use the tools when they help; when you know the answer, reply with it."
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)


@dataclass
class Step:
    kind: str  # "call", "result", "error", "answer", "stop"
    text: str

    def __str__(self) -> str:
        return f"{self.kind:>6}: {self.text}"


@dataclass
class AgentResult:
    answer: str | None  # None when the step limit was reached without an answer
    trace: list[Step] = field(default_factory=list)
    steps: int = 0
    tool_calls: int = 0


def run_with_timeout(tool: Tool, args: dict[str, Any], timeout: float) -> str:
    """Run a tool on a daemon thread; a hung tool is abandoned after `timeout` seconds."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = tool.run(args)
        except BaseException as exc:  # reported to the model, never raised into the loop
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise ToolError(f"tool {tool.name!r} timed out after {timeout:g} s")
    if "error" in box:
        exc = box["error"]
        raise ToolError(
            str(exc) if isinstance(exc, ToolError) else f"tool {tool.name!r} raised {type(exc).__name__}: {exc}"
        )
    return str(box["value"])


def _malformed_reason(text: str) -> str:
    for block in _BLOCK.findall(text):
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError as exc:
            return f"the call is not valid JSON ({exc.msg} at column {exc.colno})"
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return 'the call needs a string "name" and an "arguments" object'
    return "no tool call was found"


class Agent:
    def __init__(
        self,
        chat: ChatModel,
        tools: list[Tool],
        params: SamplingParams | None = None,
        max_steps: int = 6,
        tool_timeout: float = 10.0,
        tool_choice: str = "auto",
        system: str = SYSTEM,
        on_step: Callable[[Step], None] | None = None,
    ):
        require(max_steps >= 1, f"--max-steps must be at least 1, got {max_steps}")
        require(tool_timeout > 0, f"--tool-timeout must be positive, got {tool_timeout}")
        require(tool_choice in ("auto", "required"), f"tool_choice must be auto or required, got {tool_choice!r}")
        self.chat, self.tools = chat, {t.name: t for t in tools}
        self.params = params or SamplingParams(max_new_tokens=256, temperature=0.0)
        self.max_steps, self.tool_timeout, self.tool_choice = max_steps, tool_timeout, tool_choice
        self.system, self.on_step = system, on_step
        self.specs = [
            ToolSpec(type="function", function=FunctionDefinition(name=t.name, description=t.description,
                                                                  parameters=t.parameters))
            for t in tools
        ]  # fmt: skip

    def _prompt(self, history: list[ChatMessage], choice: str) -> list[int]:
        messages, template_tools = render_messages(
            history, self.specs or None, choice, self.chat.tokenizer.chat_template
        )
        return self.chat.prompt_ids(messages, self.params.max_new_tokens, template_tools)

    def _record(self, result: AgentResult, kind: str, text: str) -> None:
        step = Step(kind, text)
        result.trace.append(step)
        if self.on_step:
            self.on_step(step)

    def run(self, task: str) -> AgentResult:
        require(bool(task and task.strip()), "the task is empty")
        history = [ChatMessage(role="system", content=self.system), ChatMessage(role="user", content=task)]
        result = AgentResult(None)
        for step in range(self.max_steps):
            forced = step == 0 and self.tool_choice == "required" and bool(self.specs)
            choice = "required" if forced else "auto"
            try:
                ids = self._prompt(history, choice)
            except LmstackError as exc:
                if step == 0:
                    raise  # the task itself does not fit the context
                self._record(result, "stop", f"the conversation no longer fits the context ({exc})")
                return result
            params = self.params
            if forced:
                params = dataclasses.replace(params, json_schema=forced_call_schema(self.specs, "required"))
            text = self.chat.complete([ids], params)[0]
            result.steps = step + 1
            content, calls = parse_tool_calls(text, forced=forced)
            if not calls and (forced or TOOL_CALL_OPEN in text):
                reason = "the reply is not a tool call object" if forced else _malformed_reason(text)
                self._record(result, "error", f"malformed tool call: {reason}: {text.strip()[:200]}")
                history.append(ChatMessage(role="assistant", content=text))
                history.append(
                    ChatMessage(
                        role="tool",
                        content=f'error: {reason}. Write <tool_call>{{"name": '
                        'NAME, "arguments": {...}}</tool_call> or answer directly.',
                    )
                )
                continue
            if not calls and not text.strip():  # an empty answer is never accepted silently
                self._record(result, "error", "the reply was empty")
                history.append(ChatMessage(role="assistant", content=text))
                history.append(
                    ChatMessage(role="user", content="Your reply was empty. Answer the task or call a tool.")
                )
                continue
            if not calls:
                result.answer = text.strip()
                self._record(result, "answer", result.answer)
                return result
            tool_calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
            history.append(ChatMessage(role="assistant", content=content, tool_calls=tool_calls))
            for call in calls:
                result.tool_calls += 1
                self._record(result, "call", f"{call.name}({call.arguments})")
                output = self._call(call.name, call.arguments)
                self._record(result, "result" if not output.startswith("error:") else "error", output[:300])
                history.append(ChatMessage(role="tool", content=output, tool_call_id=call.id))
        self._record(result, "stop", f"step limit of {self.max_steps} reached without an answer")
        return result

    def _call(self, name: str, arguments: str) -> str:
        tool = self.tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r}; available tools: {', '.join(self.tools) or 'none'}"
        try:
            args = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return f"error: the arguments of {name} are not valid JSON ({exc.msg})"
        if not isinstance(args, dict):
            return f"error: the arguments of {name} must be a JSON object"
        try:
            output = run_with_timeout(tool, args, self.tool_timeout)
        except ToolError as exc:
            return f"error: {exc}"
        return output if len(output) <= MAX_RESULT_CHARS else output[:MAX_RESULT_CHARS] + "\n[truncated]"
