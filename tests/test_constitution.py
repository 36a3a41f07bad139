"""Constitutions: shipped files validate; broken ones fail with file:line and field; the hash;
the diff; seeded weighted sampling."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai.constitution import load, parse, sample_rl_principles, sample_sl_principle
from cai.core.errors import CaiError

from .conftest import HARMLESS, MINIMAL, ROOT

CAI = str(Path(sys.executable).parent / "cai")
FIXTURES = Path(__file__).parent / "fixtures" / "constitutions"


def cai(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CAI, *args], capture_output=True, text=True, timeout=120)


def test_shipped_constitutions_validate() -> None:
    files = sorted(str(p) for p in (ROOT / "constitutions").glob("*.yaml"))
    assert len(files) >= 2
    r = cai("constitution", "validate", *files)
    assert r.returncode == 0, r.stderr
    c = load(HARMLESS)
    assert len(c.sl_principles) >= 16 and len(c.rl_principles) >= 16 and len(c.few_shot) >= 3
    assert load(MINIMAL).name == "minimal"


@pytest.mark.parametrize("name, line, field", [
    ("yaml_syntax.yaml", 11, None),
    ("duplicate_id.yaml", 10, "sl.principles[1].id"),
    ("missing_critique.yaml", 10, "sl.principles[1].critique"),
    ("unknown_key.yaml", 13, "sl.principles[1].colour"),
    ("wrong_type.yaml", 5, "sl.rounds"),
    ("empty_principles.yaml", 14, "rl.principles"),
])
def test_broken_constitution_is_one_clear_error(name: str, line: int, field: str | None) -> None:
    path = FIXTURES / name
    r = cai("constitution", "validate", str(path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith(f"{path}:{line}: ")
    if field:
        assert f": {field}: " in lines[0]
    else:
        assert "YAML syntax error" in lines[0]
    assert r.stdout == ""


def test_hash_ignores_formatting_and_tracks_content(tmp_path: Path) -> None:
    c = load(HARMLESS)
    data = yaml.safe_load(HARMLESS.read_text())
    reformatted = tmp_path / "reformatted.yaml"
    reformatted.write_text("# a comment that changes nothing\n"
                           + yaml.safe_dump(data, default_flow_style=True, sort_keys=True, width=60))
    assert load(reformatted).hash == c.hash
    json_style = tmp_path / "as_json.yaml"  # JSON is YAML too
    json_style.write_text(json.dumps(data, indent=7))
    assert load(json_style).hash == c.hash
    for section, key in (("sl", "critique"), ("sl", "revision"), ("rl", "text")):
        edited = json.loads(json.dumps(data))
        edited[section]["principles"][3][key] += " Be concise."
        assert parse(yaml.safe_dump(edited)).hash != c.hash


def test_show_json_includes_hash() -> None:
    r = cai("constitution", "show", str(HARMLESS), "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["hash"] == load(HARMLESS).hash


def test_diff_names_edited_principle_and_warns_on_same_version(tmp_path: Path) -> None:
    data = yaml.safe_load(HARMLESS.read_text())
    pid = data["rl"]["principles"][2]["id"]
    data["rl"]["principles"][2]["text"] = "Which reply would a careful editor prefer?"
    new = tmp_path / "edited.yaml"
    new.write_text(yaml.safe_dump(data))
    r = cai("constitution", "diff", str(HARMLESS), str(new))
    assert r.returncode == 0 and f"~ rl.{pid}" in r.stdout
    assert "warning" in r.stderr and "version" in r.stderr
    data["version"] = "1.0.1"
    data["sl"]["principles"].append({"id": "brand-new", "critique": "c?", "revision": "r."})
    removed = data["rl"]["principles"].pop(0)["id"]
    new.write_text(yaml.safe_dump(data))
    r = cai("constitution", "diff", str(HARMLESS), str(new), "--json")
    d = json.loads(r.stdout)
    assert d["added"]["sl"] == ["brand-new"] and d["removed"]["rl"] == [removed]
    assert d["changed"]["rl"] == [pid] and d["warning"] is None and "warning" not in r.stderr
    same = tmp_path / "copy.yaml"
    shutil.copy(HARMLESS, same)
    r = cai("constitution", "diff", str(HARMLESS), str(same))
    assert "no content change" in r.stdout and r.stderr == ""


def test_rl_sampling_distinct_seeded_and_keyed() -> None:
    c = load(HARMLESS)
    ids = {p.id for p in c.rl_principles}
    draws = [sample_rl_principles(c, 4, 0, "prompt", f"pair {i}") for i in range(50)]
    for d in draws:
        assert len({p.id for p in d}) == 4 and {p.id for p in d} <= ids
    assert draws[0] == sample_rl_principles(c, 4, 0, "prompt", "pair 0")
    assert len({tuple(p.id for p in d) for d in draws}) > 40
    assert sample_rl_principles(c, 4, 1, "prompt", "pair 0") != draws[0] or \
        sample_rl_principles(c, 4, 2, "prompt", "pair 0") != draws[0]
    with pytest.raises(CaiError, match="distinct"):
        sample_rl_principles(c, len(ids) + 1, 0, "x")


def test_sampling_follows_weights() -> None:
    c = load(MINIMAL)  # sl weights 1, 2, 1: the weight-2 principle should come up half the time
    heavy = max(c.sl_principles, key=lambda p: p.weight)
    assert heavy.weight == 2.0 and sum(p.weight for p in c.sl_principles) == 4.0
    counts = collections.Counter(sample_sl_principle(c, 0, f"p{i}", 0, 1).id for i in range(4000))
    assert abs(counts[heavy.id] / 4000 - 0.5) < 0.03
    assert set(counts) == {p.id for p in c.sl_principles}


def test_helpfulness_set_is_validated_drawn_and_diffed(tmp_path: Path) -> None:
    c = load(HARMLESS)
    help_c = c.for_set("helpfulness")
    helpful_ids = {p.id for p in help_c.rl_principles}
    assert len(helpful_ids) >= 4 and not helpful_ids & {p.id for p in c.rl_principles}
    assert c.set_source("helpfulness") == "helpfulness.principles"
    # Draws come from the helpfulness set; records still cite the file's stamp; ids differ.
    drawn = {p.id for i in range(30) for p in sample_rl_principles(help_c, 2, 0, f"pair {i}")}
    assert drawn and drawn <= helpful_ids
    assert help_c.stamp == c.stamp and help_c.hash != c.hash
    assert c.for_set("harmlessness") is c
    # Without a helpfulness section the set falls back to rl.principles, and says so.
    data = yaml.safe_load(HARMLESS.read_text())
    del data["helpfulness"]
    plain = parse(yaml.safe_dump(data))
    assert plain.for_set("helpfulness") is plain and plain.set_source("helpfulness") == "rl.principles"
    # An id shared with rl, or a repeated one, is an error naming file:line and field.
    data = yaml.safe_load(HARMLESS.read_text())
    data["helpfulness"]["principles"][1]["id"] = data["rl"]["principles"][0]["id"]
    bad = tmp_path / "clash.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    r = cai("constitution", "validate", str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert ": helpfulness.principles[1].id: " in r.stderr and "Traceback" not in r.stderr
    data["helpfulness"]["principles"] = []
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    r = cai("constitution", "validate", str(bad))
    assert r.returncode == 2 and ": helpfulness.principles: must not be empty" in r.stderr
    # The diff sees helpfulness edits.
    data = yaml.safe_load(HARMLESS.read_text())
    data["helpfulness"]["principles"][0]["text"] = "Which reply helps more?"
    data["version"] = "9.0.0"
    new = tmp_path / "edited.yaml"
    new.write_text(yaml.safe_dump(data))
    r = cai("constitution", "diff", str(HARMLESS), str(new), "--json")
    assert json.loads(r.stdout)["changed"]["helpfulness"] == [data["helpfulness"]["principles"][0]["id"]]
    shown = cai("constitution", "show", str(HARMLESS)).stdout
    assert "Helpfulness principles" in shown and "no-needless-refusal" in shown
    data = yaml.safe_load(HARMLESS.read_text())
    del data["helpfulness"]
    new.write_text(yaml.safe_dump(data))
    assert "Helpfulness principles" not in cai("constitution", "show", str(new)).stdout
