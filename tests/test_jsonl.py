"""The one jsonl reader (`cai.core.data.read_jsonl`) and writer (`cai.core.records.write_jsonl`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai.core.data import read_jsonl
from cai.core.errors import CaiError
from cai.core.records import JsonlStore, jsonl_text, write_jsonl
from cai.core.results import read_jsonl as read_results


def test_round_trip_keeps_unicode_as_written(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    write_jsonl(p, [{"id": "1", "text": "naïve"}, {"id": "2", "text": "x"}])
    assert p.read_text(encoding="utf-8") == '{"id": "1", "text": "naïve"}\n{"id": "2", "text": "x"}\n'
    assert read_jsonl(p) == [{"id": "1", "text": "naïve"}, {"id": "2", "text": "x"}]
    assert jsonl_text([{"t": "é"}], ensure_ascii=True) == '{"t": "\\u00e9"}\n'


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "none.jsonl") == [] and read_results(tmp_path / "none.jsonl") == []


def test_strict_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n{"a": \n[1]\n', encoding="utf-8")
    with pytest.raises(CaiError) as e:
        read_jsonl(p)
    assert f"{p}:3" in str(e.value) and f"{p}:4" in str(e.value)


def test_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"st', encoding="utf-8")
    assert read_jsonl(p, drop_torn=True) == [{"step": 1}, {"step": 2}]
    assert read_results(p) == [{"step": 1}, {"step": 2}]  # lenient: skipped
    with pytest.raises(CaiError, match=":3"):
        read_jsonl(p)


def test_store_reads_through_the_reader(tmp_path: Path) -> None:
    store = JsonlStore(tmp_path / "s.jsonl")
    store.append([{"id": "a", "v": "ü"}, {"id": "b", "v": 2}])
    assert list(store) == [{"id": "a", "v": "ü"}, {"id": "b", "v": 2}]
    assert (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()[0] == '{"id": "a", "v": "ü"}'
