"""The agent loop and its tools: calls parsed from the template's syntax, errors fed back, limits, MCP tools."""

from __future__ import annotations

import http.server
import sys
import textwrap
import threading
import time

import pytest

from lmstack.apps.agent.loop import Agent
from lmstack.apps.agent.tools import Tool, ToolError, build_tools, calculate, file_tool, http_tool
from lmstack.apps.llm import ChatModel
from lmstack.engine import SamplingParams
from lmstack.errors import LmstackError


class ScriptedChat(ChatModel):
    """The real tiny chat model's template and context, with replies taken from a script.

    The agent's own logic (parsing, tool dispatch, error feedback, limits) is what is under test; each
    prompt the loop renders is kept so tests can check what the model would have seen.
    """

    def __init__(self, ref: str, replies: list[str]):
        base = ChatModel.from_ref(ref, device="cpu")
        super().__init__(base.engine, ref)
        self.replies, self.prompts = list(replies), []

    def complete(self, prompts, params):
        self.prompts.append(self.tokenizer.decode(prompts[0]))
        return [self.replies.pop(0)]


def make_agent(chat: ChatModel, tools: list[Tool], **kwargs) -> Agent:
    """Short replies: the tiny tokenizer spends many tokens on the tool descriptions of a 512-token context."""
    return Agent(chat, tools, SamplingParams(max_new_tokens=16, temperature=0), **kwargs)


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_calculator_is_exact_and_refuses_code():
    assert calculate("(17 + 25) * 3") == 126
    assert calculate("2 ^ 10") == 1024 and calculate("sqrt(16) + 10 % 4") == 6.0
    assert calculate("1234 × 5678") == 7006652
    for bad, message in [
        ("__import__('os').system('true')", "unsupported element"),
        ("(1).__class__", "unsupported element"),
        ("9 ** 9 ** 9", "too large"),
        ("1 / 0", "division by zero"),
        ("2 +", "cannot parse"),
    ]:
        with pytest.raises(ToolError, match=message):
            calculate(bad)


def test_agent_calls_a_tool_feeds_the_result_back_and_answers(tiny_chat_model):
    chat = ScriptedChat(tiny_chat_model, [call("calculator", '{"expression": "37 * 48"}'), "It costs 1776 cents."])
    steps = []
    result = make_agent(chat, build_tools("calculator"), on_step=steps.append).run("37 pencils at 48 cents?")
    assert result.answer == "It costs 1776 cents." and result.tool_calls == 1 and result.steps == 2
    assert [s.kind for s in result.trace] == ["call", "result", "answer"] and steps == result.trace
    assert "<tools>" in chat.prompts[0] and '"name": "calculator"' in chat.prompts[0]  # Hermes tool syntax
    assert "<tool_response>\n1776\n</tool_response>" in chat.prompts[1]  # the result reached the model


def test_malformed_calls_unknown_tools_and_bad_arguments_go_back_to_the_model(tiny_chat_model):
    replies = [
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"</tool_call>',  # cut JSON
        call("weather", '{"city": "Paris"}'),
        call("calculator", "[1, 2]"),
        call("calculator", '{"expression": "import os"}'),
        "I give up.",
    ]
    chat = ScriptedChat(tiny_chat_model, replies)
    result = make_agent(chat, build_tools("calculator"), max_steps=6).run("add one and one")
    assert result.answer == "I give up."
    errors = [s.text for s in result.trace if s.kind == "error"]
    assert "not valid JSON" in errors[0]
    assert "unknown tool 'weather'; available tools: calculator" in errors[1]
    assert "must be a JSON object" in errors[2]
    assert "cannot parse" in errors[3]
    assert "unknown tool 'weather'" in chat.prompts[2]  # each error is in the next prompt


def test_a_tool_that_raises_or_hangs_becomes_an_error_and_the_loop_goes_on(tiny_chat_model):
    def boom(args):
        raise RuntimeError("disk on fire")

    def hang(args):
        time.sleep(30)
        return "too late"

    tools = [
        Tool("boom", "fails", {"type": "object", "properties": {}}, boom),
        Tool("hang", "hangs", {"type": "object", "properties": {}}, hang),
    ]
    chat = ScriptedChat(tiny_chat_model, [call("boom", "{}"), call("hang", "{}"), "done"])
    start = time.monotonic()
    result = make_agent(chat, tools, tool_timeout=0.5).run("try the tools")
    assert time.monotonic() - start < 10 and result.answer == "done"
    errors = [s.text for s in result.trace if s.kind == "error"]
    assert "raised RuntimeError: disk on fire" in errors[0] and "timed out after 0.5 s" in errors[1]


def test_sandboxed_python_errors_and_kills_go_back_to_the_model(tiny_chat_model):
    replies = [
        call("run_python", '{"code": "import socket\\nsocket.create_connection((\\"127.0.0.1\\", 80))"}'),
        call("run_python", '{"code": "while True: pass"}'),
        call("run_python", '{"code": "print(sum(i * i for i in range(10)))"}'),
        "The sum of squares is 285.",
    ]
    chat = ScriptedChat(tiny_chat_model, replies)
    result = make_agent(chat, build_tools("python", tool_timeout=2.5), tool_timeout=2.5).run("sum of squares?")
    assert result.answer == "The sum of squares is 285." and result.tool_calls == 3
    outputs = [s.text for s in result.trace if s.kind == "result"]  # the trace shows 300 characters
    assert "Network is unreachable\n[exit status 1]" in chat.prompts[1]  # the whole result reached the model
    assert "[killed: the code ran longer than 1.5 s]" in outputs[1] and outputs[2] == "285"
    assert "<tool_response>\n285\n</tool_response>" in chat.prompts[3]


def test_step_limit_stops_a_model_that_never_answers(tiny_chat_model):
    chat = ScriptedChat(tiny_chat_model, [call("calculator", '{"expression": "1"}')] * 3)
    result = make_agent(chat, build_tools("calculator"), max_steps=3).run("loop forever")
    assert result.answer is None and result.steps == 3
    assert result.trace[-1].kind == "stop" and "step limit of 3" in result.trace[-1].text


def test_task_longer_than_the_context_is_an_error(tiny_chat_model):
    chat = ScriptedChat(tiny_chat_model, [])
    with pytest.raises(LmstackError, match="context is 2048 tokens"):
        make_agent(chat, build_tools("calculator")).run("word " * 2500)


def test_file_reader_stays_inside_its_directory(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "notes.txt").write_text("the code is 4711")
    (tmp_path / "secret.txt").write_text("do not read")
    (tmp_path / "shared" / "link.txt").symlink_to(tmp_path / "secret.txt")
    tool = file_tool(tmp_path / "shared")
    assert tool.run({"path": "notes.txt"}) == "the code is 4711"
    for path in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt"):
        with pytest.raises(ToolError, match="outside the readable directory"):
            tool.run({"path": path})
    with pytest.raises(ToolError, match="files: notes.txt"):
        tool.run({"path": "missing.txt"})


def test_http_fetch_only_reaches_allowed_hosts():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html><body><h1>Hello</h1><p>from the test server</p></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        tool = http_tool([f"127.0.0.1:{port}"])
        assert tool.run({"url": f"http://127.0.0.1:{port}/page"}) == "# Hello\n\nfrom the test server"
        with pytest.raises(ToolError, match="not on the allow-list"):
            tool.run({"url": f"http://localhost:{port}/page"})
        with pytest.raises(ToolError, match="only http and https"):
            tool.run({"url": "file:///etc/passwd"})
    finally:
        server.shutdown()


def test_unknown_tool_spec_is_a_clear_error(capsys):
    with pytest.raises(LmstackError, match="unknown tool 'shell'"):
        build_tools("calculator,shell")
    with pytest.raises(LmstackError, match="does not exist"):
        build_tools("files:/no/such/dir")


MCP_SERVER = textwrap.dedent(
    """
    import time
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer("test-tools")

    @server.tool()
    def reverse_text(text: str) -> str:
        '''Reverse a string.'''
        return text[::-1]

    @server.tool()
    def fail(reason: str) -> str:
        '''Always fails.'''
        raise ToolError(reason)

    @server.tool()
    def slow() -> str:
        '''Never returns in time.'''
        time.sleep(30)
        return "late"

    server.run("stdio")
    """
)


def test_agent_uses_tools_from_an_mcp_server(tiny_chat_model, tmp_path):
    from lmstack.apps.agent.mcp_client import McpServerTools

    script = tmp_path / "server.py"
    script.write_text(MCP_SERVER)
    server = McpServerTools(f"{sys.executable} {script}", call_timeout=2)
    try:
        tools = server.tools()
        assert {t.name for t in tools} == {"reverse_text", "fail", "slow"}
        replies = [
            call("reverse_text", '{"text": "stressed"}'),
            call("fail", '{"reason": "no luck"}'),
            call("slow", "{}"),
            "desserts",
        ]
        chat = ScriptedChat(tiny_chat_model, replies)
        result = make_agent(chat, tools, tool_timeout=10).run("reverse 'stressed'")
        kinds = [(s.kind, s.text) for s in result.trace]
        assert ("result", "desserts") in kinds
        errors = [text for kind, text in kinds if kind == "error"]
        assert "no luck" in errors[0] and "timed out" in errors[1]
        assert result.answer == "desserts"
    finally:
        server.close()


def test_mcp_server_that_does_not_start_is_a_clear_error():
    from lmstack.apps.agent.mcp_client import McpServerTools

    with pytest.raises(LmstackError, match="did not start"):
        McpServerTools(f"{sys.executable} -c 'import sys; sys.exit(3)'")


def test_agent_cli_runs_a_task_and_scores_a_task_set(tiny_chat_model, tmp_path, capsys):
    from lmstack.cli import main

    base = ["agent", "--model", tiny_chat_model, "--tools", "calculator", "--max-new-tokens", "4", "--max-steps", "2"]
    assert main([*base, "What is 2 + 2?"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and ("answer:" in captured.err or "stop:" in captured.err)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"task": "What is 2 + 2?", "answer": "4"}\n{"task": "What is 3 * 3?", "answer": "9"}\n')
    assert main([*base, "--eval", str(tasks)]) == 0
    table = capsys.readouterr().out
    assert "| without tools |" in table and "| with tools |" in table and "/2 |" in table
    assert main([*base, "--eval", str(tasks), "also a task"]) == 2
    assert "not both" in capsys.readouterr().err


def test_calculator_schema_makes_constrained_decoding_write_arithmetic():
    """Under --tool-choice required decoding follows the schema; an empty expression must not be allowed."""
    import re

    from lmstack.apps.agent.tools import EXPRESSION_SCHEMA

    pattern = re.compile(EXPRESSION_SCHEMA["pattern"])
    for good in ("1234 * 5678", "(17 + 25) * 3", "sqrt(2) / 2", "-3 ** 2", "2^10"):
        assert pattern.fullmatch(good) and calculate(good) is not None
    for bad in ("", " ", "x = 1", "1234 * 5678'; x"):
        assert not pattern.fullmatch(bad)
