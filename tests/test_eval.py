"""Evaluations: labeler accuracy/calibration report and the constitution-edit comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cai.core.errors import CaiError
from cai.evaluate.constitutions import ConstitutionsEvalConfig, compare, run_constitutions_eval
from cai.evaluate.labeler import (
    LabelerEvalConfig,
    expected_calibration_error,
    load_items,
    run_labeler_eval,
)
from cai.judge import JudgeConfig

from .conftest import MINIMAL


def test_ece_on_hand_computed_values() -> None:
    conf = np.array([0.55, 0.58, 0.95, 0.97])
    right = np.array([1.0, 0.0, 1.0, 1.0])
    ece, table = expected_calibration_error(conf, right, bins=5)
    # Bin [0.5, 0.6): confidence 0.565, accuracy 0.5; bin [0.9, 1.0]: 0.96 vs 1.0.
    assert ece == pytest.approx(0.5 * abs(0.565 - 0.5) + 0.5 * abs(0.96 - 1.0))
    assert [b["n"] for b in table] == [2, 2]


def _items(tmp_path: Path) -> Path:
    rows = [{"id": f"i{k}", "context": f"Question {k}?", "options": [f"good {k}", f"bad {k}"],
             "correct": k % 2, "category": ["harmless", "helpful"][k % 2]} for k in range(6)]
    p = tmp_path / "ab.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_labeler_report(tmp_path: Path, tiny_backend) -> None:
    cfg = LabelerEvalConfig(items=str(_items(tmp_path)), constitution=str(MINIMAL),
                            judge=JudgeConfig(principles=2),
                            out=str(tmp_path / "ev"))
    out = run_labeler_eval(cfg, tiny_backend)
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["items"] == 6 and 0 <= report["accuracy"] <= 1
    for k in ("accuracy_order_ab", "accuracy_order_ba", "ece", "position_bias", "by_category"):
        assert k in report and k in out["metrics"] or k == "by_category"
    assert set(report["by_category"]) == {"harmless", "helpful"}
    png = (tmp_path / "ev" / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_labeler_items_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"context": "q", "options": ["a", "b"], "correct": 0}\n'
                 '{"context": "q", "options": ["a"], "correct": 0}\n')
    with pytest.raises(CaiError, match=r"bad.jsonl:2: options"):
        load_items(p)


def test_compare_hand_made_records() -> None:
    old = [{"pair_id": "x", "prompt": "p", "p_a": 0.7}, {"pair_id": "y", "prompt": "q", "p_a": 0.4}]
    new = [{"pair_id": "x", "prompt": "p", "p_a": 0.3}, {"pair_id": "y", "prompt": "q", "p_a": 0.45}]
    r = compare(old, new)
    assert r["agreement"] == 0.5 and [f["pair_id"] for f in r["flipped"]] == ["x"]
    assert r["mean_shift_p_a"] == pytest.approx((-0.4 + 0.05) / 2)


def test_constitutions_eval_end_to_end(tmp_path: Path, tiny_backend) -> None:
    data = yaml.safe_load(MINIMAL.read_text())
    data["rl"]["principles"][0]["text"] = "Which reply would a careful librarian prefer?"
    data["version"] = "0.1.1"
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(data))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "response_a": f"yes {i}",
                                         "response_b": f"no {i}"}) + "\n" for i in range(4)))
    cfg = ConstitutionsEvalConfig(old=str(MINIMAL), new=str(new), pairs=str(pairs),
                                  judge=JudgeConfig(principles=3),
                                  out=str(tmp_path / "cmp"))
    out = run_constitutions_eval(cfg, tiny_backend)
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert report["pairs"] == 4 and out["metrics"]["pairs"] == 4
    assert report["diff"]["changed"]["rl"] == [data["rl"]["principles"][0]["id"]]
    # With all 3 principles asked, the edited one changes p on every pair.
    assert report["mean_abs_shift_p_a"] > 0
