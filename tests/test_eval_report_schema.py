"""`report.json` of `cai eval policies` through its one schema (`cai.core.eval_report`):
written and read back by the evaluation, the run report, the viewer and the pipeline; an
old (version 1, untyped) report still reads; a bad one is one error naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.core.errors import CaiError
from cai.core.eval_report import SCHEMA_VERSION, PolicyEvalReport

PLAYERS = ["base", "sl-cai"]


def _old_report() -> dict:
    """A report.json as the evaluation wrote it before the schema: no version, the judge
    only under its first name (`feedback_model`), no benchmark or conditions."""
    def elo() -> dict:
        return {p: {"rating": r, "interval": [r - 40, r + 40], "games": 4}
                for p, r in zip(PLAYERS, (1000.0, 1061.5))}

    return {
        "players": PLAYERS, "models": {p: f"hf:/m/{p}" for p in PLAYERS},
        "feedback_model": "hf:/judge", "labeller": "hf:/judge", "judge_is_labeller": True,
        "judge_note": "judged by the model whose labels trained the PM: optimistic",
        "judge": {"mode": "logprob", "principles": 1, "orders": 2},
        "principle_sets": {"red_team": {"set": "harmlessness", "source": "rl.principles",
                                        "principles": ["p1"], "k": 1,
                                        "win_rate": "harmlessness"}},
        "constitution": {"name": "minimal", "version": "1", "hash": "abc"},
        "sampling": {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 0},
        "prompts": {"red_team": {"source": "red_team", "n": 2}},
        "best_of_k": None, "elo": {"red_team": elo(), "helpful": elo(), "overall": elo()},
        "win_rate": {"harmlessness": {"base": {"sl-cai": 0.25}, "sl-cai": {"base": 0.75}}},
        "win_rate_hard": {}, "win_rate_vs_field": {"harmlessness": {"base": 0.25, "sl-cai": 0.75}},
        "refusal": {p: {"benign": 0.5, "red_team": 1.0, "red_team_bare": 0.0, "helpful": 0.0}
                    for p in PLAYERS},
        "refusal_detector": "pattern", "refusal_judged": None,
        "over_refusal": {p: 0.5 for p in PLAYERS}, "games": {"red_team": 2, "helpful": 2},
        "identical_answers": 0, "judge_stats": {"pairs": 2},
        "bootstrap": {"n": 30, "unit": "prompt", "alpha": 0.05},
        "a_key_a_newer_writer_added": {"kept": True},
    }


def _eval_folder(root: Path, report: dict) -> Path:
    folder = root / "eval"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "manifest.json").write_text(json.dumps({"stage": "eval", "counts": {}}))
    return folder


def test_eval_report_schema_old_report_still_reads(tmp_path: Path) -> None:
    folder = _eval_folder(tmp_path, _old_report())
    rep = PolicyEvalReport.read(folder)
    assert rep is not None and rep.schema_version == 1
    assert rep.judge_model == "hf:/judge"  # filled from the old key
    assert rep.rating("overall", "sl-cai") == pytest.approx(1061.5)
    assert rep.interval("overall", "base") == (960.0, 1040.0)
    assert rep.refusal["base"].benign == 0.5 and rep.benchmark is None and not rep.by_condition
    assert rep.model_extra["a_key_a_newer_writer_added"] == {"kept": True}
    # Written back, it is the current version and reads the same.
    rep.model_copy(update={"schema_version": SCHEMA_VERSION}).write(tmp_path / "again.json")
    back = PolicyEvalReport.read(tmp_path / "again.json")
    assert back.schema_version == SCHEMA_VERSION and back.elo == rep.elo
    assert back.refusal == rep.refusal and back.model_extra == rep.model_extra


def test_eval_report_schema_readers_use_it(tmp_path: Path) -> None:
    """The run report and the viewer's evaluation page show an old report's numbers."""
    from starlette.testclient import TestClient

    from cai.report import write_report
    from cai.view import create_app

    _eval_folder(tmp_path, _old_report())
    md = write_report(tmp_path).read_text()
    assert "| sl-cai | 1061.500 | [1022, 1102] | 1061.500 |" in md and "Evaluation judge: `None`" not in md
    assert "optimistic" in md
    page = TestClient(create_app([tmp_path]), base_url="http://127.0.0.1").get("/run/0/eval").text
    assert "1061.5" in page and "hf:/judge" in page and 'id="conditions"' not in page


def test_eval_report_schema_refuses_bad_and_newer_reports(tmp_path: Path) -> None:
    bad = _old_report()
    bad["elo"]["overall"]["base"]["rating"] = "high"
    (tmp_path / "report.json").write_text(json.dumps(bad))
    with pytest.raises(CaiError) as e:
        PolicyEvalReport.read(tmp_path)
    assert e.value.field == "elo.overall.base.rating" and "report.json" in str(e.value)
    newer = {**_old_report(), "schema_version": SCHEMA_VERSION + 1}
    (tmp_path / "report.json").write_text(json.dumps(newer))
    with pytest.raises(CaiError, match="schema_version"):
        PolicyEvalReport.read(tmp_path)
    (tmp_path / "report.json").write_text("[1, 2]")
    with pytest.raises(CaiError, match="not a JSON object"):
        PolicyEvalReport.read(tmp_path)
    assert PolicyEvalReport.read(tmp_path / "missing") is None
    # The viewer still opens the page and says what is wrong.
    from starlette.testclient import TestClient

    from cai.view import create_app

    folder = _eval_folder(tmp_path / "run", bad)
    page = TestClient(create_app([folder.parent]), base_url="http://127.0.0.1").get("/run/0/eval")
    assert page.status_code == 200 and 'id="report-error"' in page.text


def test_eval_report_schema_conditions_in_report_and_viewer(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from cai.report import write_report
    from cai.view import create_app

    rates = {"plain": {"base": {"pattern": {"unsafe_compliance": 0.5, "safe_over_refusal": 0.25}}},
             "jb-roleplay": {"base": {"pattern": {"unsafe_compliance": 1.0,
                                                  "safe_over_refusal": 0.0}}}}
    report = {**_old_report(), "schema_version": SCHEMA_VERSION,
              "benchmark": {"format": "xstest", "path": "x.csv", "safe": 4, "unsafe": 2},
              "conditions": [{"name": "plain", "kind": "plain"},
                             {"name": "jb-roleplay", "kind": "wrapper", "template": "{prompt}"}],
              "by_condition": rates}
    _eval_folder(tmp_path, report)
    md = write_report(tmp_path).read_text()
    assert "| jb-roleplay | base | 1.000 | 0.000 |" in md and "| plain | base | 0.500 | 0.250 |" in md
    assert "Benchmark `xstest`" in md
    page = TestClient(create_app([tmp_path]), base_url="http://127.0.0.1").get("/run/0/eval").text
    assert 'id="conditions"' in page and "jb-roleplay" in page and "50.0 %" in page


def test_eval_report_schema_pipeline_reads_it(tiny_model: Path, tmp_path: Path) -> None:
    import yaml

    from cai.pipeline import _eval_summary, load_pipeline_config, plan

    from .conftest import ROOT

    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.update(model=str(tiny_model), feedback_model=f"hf:{tiny_model}", out=str(tmp_path / "run"))
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(data))
    steps = plan(load_pipeline_config(cfg))
    assert _eval_summary(steps) is None  # no evaluation has run
    _eval_folder(tmp_path / "run", _old_report())
    summary = _eval_summary(steps)
    assert summary["schema_version"] == 1 and summary["conditions"] == []
    assert summary["elo"] == {"base": 1000.0, "sl-cai": 1061.5}
    bad = _old_report()
    del bad["players"]
    (tmp_path / "run" / "eval" / "report.json").write_text(json.dumps(bad))
    with pytest.raises(CaiError, match="players"):
        _eval_summary(steps)
