"""`lmstack mcp serve` spoken to by the official MCP client over stdio."""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np


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
