"""Per-set evaluation bookkeeping: the pooled Elo's bootstrap resamples prompts within each
prompt set, and the pipeline's held-out check covers every eval prompt, not only the first
`limit` the evaluation answered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cai.evaluate.elo import bootstrap_intervals
from cai.evaluate.evidence import elo_block

from .conftest import ROOT


def _two_sets(n: int = 6) -> tuple[list, list]:
    """Set A: a beats b on every prompt; set B: b beats a on every prompt."""
    games, groups = [], []
    for s, p_a in (("A", 1.0), ("B", 0.0)):
        for k in range(n):
            games.append(("a", "b", p_a))
            groups.append((s, f"{s}{k}"))
    return games, groups


def test_elo_pooled_interval_resamples_within_each_set() -> None:
    games, groups = _two_sets()
    strata = [g[0] for g in groups]
    within = bootstrap_intervals(games, 200, 0, 0.05, ["a", "b"], groups, strata=strata)
    joint = bootstrap_intervals(games, 200, 0, 0.05, ["a", "b"], groups)
    # Within each set every prompt is alike, so every stratified resample is the data again;
    # resampling both sets jointly changes their mix, and the interval with it.
    assert within["b"][1] - within["b"][0] == pytest.approx(0.0, abs=1e-6)
    assert joint["b"][1] - joint["b"][0] > 50
    block = elo_block(games, groups, ["a", "b"], 200, 0)
    assert block["b"]["interval"] == pytest.approx(list(within["b"]), abs=1e-9)


def test_elo_one_stratum_is_the_plain_bootstrap() -> None:
    games, groups = _two_sets()
    one = bootstrap_intervals(games, 100, 3, 0.05, ["a", "b"], groups, strata=["x"] * len(games))
    plain = bootstrap_intervals(games, 100, 3, 0.05, ["a", "b"], groups)
    assert one == plain
    with pytest.raises(ValueError, match="two strata"):
        bootstrap_intervals(games, 10, 0, 0.05, ["a", "b"], [g[1][:1] for g in groups],
                            strata=[str(i % 2) for i in range(len(games))])


def test_heldout_overlap_reads_every_eval_prompt(tiny_model: Path, tmp_path: Path) -> None:
    from cai.core.data import load_prompts
    from cai.pipeline import heldout_overlap, load_pipeline_config, plan

    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.update(model=str(tiny_model), feedback_model=f"hf:{tiny_model}", out=str(tmp_path / "run"),
                eval_fraction=0)
    data.setdefault("eval", {})
    data["eval"] = {**(data["eval"] or {}), "limit": 1}
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump(data))
    steps = plan(load_pipeline_config(cfg))
    ev = next(s for s in steps if s.is_eval)
    sl = next(s for s in steps if s.stage == "sl")
    red = load_prompts(ev.config.red_team)
    assert len(red) >= 3
    sl.folder.mkdir(parents=True, exist_ok=True)
    # SL "read" the third red-team prompt: beyond the eval's limit of 1, still an eval prompt.
    (sl.folder / "data.jsonl").write_text(json.dumps({"prompt": red[2].prompt}) + "\n")
    rl = next((s for s in steps if s.stage == "rl"), None)
    rl_texts = ({it.prompt for it in load_prompts(rl.config.prompts, limit=rl.config.limit)}
                if rl else set())
    seen = {red[2].prompt} | rl_texts
    every = {it.prompt for n in ev.prompt_fields() for it in load_prompts(getattr(ev.config, n))}
    first = {it.prompt for n in ev.prompt_fields()
             for it in load_prompts(getattr(ev.config, n), limit=1)}
    assert heldout_overlap(steps) == len(seen & every) > len(seen & first)
    (sl.folder / "data.jsonl").write_text(json.dumps({"prompt": "not an eval prompt"}) + "\n")
    assert heldout_overlap(steps) == len(rl_texts & every)
