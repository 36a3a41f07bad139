"""The recipe (`cai.recipe`) is what a pipeline runs, and planning a run writes nothing."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from cai.core.stage import REGISTRY, load_registry
from cai.pipeline import PipelineConfig, load_pipeline_config, plan, run_pipeline
from cai.recipe import RECIPE, From, Players

from .conftest import ROOT

METHOD = ("sl", "sft", "label", "pm", "rl", "dpo", "eval")


def _config(tmp_path: Path, **over) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.update(out=str(tmp_path / "run"), **over)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_plan_writes_nothing_pure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake would land here
    cfg = load_pipeline_config(_config(tmp_path, rounds=2))
    before_files, before_cfg = _tree(tmp_path), copy.deepcopy(vars(cfg))
    planned = plan(cfg)
    assert _tree(tmp_path) == before_files  # no prompt split, no run folder, no lock
    assert vars(cfg) == before_cfg  # nothing set or stashed on the config
    # The split is the plan's: its record and the files the run will write.
    split = planned.prompt_split["sets"]["red_team"]
    files = {Path(split["train_file"]), Path(split["eval_file"])}
    assert set(planned.prompt_files) == files and not any(p.exists() for p in files)
    ev = next(s for s in planned if s.is_eval)
    assert ev.config.red_team == split["eval_file"]
    assert {s.config.prompts for s in planned if s.stage in ("sl", "label", "rl")} == {
        split["train_file"]}
    planned.write_prompt_files()
    assert all(p.is_file() for p in files)
    assert plan(cfg).prompt_files == planned.prompt_files  # planning again: the same split


def test_recipe_order_and_handoffs_are_what_the_pipeline_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = load_registry()
    assert RECIPE.order == METHOD == tuple(PipelineConfig().stages)
    assert {n for n, st in registry.items() if st.pipeline} == set(METHOD)
    for rs in RECIPE.steps:  # every wired field is a field of the stage it configures
        names = {f.name for f in dataclasses.fields(registry[rs.stage].config)}
        assert set(rs.inputs) <= names, rs.stage
    cfg = load_pipeline_config(_config(tmp_path, eval_fraction=0))
    steps = {s.key: s for s in plan(cfg)}
    assert list(steps) == list(METHOD)
    root = tmp_path / "run"

    def handed(stage: str, field: str) -> set[str]:
        """The steps a field of a stage reads, by the recipe."""
        out: set[str] = set()
        for src in RECIPE[stage].inputs[field]:
            if isinstance(src, From | Players):
                out |= {s for s in src.stages if s in steps}
        return out

    # What each step hands the next, by name: sft's model → label's and rl's policy, label's
    # preferences → pm and dpo, pm → rl's reward, every policy → eval.
    assert handed("sft", "data") == {"sl"} and steps["sft"].config.data == str(root / "sl")
    assert handed("label", "policy") == {"sft", "rl"}
    assert steps["label"].config.policy == str(root / "sft") and steps["label"].deps == ["sft"]
    assert steps["rl"].config.model == str(root / "sft")
    assert steps["rl"].config.reward == f"pm:{root / 'pm'}" and steps["rl"].deps == ["sft", "pm"]
    assert steps["pm"].config.preferences == str(root / "label") == steps["dpo"].config.preferences
    assert steps["pm"].config.pairs == str(root / "sl")
    assert steps["dpo"].config.model == str(root / "sft") and steps["dpo"].deps == ["label", "sl", "sft"]
    assert steps["eval"].config.models == (f"base={cfg.model},sl-cai={root / 'sft'},"
                                           f"rl-cai={root / 'rl'},dpo={root / 'dpo'}")
    assert steps["eval"].deps == ["sft", "rl", "dpo", "pm"]
    # The pipeline runs exactly these steps, in this order, with these configs.
    ran: list[tuple[str, dict]] = []
    for name in METHOD:
        def fake(config, name=name):
            Path(config.out).mkdir(parents=True, exist_ok=True)
            ran.append((name, dataclasses.asdict(config)))
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(registry[name], run=fake))
    run_pipeline(cfg)
    assert ran == [(s.stage, dataclasses.asdict(s.config)) for s in steps.values()]
