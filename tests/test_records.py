"""The jsonl store survives kills and torn writes; manifests, cards and exports."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.core.errors import CaiError
from cai.core.records import JsonlStore, export, to_dataset
from cai.core.stage import StageDir, write_card, write_manifest

WRITER = """
import sys, time
from cai.core.records import JsonlStore
store = JsonlStore(sys.argv[1])
for start in range(0, 500, 10):
    store.append({"id": str(i), "value": i, "pad": "x" * 200} for i in range(start, start + 10))
    time.sleep(float(sys.argv[2]))
"""


def test_append_skips_known_ids_and_rereads(tmp_path: Path) -> None:
    store = JsonlStore(tmp_path / "d.jsonl")
    assert store.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}]) == 2
    assert store.append([{"id": "a", "v": 3}, {"id": "c", "v": 4}]) == 1
    again = JsonlStore(tmp_path / "d.jsonl")
    assert "a" in again and len(again) == 3
    assert [r["v"] for r in again] == [1, 2, 4]


def test_torn_last_line_is_dropped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "tex')
    with pytest.warns(UserWarning, match="torn"):
        store = JsonlStore(path)
    assert store.ids == {"a", "b"}
    store.append([{"id": "c"}])
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(CaiError, match=r"d.jsonl:2"):
        JsonlStore(path)


def test_sigkill_mid_run_then_rerun_has_every_id_once(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    data = tmp_path / "data.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(data), "0.02"])
    deadline = time.time() + 60
    while time.time() < deadline and (not data.exists() or data.stat().st_size < 20_000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = data.read_text().count("\n")
    assert 0 < written < 500, "the writer should have been killed mid-run"
    with open(data, "a") as f:  # and a torn tail, as a kill during a write leaves
        f.write('{"id": "999", "val')
    # The rerun opens the store (dropping the torn tail with a warning) and writes the rest.
    rerun = subprocess.run([sys.executable, str(script), str(data), "0"], capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0 and "torn" in rerun.stderr
    ids = [json.loads(line)["id"] for line in data.read_text().splitlines()]
    assert sorted(ids, key=int) == [str(i) for i in range(500)]
    assert len(ids) == len(set(ids)) == 500


def test_manifest_card_and_exports(tmp_path: Path) -> None:
    import datasets

    stage = StageDir(tmp_path / "run", "sl")
    stage.store.append([{"id": str(i), "prompt": f"p{i}", "provenance": {"seed": i}} for i in range(5)])
    m = write_manifest(stage.root, "sl", config={"seed": 1},
                       constitution={"name": "c", "version": "1", "hash": "h"},
                       models={"policy": "m"}, counts={"records": 5}, timings={"total": 1.0})
    on_disk = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    assert on_disk["data"]["records"] == 5 and on_disk["data"]["sha256"].startswith("sha256:")
    assert set(on_disk["git"]) == {"commit", "dirty"} and on_disk["config"] == {"seed": 1}
    write_card(stage.root, "Title", "Summary.", m)
    assert "# Title" in (tmp_path / "run" / "README.md").read_text()
    ds = to_dataset(stage.store.path)
    assert len(ds) == 5 and json.loads(ds[0]["provenance"]) == {"seed": 0}
    export(stage.store.path, tmp_path / "ds")
    assert len(datasets.load_from_disk(str(tmp_path / "ds"))) == 5
    export(stage.store.path, tmp_path / "ds.parquet", "parquet")
    assert len(datasets.Dataset.from_parquet(str(tmp_path / "ds.parquet"))) == 5
    with pytest.raises(CaiError, match="format"):
        export(stage.store.path, tmp_path / "x", "csv")
