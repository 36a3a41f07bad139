"""`manifest.json` through its schema (`cai.core.manifest`): old manifests still read, in full;
a bad or newer one is one clear error; what a stage writes is what the schema reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cai.core.errors import CaiError
from cai.core.folders import read_manifest
from cai.core.manifest import SCHEMA_VERSION, Manifest
from cai.core.stage import write_manifest

OLD = Path(__file__).parent / "fixtures" / "manifests"
"""Manifests as cai wrote them before the schema had a version (a tiny pipeline run's)."""


@pytest.mark.parametrize("name", ["label-v0.json", "eval-v0.json"])
def test_manifest_schema_reads_old(name: str, tmp_path: Path) -> None:
    raw = json.loads((OLD / name).read_text(encoding="utf-8"))
    assert "schema_version" not in raw
    folder = tmp_path / raw["stage"]
    folder.mkdir()
    shutil.copy(OLD / name, folder / "manifest.json")
    m = read_manifest(folder)
    assert isinstance(m, Manifest) and m.schema_version == 0 and m.stage == raw["stage"]
    assert m.as_dict() == raw  # every field, its own extras included, and nothing added
    assert m.data.files == raw["data"]["files"] and m.counts == raw["counts"]
    assert m.constitution["name"] == "harmless"
    if m.stage == "label":
        assert m.upstream["policy"].stage == "sft" and m.upstream["policy"].identity
        assert m.label_stats["pairs"] == raw["label_stats"]["pairs"]
    else:
        assert m.prompt_ids == raw["prompt_ids"]  # a stage's own field, kept as it is


def test_manifest_bad_or_newer_is_one_clear_error(tmp_path: Path) -> None:
    raw = json.loads((OLD / "label-v0.json").read_text(encoding="utf-8"))
    folder = tmp_path / "label"
    folder.mkdir()

    def read(obj: object) -> Manifest | None:
        (folder / "manifest.json").write_text(json.dumps(obj), encoding="utf-8")
        return read_manifest(folder)

    with pytest.raises(CaiError, match=r"manifest\.json: manifest schema_version 99 is newer than "
                                       rf"this cai reads \({SCHEMA_VERSION}\)"):
        read({**raw, "schema_version": 99})
    with pytest.raises(CaiError, match=r"not a valid manifest: counts: .*dictionary"):
        read({**raw, "counts": [1, 2]})
    with pytest.raises(CaiError, match=r"not a valid manifest: stage: Field required"):
        read({k: v for k, v in raw.items() if k != "stage"})
    with pytest.raises(CaiError, match="not a valid manifest .not a JSON object"):
        read([raw])
    (folder / "manifest.json").write_text('{"stage": "lab', encoding="utf-8")
    with pytest.raises(CaiError, match="not a valid manifest"):
        read_manifest(folder)
    assert read({**raw, "stage": "train.pm"}).stage == "pm"  # an old stage name reads as the new


def test_written_manifest_carries_the_version_and_reads_back(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"id": "1"}\n')
    m = write_manifest(tmp_path, "test-stage", config={"seed": 0, "lr": float("inf")},
                       counts={"records": 1}, extra={"label_stats": {"pairs": 1}})
    assert m["schema_version"] == SCHEMA_VERSION and m["config"]["lr"] is None
    back = read_manifest(tmp_path)
    assert back.as_dict() == m == json.loads((tmp_path / "manifest.json").read_text())
    assert back.data.records == 1 and back.label_stats == {"pairs": 1}


def test_viewer_shows_a_newer_manifest_as_a_problem_not_a_stage(tmp_path: Path) -> None:
    from cai.view.runs import Run

    raw = json.loads((OLD / "label-v0.json").read_text(encoding="utf-8"))
    for key, obj in (("label", raw), ("round-2/label", {**raw, "schema_version": 99})):
        (tmp_path / key).mkdir(parents=True)
        (tmp_path / key / "manifest.json").write_text(json.dumps(obj), encoding="utf-8")
    run = Run(tmp_path)
    assert [s.key for s in run.stages] == ["label"] and run.stages[0].manifest.stage == "label"
    assert run.problems == ["round-2/label/manifest.json: manifest schema_version 99 is newer than "
                            f"this cai reads ({SCHEMA_VERSION}); upgrade cai to read it: that "
                            "folder is not shown"]
