"""`lmstack mcp serve` spoken to by the official MCP client over stdio and streamable HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest


async def _session_calls(command: list[str], calls: list[tuple[str, dict]]):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(command=command[0], args=command[1:])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = await session.list_tools()
        results = [await session.call_tool(name, args) for name, args in calls]
    return tools, results


def test_official_client_lists_and_calls_our_tools(demo_index, minilm):
    command = [
        sys.executable,
        "-m",
        "lmstack.cli",
        "mcp",
        "serve",
        "--index",
        str(demo_index),
        "--root",
        str(demo_index.parent),
    ]
    calls = [
        ("embed", {"texts": ["hello world", "西湖龙井"]}),
        ("rag_search", {"query": "Which special database name keeps sqlite3 in RAM?", "k": 2}),
        ("data_stats", {"path": "docs"}),
        ("data_stats", {"path": "../../etc"}),
        ("generate", {"prompt": "hi"}),
    ]
    tools, (embedded, searched, stats, escaped, generated) = asyncio.run(_session_calls(command, calls))
    assert {t.name for t in tools.tools} == {"generate", "embed", "rag_search", "data_stats"}
    vectors = np.array(embedded.structured_content["result"])
    np.testing.assert_allclose(vectors, minilm.embed(["hello world", "西湖龙井"]), atol=1e-5)
    hits = searched.structured_content["result"]
    assert hits[0]["source"].startswith("sqlite3.md") and ":memory:" in hits[0]["text"]
    summary = stats.structured_content
    assert summary["files"] == 13 and summary["cjk_characters"] > 500 and not stats.is_error
    assert escaped.is_error and "outside the directory" in escaped.content[0].text
    assert generated.is_error and "started without --model" in generated.content[0].text
    json.dumps(summary)  # plain JSON all the way through


@pytest.fixture(scope="module")
def http_server(demo_index):
    """`lmstack mcp serve --http PORT` in a child process on a free loopback port; yields its /mcp URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "lmstack.cli", "mcp", "serve", "--http", str(port)]
    command += ["--index", str(demo_index), "--root", str(demo_index.parent)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"the server exited: {server.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not listen within 60 s"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.terminate()
        server.wait(timeout=10)


async def _http_session_calls(url: str, calls: list[tuple[str, dict]]):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = await session.list_tools()
        results = [await session.call_tool(name, args) for name, args in calls]
    return tools, results


def test_official_client_over_streamable_http(http_server, minilm):
    calls = [
        ("data_stats", {"path": "docs"}),
        ("embed", {"texts": ["hello world"]}),
        ("data_stats", {"path": "../../etc"}),
    ]
    tools, (stats, embedded, escaped) = asyncio.run(_http_session_calls(http_server, calls))
    assert {t.name for t in tools.tools} == {"generate", "embed", "rag_search", "data_stats"}
    assert stats.structured_content["files"] == 13 and not stats.is_error
    np.testing.assert_allclose(embedded.structured_content["result"], minilm.embed(["hello world"]), atol=1e-5)
    assert escaped.is_error and "outside the directory" in escaped.content[0].text


def test_agent_uses_an_mcp_server_by_its_http_url(http_server):
    from lmstack.apps.agent.mcp_client import McpServerTools
    from lmstack.apps.agent.tools import ToolError

    server = McpServerTools(http_server, call_timeout=30)
    try:
        tools = {t.name: t for t in server.tools()}
        assert set(tools) == {"generate", "embed", "rag_search", "data_stats"}
        assert json.loads(tools["data_stats"].run({"path": "docs"}))["files"] == 13
        with pytest.raises(ToolError, match="outside the directory"):
            tools["data_stats"].run({"path": "/etc"})
    finally:
        server.close()


def test_unreachable_http_mcp_server_is_a_clear_error():
    from lmstack.apps.agent.mcp_client import McpServerTools
    from lmstack.errors import LmstackError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(LmstackError, match="could not be reached"):
        McpServerTools(f"http://127.0.0.1:{port}/mcp")
