"""The shipped example recipe runs from a fresh clone and every planted problem is caught."""

from __future__ import annotations

import json
from pathlib import Path

from lmstack.data.curate.pipeline import load_recipe, run_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "data-example.yaml"


def test_example_recipe_catches_each_planted_problem(tmp_path):
    summary = run_recipe(load_recipe(RECIPE), tmp_path / "out", workers=1, progress=False)
    blocks = {b["name"]: b for b in summary["blocks"]}
    assert blocks["read"]["dropped"] == {"malformed_json": 1}  # forum.jsonl's last line
    assert blocks["dedup"]["dropped"]["exact_duplicate"] >= 1  # note_exact_copy.txt
    assert blocks["dedup"]["dropped"]["near_duplicate"] >= 1  # note_near_copy.txt
    assert blocks["decontaminate"]["dropped"] == {"overlap_eval": 1}  # copied into eval.jsonl
    assert summary["pii"] == {"EMAIL": 1, "IP_ADDRESS": 1, "PHONE": 2}  # note_pii.txt
    assert set(summary["languages"]) == {"en", "zh"}
    written = [json.loads(line) for f in (tmp_path / "out" / "data").glob("*.jsonl") for line in f.open()]
    texts = "\n".join(d["text"] for d in written)
    assert "BUY NOW" not in texts and "maintainer@example.org" not in texts and "<EMAIL>" in texts
    assert "Log in" not in texts  # HTML navigation stripped by the extractor
    assert (tmp_path / "out" / "report.html").stat().st_size > 1000
