"""The benchmarks' typed result records: one writer and one reader for all of them
(`eval.common.write_record` / `read_record`), the committed results load into their types, and
the tables generated from them are the ones committed."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO

from eval import bench_decode, bench_kvcache, bench_train, common, compare_commits, decode_growth
from eval.common import RESULTS, read_record, write_record

COMMITTED = {
    "bench_decode.json": bench_decode.DecodeResult,
    "bench_kvcache.json": bench_kvcache.KVCacheResult,
    "bench_kvcache_layer.json": bench_kvcache.AttendResult,
    "bench_train.json": bench_train.TrainResult,
    "compare_commits.json": compare_commits.CompareResult,
    "compare_commits_b8_L256.json": compare_commits.CompareResult,
    "decode_growth.json": decode_growth.GrowthResult,
}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    value: float


@dataclasses.dataclass(frozen=True)
class Table:
    machine: common.Machine
    rows: tuple[Row, ...]
    by_tag: dict[str, Row]
    pair: tuple[int, float]
    note: str | None
    child: Row | None
    items: list[int]


def test_a_record_round_trips_through_json(tmp_path):
    record = Table(common.Machine("cpu", 2), (Row("a", 1.5), Row("b", float("inf"))),
                   {"x": Row("x", 2.0)}, (3, 0.25), None, Row("c", -1.0), [1, 2])
    path = write_record(tmp_path / "record.json", record)
    assert read_record(path, Table) == record
    path.write_text(path.read_text().replace('"value": 2.0', '"value": 2'))
    assert isinstance(read_record(path, Table).by_tag["x"].value, float)  # JSON's 2 is 2.0


def test_a_file_of_another_schema_is_refused_by_name(tmp_path):
    path = write_record(tmp_path / "record.json", Row("a", 1.0))
    path.write_text(path.read_text().replace('"name"', '"impl"'))
    with pytest.raises(ValueError, match=r"record.json is not a Row record.*\['impl'\]"):
        read_record(path, Row)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_results_load_into_their_records_and_write_back_unchanged(name, tmp_path):
    record = read_record(RESULTS / name, COMMITTED[name])
    assert isinstance(record, COMMITTED[name])
    # every value read back as it was written: the same text again
    assert write_record(tmp_path / name, record).read_text() == (RESULTS / name).read_text()


def test_decode_record_looks_figures_up_by_what_they_are():
    r = read_record(RESULTS / "bench_decode.json", bench_decode.DecodeResult)
    assert r.figure("hf").side == "hf" and r.figure(weights="w8a8", batch=8).batch == 8
    assert r.speedup("gpt2jax", 1, 64) == (r.cell(batch=1, length=64).tok_s
                                           / r.cell(cache="none", batch=1, length=64).tok_s)
    with pytest.raises(KeyError, match="0 rows"):
        r.figure("hf", cache="tq3")


def _block(doc: str, name: str) -> str:
    return doc.split(f"<!-- {name}:begin -->\n", 1)[1].split(f"\n<!-- {name}:end -->", 1)[0]


def test_committed_docs_tables_are_what_the_records_give():
    doc = (REPO / "docs" / "results.md").read_text()
    decode = read_record(RESULTS / "bench_decode.json", bench_decode.DecodeResult)
    assert _block(doc, "bench_decode") == bench_decode.readme_table(decode)
    train = sorted(RESULTS.glob("bench_train*.json"))
    assert _block(doc, "bench_train") == bench_train.readme_table(train)
    for name in ("compare_commits", "compare_commits_b8_L256"):
        result = read_record(RESULTS / f"{name}.json", compare_commits.CompareResult)
        assert _block(doc, name) == compare_commits.table(result, f"{name}.json")
    table = bench_train.format_table(read_record(train[0], bench_train.TrainResult))
    assert (RESULTS / "bench_train.md").read_text().endswith(f"\n\n{table}\n")


def test_recorded_commands_name_repository_paths_relative_to_it():
    argv = ["--json", str(RESULTS / "bench_decode.json"), "--lengths", "64", "/elsewhere/x"]
    assert common.command_line("eval.bench_decode", argv) == (
        "python -m eval.bench_decode --json eval/results/bench_decode.json --lengths 64 "
        "/elsewhere/x")


def _keys(tree):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield k
            yield from _keys(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _keys(v)


def test_no_result_stores_a_verdict():
    """Verdicts exist only as eval/verdicts.py computes them from the numbers, where shown: a
    stored one outlives the rule that gave it."""
    import json

    stored = {p.name for p in RESULTS.glob("*.json")
              if "verdict" in set(_keys(json.loads(p.read_text())))}
    assert not stored, f"{sorted(stored)} store a 'verdict': store the numbers, not the outcome"
