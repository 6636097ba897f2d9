"""Data: curation pipeline (curate/), tokenization to shards (tokenize.py)."""
