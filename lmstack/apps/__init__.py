"""Applications on top of the models and the engine: embeddings, RAG, tool-using agents, MCP."""
