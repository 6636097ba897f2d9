"""Retrieval-augmented generation: load documents, chunk, embed, index (Chroma + BM25), retrieve, answer.

    lmstack rag index --docs DIR --index DIR
    lmstack rag ask --index DIR --model smollm2-135m-instruct "question"
    lmstack rag eval --index DIR --qa qa.jsonl

See docs/rag.md.
"""
