"""Tool-calling agents: a loop on the chat engine, built-in tools, and tools from MCP servers. See docs/agents.md."""
