"""The whole curation run: every reader, bad input, end to end to token shards, resume after a crash,
mixing, decontamination and recipe errors."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import yaml

from lmstack.data.curate.document import BlockStats
from lmstack.data.curate.pipeline import load_recipe, parse_recipe, prepare, run_recipe
from lmstack.data.curate.readers import ReadTask, SourceConfig, make_tasks, read_task
from lmstack.errors import LmstackError

PROSE = [
    "The river town grew slowly over the nineteenth century, and its people learned to live with the floods. "
    "Every spring the water rose to the steps of the church, and the farmers moved their animals to the hills.",
    "Merchants built their houses on stone foundations that have lasted to this day, and the market square "
    "still has the old well where travellers stopped to water their horses before the long climb.",
    "When the railway arrived in 1871, the town became a market for the whole valley. The station master "
    "kept a diary of every train, and his notes are now in the museum next to the old warehouses.",
    "Today the old warehouses hold a museum, a library and a school for young musicians, and visitors come in "
    "the summer to walk along the embankment and to watch the boats pass by in the evening light.",
]
ZH = (
    "我们的城市在河边慢慢地发展起来了。每年春天，河水都会上涨，农民们就把牲畜赶到山上去。"
    "商人们在石头的地基上建造了他们的房子。"
)


WORDS = sorted({w.strip(".,").lower() for p in PROSE for w in p.split()})


def doc_text(i: int) -> str:
    """Distinct documents (far from near-duplicates of each other): a prose paragraph, a sentence of
    seeded random words, and a numbered closing sentence."""
    filler = " ".join(random.Random(i).choices(WORDS, k=40)).capitalize()
    return f"{PROSE[i % 4]} {filler}. This is note number {i} about the town, written on day {i * 7}."


def write_sources(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text(doc_text(0) + "\nContact: archivist@example.org or +1 415-555-0132.")
    (root / "readme.md").write_text(doc_text(1))
    with open(root / "web.jsonl", "w") as f:
        for i in range(2, 8):
            f.write(json.dumps({"content": doc_text(i), "uid": f"w{i}"}) + "\n")
        f.write(json.dumps({"content": doc_text(2), "uid": "exact-copy"}) + "\n")
        f.write("{not json\n")
    (root / "bad.jsonl").write_bytes(b'{"content": "caf\xe9"}\n')
    (root / "items.json").write_text(json.dumps([{"content": doc_text(8)}, {"content": doc_text(9)}]))
    (root / "table.csv").write_text("content,other\n" + f'"{doc_text(10)}",x\n')
    pq.write_table(pa.table({"content": [doc_text(11), doc_text(12)]}), root / "data.parquet")
    body = "".join(f"<p>{s}.</p>" for s in doc_text(13).split(". "))
    (root / "page.html").write_text(f"<html><body><nav>Home</nav><article>{body}</article></body></html>")
    (root / "empty.txt").write_text("")


def write_hf_dataset(path: Path, texts: list[str]) -> None:
    """The on-disk layout of `datasets.Dataset.save_to_disk`: an arrow stream file plus state.json."""
    import pyarrow as pa

    path.mkdir(parents=True)
    table = pa.table({"content": texts})
    with (
        pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (path / "dataset_info.json").write_text("{}")


def write_warc(path: Path, html_pages: list[tuple[str, str]]) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, html in html_pages:
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=io.BytesIO(html.encode()), http_headers=headers)
            writer.write_record(record)


def read_all(source: SourceConfig, base: Path) -> tuple[list, BlockStats]:
    stats = BlockStats("read")
    docs = [d for task in make_tasks(0, source, base) for d in read_task(task, stats)]
    return docs, stats


# --- Readers ---


def test_every_reader_and_bad_input_is_counted_with_file_and_line(tmp_path):
    write_sources(tmp_path / "raw")
    docs, stats = read_all(SourceConfig(name="raw", paths=["raw"], text_field="content", id_field="uid"), tmp_path)
    texts = [d.text for d in docs]
    for i in range(14):
        assert any(f"note number {i} " in t for t in texts), i
    assert stats.dropped == {"malformed_json": 1, "undecodable_bytes": 1, "empty_text": 1}
    assert any("web.jsonl:8: malformed JSON" in e for e in stats.errors)
    assert any("bad.jsonl:1: undecodable bytes" in e for e in stats.errors)
    html = next(d for d in docs if d.metadata.get("format") == "html")
    assert "<article>" in html.text  # extraction is a pipeline block, not the reader's job
    assert {d.id for d in docs if d.metadata["file"].endswith("web.jsonl")} >= {"w2", "exact-copy"}


def test_missing_text_field_is_reported_not_fatal(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    docs, stats = read_all(SourceConfig(name="a", paths=["a.jsonl"]), tmp_path)
    assert docs == [] and stats.dropped == {"missing_text_field": 1}
    assert "a.jsonl:1: no string field 'text' (fields: body)" in stats.errors[0]


def test_record_fields_survive_curation_in_metadata(tmp_path):
    """Labels and provenance of jsonl/json/csv/parquet records reach the curated output's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [{"content": doc_text(i), "uid": f"u{i}", "label": i % 3, "tags": ["a", str(i)]} for i in range(4)]
    rows[0]["source"] = "crawl-2024"  # collides with lmstack's own `source` key: kept as record_source
    (raw / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (raw / "b.csv").write_text(f'content,uid,label\n"{doc_text(5)}",u5,2\n')
    table = pa.table(
        {"content": [doc_text(6)], "uid": ["u6"], "when": pa.array([1_700_000_000_000], pa.timestamp("ms"))}
    )
    pq.write_table(table, raw / "c.parquet")
    values = {
        "sources": [{"name": "raw", "paths": ["raw"], "text_field": "content", "id_field": "uid"}],
        "pipeline": [],
    }
    run_recipe(parse_recipe(values, tmp_path), tmp_path / "out", workers=1, progress=False)
    out = [json.loads(line) for f in sorted((tmp_path / "out" / "data").glob("*.jsonl")) for line in f.open()]
    meta = {r["id"]: r["metadata"] for r in out}
    assert meta["u0"]["label"] == 0 and meta["u0"]["tags"] == ["a", "0"]
    assert meta["u0"]["record_source"] == "crawl-2024" and meta["u0"]["source"] == "raw"
    assert meta["u1"]["label"] == 1 and "uid" not in meta["u1"] and "content" not in meta["u1"]
    assert meta["u5"]["label"] == "2"  # csv values are strings
    assert meta["u6"]["when"].startswith("2023-11-14")


def test_hf_saved_dataset_and_warc_readers(tmp_path):
    write_hf_dataset(tmp_path / "hf", [doc_text(20), doc_text(21)])
    docs, _ = read_all(SourceConfig(name="hf", paths=["hf"], text_field="content"), tmp_path)
    assert [d.text for d in docs] == [doc_text(20), doc_text(21)]
    write_warc(tmp_path / "crawl.warc.gz", [("http://127.0.0.1/a", "<html><body><p>Hello</p></body></html>")])
    docs, _ = read_all(SourceConfig(name="warc", paths=["crawl.warc.gz"]), tmp_path)
    assert docs[0].metadata == {
        "file": str(tmp_path / "crawl.warc.gz"),
        "url": "http://127.0.0.1/a",
        "format": "html",
        "source": "warc",
    }


# --- End to end ---


def make_recipe(tmp_path: Path, **extra) -> Path:
    write_sources(tmp_path / "raw")
    write_hf_dataset(tmp_path / "hf", [doc_text(20), doc_text(21), ZH * 3])
    recipe = {
        "sources": [
            {"name": "raw", "paths": ["raw"], "text_field": "content"},
            {"name": "hf", "paths": ["hf"], "text_field": "content"},
        ],
        "pipeline": [
            "normalize",
            {"language": {"languages": ["en", "zh"], "min_score": 0.5}},
            {"length": {"min_chars": 100}},
            "fineweb",
            "pii",
        ],
        "dedup": {"threshold": 0.0},
        **extra,
    }
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def test_end_to_end_mixed_sources_to_token_shards(tmp_path, tokenizer_dir):
    recipe = make_recipe(tmp_path, output={"tokenizer": str(tokenizer_dir), "val_fraction": 0.2})
    out = tmp_path / "out"
    summary = prepare(str(recipe), str(out), workers=1)
    assert summary["documents_read"] == 18
    written = [json.loads(line) for f in summary["files"] for line in (out / f).read_text().splitlines()]
    texts = [r["text"] for r in written]
    assert sum("note number 2 " in t for t in texts) == 1  # the exact copy is gone
    assert any("<EMAIL>" in t and "<PHONE>" in t for t in texts)
    assert any(r["metadata"]["language"] == "zh" for r in written)
    blocks = {b["name"]: b for b in summary["blocks"]}
    assert blocks["dedup"]["dropped"] == {"exact_duplicate": 1}
    assert blocks["read"]["dropped"]["malformed_json"] == 1
    assert summary["pii"] == {"EMAIL": 1, "PHONE": 1}
    html = next(t for t in texts if "note number 13 " in t)
    assert "<article>" not in html and "Home" not in html
    meta = json.loads((out / "tokens" / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] > 0
    report = (out / "report.html").read_text()
    assert "malformed JSON" in report and "exact_duplicate" in report and "EMAIL" in report
    for plot in ("lengths", "languages", "funnel"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000


def test_resume_after_crash_skips_finished_shards(tmp_path, monkeypatch):
    recipe_path = make_recipe(tmp_path)
    clean = prepare(str(recipe_path), str(tmp_path / "clean"), workers=1)

    from lmstack.data.curate import pipeline

    real = pipeline.process_task
    calls: list[str] = []

    def crash_on_hf(ctx, task):
        calls.append(task.task_id)
        if task.source == "hf":
            raise RuntimeError("simulated crash")
        return real(ctx, task)

    monkeypatch.setattr(pipeline, "process_task", crash_on_hf)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(str(recipe_path), str(out), workers=1)
    done = sorted(p.name for p in (out / "work" / "stage1").glob("*.json"))
    assert len(done) == len(calls) - 1 and not any("hf" in name for name in done)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "work" / "stage1").glob("*.json")}

    calls.clear()
    monkeypatch.setattr(pipeline, "process_task", lambda ctx, task: calls.append(task.task_id) or real(ctx, task))
    resumed = prepare(str(recipe_path), str(out), workers=1)
    assert calls == ["01-hf-00000"]  # only the shard that crashed ran again
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    texts = lambda s, root: sorted(r for f in s["files"] for r in (root / f).read_text().splitlines())  # noqa: E731
    assert texts(resumed, out) == texts(clean, tmp_path / "clean")


def test_parallel_workers_give_the_same_corpus(tmp_path):
    recipe_path = make_recipe(tmp_path)
    one = prepare(str(recipe_path), str(tmp_path / "one"), workers=1)
    two = prepare(str(recipe_path), str(tmp_path / "two"), workers=2)
    assert one["files"] == two["files"]

    def records(out: Path) -> list[str]:
        return sorted(line for f in one["files"] for line in (out / f).read_text().splitlines())

    written = records(tmp_path / "one")
    assert len(written) == one["documents_written"] > 0
    assert records(tmp_path / "two") == written


def test_mixing_up_and_down_sampling_is_deterministic(tmp_path):
    recipe_path = make_recipe(tmp_path, mix={"seed": 3})
    values = yaml.safe_load(recipe_path.read_text())
    values["sources"][1]["target_tokens"] = 2000  # hf holds about 400: upsampled about 5x
    values["sources"][0]["weight"] = 1.0
    values["mix"]["total_tokens"] = 300  # raw holds about 1700 after curation: downsampled
    recipe = parse_recipe(values, tmp_path)
    a = run_recipe(recipe, tmp_path / "a", workers=1)
    b = run_recipe(recipe, tmp_path / "b", workers=1)
    assert a["sources"] == b["sources"]
    hf, raw = a["sources"]["hf"], a["sources"]["raw"]
    assert hf["ratio"] > 3 and hf["written"] > hf["curated"] and 1400 <= hf["tokens"] <= 2800
    assert raw["ratio"] < 0.5 and raw["written"] < raw["curated"]
    mix = next(x for x in a["blocks"] if x["name"] == "mix")
    assert mix["dropped"]["downsampled"] > 0 and mix["edits"]["extra_copies"] > 0


def test_decontamination_drops_documents_sharing_13_grams(tmp_path):
    evals = tmp_path / "evalset.jsonl"
    evals.write_text(
        json.dumps(
            {
                "question": "Which year did the railway arrive in the river town, and what "
                "became of the station master's diary of every train?",
                "answer": "When the railway arrived in 1871, the town became a market for the whole valley.",
            }
        )
        + "\n"
    )
    recipe_path = make_recipe(tmp_path)
    values = yaml.safe_load(recipe_path.read_text())
    values["pipeline"].append({"decontaminate": {"eval_sets": ["evalset.jsonl"]}})
    summary = run_recipe(parse_recipe(values, tmp_path), tmp_path / "out", workers=1)
    block = next(b for b in summary["blocks"] if b["name"] == "decontaminate")
    assert block["dropped"] == {"overlap_evalset": 4}  # the four documents built on PROSE[2]


# --- Recipe and user errors ---


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"sourcse": []}, "unknown config key 'recipe.sourcse'; did you mean 'sources'"),
        ({"pipeline": ["fineweeb"]}, "unknown block 'pipeline[0].fineweeb'; did you mean 'fineweb'"),
        ({"pipeline": [{"fineweb": {"line_punct": 0.1}}]}, "did you mean 'line_punct_thr'"),
        ({"dedup": {"bands": 0}}, "dedup.bands"),
        ({"sources": [{"name": "x", "paths": ["nope"]}]}, "does not exist"),
        ({"sources": [{"name": "x", "paths": ["raw"], "colour": 1}]}, "sources[0].colour"),
    ],
)
def test_recipe_errors_name_the_problem(tmp_path, patch, message):
    recipe_path = make_recipe(tmp_path)
    values = {**yaml.safe_load(recipe_path.read_text()), **patch}
    recipe_path.write_text(yaml.safe_dump(values))
    with pytest.raises(LmstackError) as err:
        prepare(str(recipe_path), str(tmp_path / "out"), workers=1)
    assert message in str(err.value)


def test_overrides_and_a_changed_recipe_in_the_same_out_dir(tmp_path):
    recipe_path = make_recipe(tmp_path)
    assert load_recipe(recipe_path, ["dedup.threshold=0.8"]).dedup.threshold == 0.8
    prepare(str(recipe_path), str(tmp_path / "out"), workers=1)
    with pytest.raises(LmstackError, match="different recipe"):
        prepare(str(recipe_path), str(tmp_path / "out"), workers=1, overrides=["dedup.threshold=0.8"])


def test_all_sources_empty_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "r.yaml").write_text("sources:\n  - name: e\n    paths: [empty.txt]\n")
    with pytest.raises(LmstackError, match="no documents could be read from any source"):
        prepare(str(tmp_path / "r.yaml"), str(tmp_path / "out"), workers=1)


def test_web_source_in_a_recipe(tmp_path):
    """A `type: web` source whose URL times out: the run continues and the report lists the failure."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts connections, never answers: every request times out
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/page.html"
    write_sources(tmp_path / "raw")
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "sources": [
                    {"name": "raw", "paths": ["raw/notes.txt"]},
                    {
                        "name": "site",
                        "web": {"urls": [url], "timeout": 0.2, "retries": 0, "respect_robots": False},
                    },
                ],
                "pipeline": ["normalize"],
            }
        )
    )
    summary = prepare(str(tmp_path / "r.yaml"), str(tmp_path / "out"), workers=1)
    listener.close()
    collect_block = next(b for b in summary["blocks"] if b["name"] == "collect:site")
    assert collect_block["dropped"] == {"fetch_failed": 1}
    assert collect_block["errors"] == [f"{url}: fetch failed: timed out"]
    assert "source 'site' produced no documents" in summary["warnings"]
    assert summary["documents_written"] == 1


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path):
    pytest.importorskip("ray")
    recipe_path = make_recipe(tmp_path, executor={"kind": "ray"})
    ray_run = prepare(str(recipe_path), str(tmp_path / "ray"), workers=2)
    values = yaml.safe_load(recipe_path.read_text())
    values.pop("executor")
    local = run_recipe(parse_recipe(values, tmp_path), tmp_path / "local", workers=1)
    assert ray_run["documents_written"] == local["documents_written"] and ray_run["files"] == local["files"]


def test_read_task_ids_are_stable(tmp_path):
    write_sources(tmp_path / "raw")
    tasks = make_tasks(3, SourceConfig(name="raw", paths=["raw"], text_field="content"), tmp_path)
    assert tasks == make_tasks(3, SourceConfig(name="raw", paths=["raw"], text_field="content"), tmp_path)
    assert tasks[0] == ReadTask("03-raw-00000", "raw", "jsonl", str(tmp_path / "raw" / "bad.jsonl"), "content")


def test_one_big_jsonl_file_is_shared_by_workers(tmp_path):
    """A single large jsonl input is cut into line-aligned byte ranges: two workers both get work, and the
    corpus equals the one-task run; bad lines are still reported with their line number in the file."""
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps({"content": doc_text(i), "uid": f"u{i}"}) for i in range(60)]
    lines[45] = "{broken"
    (raw / "big.jsonl").write_text("\n".join(lines) + "\n")
    source = {"name": "raw", "paths": ["raw"], "text_field": "content", "id_field": "uid"}
    split = parse_recipe({"sources": [{**source, "split_bytes": 4000}], "pipeline": []}, tmp_path)
    whole = parse_recipe({"sources": [{**source, "split_bytes": 0}], "pipeline": []}, tmp_path)
    tasks = make_tasks(0, split.sources[0], tmp_path)
    assert len(tasks) > 4 and tasks[0].start == 0 and tasks[-1].end == (raw / "big.jsonl").stat().st_size
    assert all(a.end == b.start for a, b in zip(tasks, tasks[1:], strict=False))

    def records(summary_out: Path) -> list[str]:
        return sorted(line for f in (summary_out / "data").glob("*.jsonl") for line in f.read_text().splitlines())

    one = run_recipe(whole, tmp_path / "one", workers=1, progress=False)
    two = run_recipe(split, tmp_path / "two", workers=2, progress=False)
    assert records(tmp_path / "two") == records(tmp_path / "one")
    assert one["documents_written"] == two["documents_written"] == 59
    stage1 = [json.loads(p.read_text()) for p in (tmp_path / "two" / "work" / "stage1").glob("*.json")]
    errors = [e for m in stage1 for s in m["stats"] for e in s.get("errors", [])]
    assert any("big.jsonl:46: malformed JSON" in e for e in errors), errors
