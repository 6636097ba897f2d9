"""Demo data shipped with lmstack: `instructions.jsonl` (English and Chinese instruction set, built by
`python -m lmstack.data.demo.build_instructions`), `preferences.jsonl` (prompt/chosen/rejected pairs)
and `arithmetic.jsonl` (the GRPO task), both built by `python -m lmstack.data.demo.build_alignment`."""

from pathlib import Path

INSTRUCTIONS = Path(__file__).with_name("instructions.jsonl")
PREFERENCES = Path(__file__).with_name("preferences.jsonl")
ARITHMETIC = Path(__file__).with_name("arithmetic.jsonl")
ARITHMETIC_EASY = Path(__file__).with_name("arithmetic_easy.jsonl")
