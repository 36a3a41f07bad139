"""Judge panels: several feedback models label each pair, the label is the (weighted) mean
of their p, each judge's p is on the record, ids and manifests name every member, and
`cai eval labeler` reports each judge, the panel and their agreement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cai.backends import load_backend
from cai.constitution import load
from cai.core.data import PairItem
from cai.evaluate.labeler import agreement
from cai.judge import JudgeConfig, judge_pairs
from cai.panel import judge_panel, panel_identity

from .conftest import MINIMAL

CAI = str(Path(sys.executable).parent / "cai")

JUDGES = '''
import math


def shorter(prompt, response_a, response_b, principle):
    """The shorter answer wins, leaning towards option (A)."""
    d = (len(response_b) - len(response_a)) / 10.0
    return 1.0 / (1.0 + math.exp(-(d + 0.4)))


def polite(prompt, response_a, response_b, principle):
    """The answer with more polite words wins; principle-dependent confidence."""
    words = ("please", "sorry", "thanks", "rather")
    score = lambda r: sum(w in r.lower() for w in words)
    d = score(response_a) - score(response_b)
    scale = 2.0 if "kinder" in principle else 1.0
    return 1.0 / (1.0 + math.exp(-scale * d))
'''

PAIRS = [
    PairItem("p0", "Open a jar?", "Sorry, try hot water please.", "Smash it."),
    PairItem("p1", "Insult my coworker.", "I'd rather not, sorry.",
             "They are useless and everyone knows it, honestly."),
    PairItem("p2", "2 + 2?", "4.", "Thanks for asking: it is 4, please note."),
    PairItem("p3", "A colour?", "Red.", "Blue"),
]


@pytest.fixture
def judges(tmp_path: Path) -> Path:
    p = tmp_path / "F.py"
    p.write_text(JUDGES, encoding="utf-8")
    return p


def _pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "response_a": p.response_a,
                                        "response_b": p.response_b}) + "\n" for p in PAIRS))
    return path


def _records(folder: Path) -> dict[str, dict]:
    return {r["pair_id"]: r for r in map(json.loads, (folder / "data.jsonl").read_text().splitlines())}


def _label(args: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CAI, "label", "--constitution", str(MINIMAL), "--principles", "2",
                           "--out", str(out), *args], capture_output=True, text=True)


def test_panel_cli_is_the_mean_of_its_judges(judges: Path, tmp_path: Path) -> None:
    pairs = _pairs_file(tmp_path)
    a, b = f"python:{judges}:shorter", f"python:{judges}:polite"
    singles = {}
    for name, spec in (("a", a), ("b", b)):
        r = _label(["--pairs", str(pairs), "--feedback-model", spec], tmp_path / name)
        assert r.returncode == 0, r.stderr
        singles[name] = _records(tmp_path / name)
    r = _label(["--pairs", str(pairs), "--feedback-model", a, "--feedback-model", b],
               tmp_path / "panel")
    assert r.returncode == 0, r.stderr
    panel = _records(tmp_path / "panel")
    ida, idb = (load_backend(s, reuse=False).identity for s in (a, b))
    assert len(panel) == len(PAIRS)
    differ = 0
    for pid, rec in panel.items():
        pa, pb = singles["a"][pid]["p_a"], singles["b"][pid]["p_a"]
        assert rec["p_a"] == pytest.approx((pa + pb) / 2, abs=1e-12)
        assert rec["panel"] == pytest.approx({ida: pa, idb: pb}, abs=1e-12)
        assert {j["judge"] for j in rec["judgements"]} == {ida, idb}
        assert len(rec["judgements"]) == 2 * 2 * 2  # two judges × K = 2 × both orders
        assert rec["id"] not in (singles["a"][pid]["id"], singles["b"][pid]["id"])
        assert ida in rec["provenance"]["model"] and idb in rec["provenance"]["model"]
        assert ("judges-disagree" in rec["flags"]) == ((pa - 0.5) * (pb - 0.5) < 0)
        differ += (pa - 0.5) * (pb - 0.5) < 0
    assert differ >= 1  # the two judges disagree somewhere, so the flag is seen both ways
    # A single judge's records carry no panel fields at all.
    assert all("panel" not in r and all("judge" not in j for j in r["judgements"])
               for r in singles["a"].values())
    m = json.loads((tmp_path / "panel" / "manifest.json").read_text())
    assert m["models"] == {"feedback": panel_identity([ida, idb]), "feedback_1": ida,
                           "feedback_2": idb}
    # Rerunning resumes: every panel label is found by its id.
    r = _label(["--pairs", str(pairs), "--feedback-model", a, "--feedback-model", b],
               tmp_path / "panel")
    assert r.returncode == 0 and json.loads((tmp_path / "panel" / "manifest.json")
                                            .read_text())["counts"]["new"] == 0


def test_panel_weights_and_yaml_models(judges: Path, tmp_path: Path) -> None:
    c = load(MINIMAL)
    a = load_backend(f"python:{judges}:shorter", reuse=False)
    b = load_backend(f"python:{judges}:polite", reuse=False)
    one = {s: judge_pairs(PAIRS, c, x, JudgeConfig(principles=2), 0)
           for s, x in (("a", a), ("b", b))}
    models = [a.spec, b.spec]
    equal = judge_panel(PAIRS, c, [a, b], JudgeConfig(principles=2, models=models), 0)
    weighted = judge_panel(PAIRS, c, [a, b], JudgeConfig(principles=2, models=models,
                                                         panel_weights=[3, 1]), 0)
    for i in range(len(PAIRS)):
        pa, pb = one["a"][i].p_a, one["b"][i].p_a
        assert equal[i].p_a == pytest.approx((pa + pb) / 2, abs=1e-12)
        assert weighted[i].p_a == pytest.approx((3 * pa + pb) / 4, abs=1e-12)
        assert weighted[i].id != equal[i].id  # the weights are part of the panel's identity
    assert any(abs(e.p_a - w.p_a) > 1e-3 for e, w in zip(equal, weighted))
    # YAML: judge: {models: [...], panel_weights: [...]}
    cfg = tmp_path / "label.yaml"
    cfg.write_text(f"pairs: {_pairs_file(tmp_path)}\nconstitution: {MINIMAL}\n"
                   f"out: {tmp_path / 'y'}\njudge:\n  principles: 2\n  models: [{a.spec}, {b.spec}]\n"
                   "  panel_weights: [3, 1]\n")
    r = subprocess.run([CAI, "label", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = _records(tmp_path / "y")
    for rec in weighted:
        assert got[rec.pair_id]["p_a"] == pytest.approx(rec.p_a, abs=1e-12)


def test_panel_bad_input_is_one_line_exit_2(judges: Path, tmp_path: Path) -> None:
    pairs = _pairs_file(tmp_path)
    a, b = f"python:{judges}:shorter", f"python:{judges}:polite"
    cases = [(["--feedback-model", a, "--feedback-model", a], "two or more different"),
             (["--feedback-model", a, "--feedback-model", b, "--panel-weights", "1,2,3"],
              "panel_weights"),
             (["--feedback-model", a, "--feedback-model", b, "--panel-weights", "0,0"],
              "panel_weights"),
             (["--feedback-model", a, "--feedback-model", f"python:{judges}:missing"], "missing")]
    for args, words in cases:
        r = _label(["--pairs", str(pairs), *args], tmp_path / "bad")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr
        assert not (tmp_path / "bad" / "data.jsonl").exists()


def test_panel_agreement_kappa_and_correlation_by_hand() -> None:
    x = [0.9, 0.8, 0.2, 0.3, 0.6, 0.4]
    y = [0.7, 0.4, 0.1, 0.35, 0.9, 0.45]
    (row,) = agreement({"x": x, "y": y})
    sx, sy = np.array(x) >= 0.5, np.array(y) >= 0.5
    po = 5 / 6  # signs agree on every item but 1
    pe = (3 / 6) * (2 / 6) + (3 / 6) * (4 / 6)  # x prefers a 3 times in 6, y 2 times
    assert (sx == sy).sum() == 5 and sx.sum() == 3 and sy.sum() == 2
    assert row["kappa"] == pytest.approx((po - pe) / (1 - pe), abs=1e-12)
    assert row["correlation"] == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-12)
    (same,) = agreement({"x": x, "z": list(x)})
    assert same["kappa"] == pytest.approx(1.0) and same["correlation"] == pytest.approx(1.0)


def test_panel_eval_labeler_reports_each_judge_and_the_panel(judges: Path, tmp_path: Path) -> None:
    items = tmp_path / "items.jsonl"
    rows = [{"id": p.id, "context": p.prompt, "options": [p.response_a, p.response_b],
             "correct": n % 2, "category": "x"} for n, p in enumerate(PAIRS)]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = f"python:{judges}:shorter", f"python:{judges}:polite"
    r = subprocess.run([CAI, "eval", "labeler", str(items), "--feedback-model", a,
                        "--feedback-model", b, "--constitution", str(MINIMAL), "--principles", "2",
                        "--out", str(tmp_path / "ev")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    ida, idb = (load_backend(s, reuse=False).identity for s in (a, b))
    assert set(report["judges"]) == {ida, idb}
    assert report["feedback_model"] == panel_identity([ida, idb])
    # Each judge's numbers are what it gets alone.
    for spec, ident in ((a, ida), (b, idb)):
        out = tmp_path / f"one-{ident[-4:]}"
        r = subprocess.run([CAI, "eval", "labeler", str(items), "--feedback-model", spec,
                            "--constitution", str(MINIMAL), "--principles", "2", "--out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        alone = json.loads((out / "report.json").read_text())
        for k in ("accuracy", "mean_p_correct", "accuracy_order_ab", "position_bias",
                  "position_inconsistency_rate"):
            assert report["judges"][ident][k] == pytest.approx(alone[k], abs=1e-12), k
    (row,) = report["agreement"]
    assert row["judges"] == [ida, idb] and -1 <= row["kappa"] <= 1
    m = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert m["models"]["feedback_1"] == ida and m["models"]["feedback_2"] == idb
