"""Tool (function) calling in OpenAI's format, over the model's own chat-template tool syntax.

A chat template that knows about tools (it reads the `tools` variable, as Qwen2.5's does) renders
them itself. For one that does not (ChatML models such as SmolLM2), the tools are described in the
system prompt in the Hermes format that Qwen2.5 and Hermes models are trained on: calls come back
as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, earlier calls are shown as
such blocks and tool results as `<tool_response>` blocks.

`tool_choice` "required" or a named function constrains decoding to a JSON call object through the
engine's JSON-schema grammar, so even a small model returns a well-formed call to a real function.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from lmstack.serve.protocol import ChatMessage, NamedToolChoice, Tool

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)

HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def template_handles_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tools_active(tools: list[Tool] | None, tool_choice: Any) -> bool:
    return bool(tools) and tool_choice != "none"


def _tool_json(tool: Tool) -> dict[str, Any]:
    return tool.model_dump(exclude_none=True, by_alias=True)


def render_messages(
    messages: list[ChatMessage], tools: list[Tool] | None, tool_choice: Any, template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """OpenAI messages -> (messages for the chat template, `tools` variable for it or None)."""
    active = tools_active(tools, tool_choice)
    native = template_handles_tools(template)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        text = m.text(i)
        role = "system" if m.role == "developer" else m.role
        if native:
            entry: dict[str, Any] = {"role": role, "content": text}
            if m.tool_calls:
                entry["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id:
                entry["tool_call_id"] = m.tool_call_id
            out.append(entry)
        elif m.role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        elif m.tool_calls:
            blocks = [
                f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(c.function.name)}, "arguments": {c.function.arguments}}}\n'
                f"{TOOL_CALL_CLOSE}"
                for c in m.tool_calls
            ]
            out.append({"role": role, "content": "\n".join([text, *blocks] if text else blocks)})
        else:
            out.append({"role": role, "content": text})
    if not active:
        return out, None
    tool_dicts = [_tool_json(t) for t in tools or []]
    if native:
        return out, tool_dicts
    description = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tool_dicts))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{description}"}
    else:
        out.insert(0, {"role": "system", "content": description})
    return out, None


def forced_call_schema(tools: list[Tool], tool_choice: Any) -> dict[str, Any] | None:
    """JSON schema a forced call must match ("required": any tool; named: that one), else None."""
    if not tools_active(tools, tool_choice) or tool_choice == "auto" or tool_choice is None:
        return None

    def call_schema(tool: Tool) -> dict[str, Any]:
        params = tool.function.parameters or {"type": "object"}
        return {
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    if isinstance(tool_choice, NamedToolChoice):
        chosen = next(t for t in tools if t.function.name == tool_choice.function.name)
        return call_schema(chosen)
    return {"anyOf": [call_schema(t) for t in tools]}


def _call_from_json(text: str) -> ParsedCall | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ParsedCall(obj["name"], arguments, new_call_id())


def parse_tool_calls(text: str, forced: bool = False) -> tuple[str | None, list[ParsedCall]]:
    """Split generated text into (content or None, tool calls).

    forced: the text is one JSON call object (constrained decoding). Otherwise calls are the
    `<tool_call>` blocks; if any block is not a valid call, the whole text stays content, so a
    malformed call is visible to the client rather than silently dropped.
    """
    if forced:
        call = _call_from_json(text.strip())
        return (None, [call]) if call else (text, [])
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return text, []
    calls = [_call_from_json(block) for block in _BLOCK.findall(text, start)]
    if not calls or any(c is None for c in calls):
        return text, []
    content = text[:start].strip()
    return content or None, [c for c in calls if c is not None]


class ToolCallStream:
    """Streams content while holding back anything that is, or may become, a tool call."""

    def __init__(self, forced: bool):
        self.forced = forced
        self.text = ""
        self.emitted = 0
        self.in_calls = forced

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_calls:
            return ""
        start = self.text.find(TOOL_CALL_OPEN, self.emitted)
        if start >= 0:
            self.in_calls = True
            safe = start
        else:
            safe = len(self.text)
            for k in range(min(len(TOOL_CALL_OPEN) - 1, safe - self.emitted), 0, -1):
                if self.text.endswith(TOOL_CALL_OPEN[:k]):
                    safe -= k
                    break
        out, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """(content not yet emitted, calls) once generation ended."""
        content, calls = parse_tool_calls(self.text, self.forced)
        if calls:
            return "", calls
        return (content or "")[self.emitted :], []
