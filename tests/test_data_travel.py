"""Outside preference data mixed with the AI labels (weighted sources, per-source accuracy)
and stage data exported with its card (the path `cai export --push-to-hub` shares)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai.core.config import load_yaml_config
from cai.core.errors import CaiError
from cai.core.stage import write_manifest
from cai.train.pm import PMConfig, run_pm
from cai.train.prefs import load_training_rows, prompt_key

from .test_train_pm import STAMP, fake_label_stage, two_groups, write_jsonl

CAI = str(Path(sys.executable).with_name("cai"))


def _helpful(n: int = 4) -> list[dict]:
    """A helpfulness set in TRL's format, without p_chosen (a hard preference)."""
    return [{"prompt": [{"role": "user", "content": f"How do I bake bread {k}?"}],
             "chosen": f"Mix flour, water and yeast, then bake {k}.", "rejected": "I can't help."}
            for k in range(n)]


def test_mixed_preferences_weights_names_and_ids(tmp_path: Path) -> None:
    up = fake_label_stage(tmp_path / "label", two_groups(2))
    extra = write_jsonl(tmp_path / "extra.jsonl", _helpful(2))
    rows, counts = load_training_rows(PMConfig(preferences=[str(up), f"{extra}:0.3"]))
    by = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r)
    assert set(by) == {str(up), str(extra)}
    assert all(r["weight"] == 1.0 for r in by[str(up)])
    assert all(r["weight"] == 0.3 and r["p_chosen"] == 1.0 for r in by[str(extra)])
    assert all(r["id"].startswith(f"{r['source']}/") for r in rows)
    assert counts[f"preferences:{up}"] == 4 and counts[f"preferences:{extra}"] == 2
    # One source keeps its old name, ids and weight 1; a weight alone changes the weight.
    rows, counts = load_training_rows(PMConfig(preferences=str(up)))
    assert {r["source"] for r in rows} == {"labels"} and counts["preferences"] == 4
    assert [r["id"] for r in rows][:2] == ["a0", "b0"]
    rows, _ = load_training_rows(PMConfig(preferences=f"{up}:0.5"))
    assert {r["weight"] for r in rows} == {0.5}
    for bad, msg in ([f"{extra}:-1", "≥ 0"], [f"{extra}:nan", "finite"]):
        with pytest.raises(CaiError, match=msg):
            load_training_rows(PMConfig(preferences=[str(up), bad]))
    with pytest.raises(CaiError, match="given twice"):
        load_training_rows(PMConfig(preferences=[str(extra), f"{extra}:0.5"]))


def test_mixed_preferences_as_a_yaml_list_and_repeated_flags(tmp_path: Path) -> None:
    up = fake_label_stage(tmp_path / "label", two_groups(1))
    y = tmp_path / "pm.yaml"
    y.write_text(f"preferences:\n  - {up}\n  - extra.jsonl:0.3\n", encoding="utf-8")
    assert load_yaml_config(PMConfig, y).preferences == [str(up), "extra.jsonl:0.3"]
    y.write_text("preferences: [1, 2]\n", encoding="utf-8")
    with pytest.raises(CaiError, match="preferences"):
        load_yaml_config(PMConfig, y)
    # Repeated on the command line: both are read (the missing second one is named, its
    # weight split off).
    r = subprocess.run([CAI, "train", "pm", "--preferences", str(up), "--preferences",
                        str(tmp_path / "missing.jsonl") + ":0.3", "--out", str(tmp_path / "pm")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert f"{tmp_path / 'missing.jsonl'}: not found" in r.stderr and ":0.3" not in r.stderr


def test_mixed_preferences_pm_reports_accuracy_per_source(tiny_model: Path, tmp_path: Path) -> None:
    up = fake_label_stage(tmp_path / "label", two_groups(4))
    # The helpful set shares prompts with the labels: the split keeps a prompt on one side.
    extra = write_jsonl(tmp_path / "extra.jsonl", _helpful(4))
    cfg = PMConfig(preferences=[str(up), f"{extra}:0.3"], model=str(tiny_model),
                   out=str(tmp_path / "pm"), lora=True, lora_r=4, lora_alpha=8,
                   learning_rate=5e-3, max_steps=2, batch_size=2, eval_fraction=0.5,
                   max_length=64)
    m = run_pm(cfg)
    report = json.loads((tmp_path / "pm" / "eval.json").read_text())
    assert set(report["by_source"]) == {str(up), str(extra)}
    assert all("accuracy" in v and v["pairs"] >= 1 for v in report["by_source"].values())
    held = set(report["split"]["eval_prompt_keys"])
    rows, _ = load_training_rows(cfg)
    # The sources share prompts (the bread questions) ...
    assert {prompt_key(r["prompt"]) for r in rows if r["source"] == str(up)} & {
        prompt_key(r["prompt"]) for r in rows if r["source"] == str(extra)}
    # ... and each prompt's pairs, from either source, are all held out or all trained on.
    held_ids = {r["id"] for r in report["per_pair"]}
    assert held and held_ids and len(held_ids) < len(rows)
    assert all((r["id"] in held_ids) == (prompt_key(r["prompt"]) in held) for r in rows)
    assert m["counts"]["eval"] == report["pairs"]
    # Both sources are named upstream of the run.
    assert {m["upstream"][k]["path"] for k in ("preferences.0", "preferences.1")} == {
        str(up), str(extra)}


def test_export_writes_the_stage_card_with_the_constitution_stamp(tmp_path: Path) -> None:
    import datasets
    import yaml

    stage = tmp_path / "label"
    write_jsonl(stage / "data.jsonl", [{"id": "r1", "stage": "label", "prompt": "q",
                                         "context": [{"role": "user", "content": "earlier"}]},
                                        {"id": "r2", "stage": "label", "prompt": "q2"}])
    write_manifest(stage, "label", config={}, constitution=STAMP, data=("data.jsonl",))
    (stage / "README.md").write_text("# AI preference labels\n\nSoft labels.\n", encoding="utf-8")
    out = tmp_path / "export"
    r = subprocess.run([CAI, "export", str(stage), "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ds = datasets.load_from_disk(str(out))
    assert ds["id"] == ["r1", "r2"] and ds["context"][1] is None
    card = (out / "README.md").read_text(encoding="utf-8")
    head, body = card.split("---\n", 2)[1:]
    meta = yaml.safe_load(head)
    assert meta["constitution"] == STAMP and meta["cai_stage"] == "label"
    assert body.strip().startswith("# AI preference labels")
    # --private means nothing without --push-to-hub; neither --out nor a repo is an error.
    for args in (["--out", str(tmp_path / "x"), "--private"], []):
        r = subprocess.run([CAI, "export", str(stage), *args], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
