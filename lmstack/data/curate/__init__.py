"""Data curation: raw sources -> clean, deduplicated, mixed training corpus (datatrove's model).

A pipeline is a list of blocks over a stream of `Document(text, id, metadata)`. Every block counts
what it saw and kept, and every drop carries a reason, so the report can say what was removed and why.
`pipeline.prepare(recipe, out)` runs a recipe; the blocks are importable on their own.
"""
