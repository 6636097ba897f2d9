"""Demo data shipped with lmstack: `instructions.jsonl` (English and Chinese instruction set, built by
`python -m lmstack.data.demo.build_instructions`)."""

from pathlib import Path

INSTRUCTIONS = Path(__file__).with_name("instructions.jsonl")
