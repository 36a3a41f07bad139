"""`cai pipeline run CONFIG.yaml`: one config from a constitution to a trained, evaluated model.

The pipeline follows the recipe (`cai.recipe`): sl → sft → label → pm → rl and/or dpo →
eval, each in its own folder under the run, planned by `cai.planning.plan`. A stage is
skipped when its cache key matches the last run's: the key hashes the stage's resolved
config, the part of the constitution it reads (SL principles and examples for `sl`,
comparison principles for `label` and `eval`) and the data hashes of the stages it depends
on. So an edit to one comparison principle reruns label and everything after it, never sl
or sft. With `rounds: R > 1` the label → pm → rl loop repeats with the newest policy, each
round in its own folder.

Evaluation prompts are held out by construction: every prompt set that a training stage
(sl, label, rl) and the evaluation both read is split once, by a seeded hash of each
prompt's id, into `<run>/prompts/<set>.train.jsonl` and `<set>.eval.jsonl`; the training
stages get the train part, the evaluation the eval part (`cai.planning`); the run writes
those files first, `pipeline.json` records the split, and after the run it checks that no
eval prompt turned up in a training stage.

Nothing here runs a model itself: every stage is the same registered run function the
CLI calls, so a pipeline and a hand-run sequence of commands give the same records.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.config import from_dict, load_yaml_mapping, locate
from cai.core.errors import CaiError
from cai.core.records import write_json_atomic
from cai.core.reward_spec import PYTHON
from cai.core.stage import lock_dir, read_manifest
from cai.planning import Plan, Step, plan
from cai.recipe import RECIPE


def steps_order() -> tuple[str, ...]:
    """Step names in run order, the recipe's: sl, sft, label, pm, rl, dpo, eval."""
    return RECIPE.order


@dataclass
class PipelineConfig:
    """A run config: shared settings, then one mapping of overrides per stage."""

    name: str = "run"
    """Run name; the default output folder is runs/<name>."""
    out: str | None = None
    """Run folder (default runs/<name>); each stage writes a subfolder."""
    constitution: str = "harmless"
    """Constitution file or shipped name, used by every stage."""
    model: str = "embedded:smollm2-135m"
    """The helpful base model: answers in SL, is fine-tuned by SFT."""
    feedback_model: str = "embedded:smollm2-135m"
    """The judge of the label stage (the labeller); also the policy evaluation's judge
    unless `eval: {judge_model: SPEC}` gives it one of its own."""
    seed: int = 0
    """Seed given to every stage."""
    stages: list[str] = field(default_factory=lambda: list(steps_order()))
    """Stages to run, a subset of sl, sft, label, pm, rl, dpo, eval (in that order)."""
    rounds: int = 1
    """Iterated online training: label → pm → rl repeated with the newest policy."""
    sl_pairs_in_pm: bool = True
    """Train the PM on the SL pairs (revision ≻ initial) beside the AI labels; with a
    judge too small to give signal, the SL pairs are what the PM learns from."""
    eval_fraction: float = 0.25
    """Share of each prompt set that both a training stage (sl, label, rl) and the
    evaluation read, held out for the evaluation (split by a seeded hash of the prompt id);
    0 turns the split off, and the evaluation then sees training prompts."""
    split_seed: int = 0
    """Seed of that split; apart from `seed`, so a new training seed keeps the held-out set."""
    sl: dict[str, Any] = field(default_factory=dict)
    """Overrides of the sl stage's config (see `cai sl --help`)."""
    sft: dict[str, Any] = field(default_factory=dict)
    """Overrides of `cai train sft`."""
    label: dict[str, Any] = field(default_factory=dict)
    """Overrides of `cai label` (prompts, responses_per_prompt, judge: {principles: 4}, ...)."""
    pm: dict[str, Any] = field(default_factory=dict)
    """Overrides of `cai train pm`."""
    rl: dict[str, Any] = field(default_factory=dict)
    """Overrides of `cai train rl`."""
    dpo: dict[str, Any] = field(default_factory=dict)
    """Overrides of `cai train dpo`."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Overrides of `cai eval policies`."""

    def __post_init__(self) -> None:
        order = steps_order()
        bad = [s for s in self.stages if s not in order]
        if bad:
            raise CaiError(f"unknown stage {bad[0]!r}; known: {', '.join(order)}", field="stages")
        self.stages = [s for s in order if s in self.stages]
        if self.rounds < 1:
            raise CaiError("must be at least 1", field="rounds")
        if not 0 <= self.eval_fraction < 1:
            raise CaiError("must be in [0, 1)", field="eval_fraction")
        for s in order:
            if not isinstance(getattr(self, s), dict):
                raise CaiError("expected a mapping of that stage's options", field=s)

    @property
    def root(self) -> Path:
        return Path(self.out or f"runs/{self.name}")


def load_pipeline_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    p = Path(path)
    data = load_yaml_mapping(p, "pipeline config")
    try:
        return from_dict(PipelineConfig, {**data, **(overrides or {})}, str(p))
    except CaiError as err:
        raise locate(err, p) from None


def _record_prompts(folder: Path, names: tuple[str, ...]) -> set[str]:
    """Prompt texts (the user turns) of the examples a stage hands to training.

    The derived files, not the stage's store: a store keeps records of prompts a previous
    split gave it, which no training stage reads, and counting them would report
    contamination the training data does not contain."""
    from cai.core.data import read_jsonl

    out: set[str] = set()
    for name in names:
        for row in read_jsonl(folder / name, lenient=True):
            chat = row.get("prompt", row.get("messages"))
            if isinstance(chat, str):
                out.add(chat)
            elif isinstance(chat, list):
                out |= {m.get("content") for m in chat if isinstance(m, dict)
                        and m.get("role") == "user" and isinstance(m.get("content"), str)}
    return out


def heldout_overlap(steps: Iterable[Step]) -> int | None:
    """How many of the evaluation's prompts a training stage read: from the sl and label
    records, and the prompts rl was given. Every prompt of every eval set counts, not only
    the first `limit` the eval stage answered (a held-out set is held out whole), and a
    benchmark file given to the evaluation counts too. None when the run has no evaluation."""
    from cai.core.benchmarks import load_benchmark
    from cai.core.data import load_prompts

    ev = next((s for s in steps if s.is_eval), None)
    if ev is None:
        return None
    eval_texts = {it.prompt for name in ev.prompt_fields()
                  for it in load_prompts(getattr(ev.config, name))}
    if getattr(ev.config, "prompts", None):
        eval_texts |= {b.prompt for b in load_benchmark(ev.config.prompts)}
    seen: set[str] = set()
    for step in steps:
        rs = RECIPE[step.stage]
        seen |= _record_prompts(step.folder, rs.training_files)
        if rs.training_prompts:
            seen |= {it.prompt for it in load_prompts(getattr(step.config, rs.training_prompts),
                                                      limit=step.config.limit)}
    return len(eval_texts & seen)


def _eval_summary(steps: Iterable[Step]) -> dict[str, Any] | None:
    """The policy evaluation's headline numbers for pipeline.json, read through the
    report's schema (`cai.core.eval_report`); None when the run has no policy evaluation."""
    from cai.core.eval_report import PolicyEvalReport

    ev = next((s for s in steps if s.stage == "eval"), None)
    rep = PolicyEvalReport.read(ev.folder) if ev is not None else None
    if rep is None:
        return None
    return {"schema_version": rep.schema_version,
            "elo": {p: e.rating for p, e in rep.elo.get("overall", {}).items()},
            "over_refusal": rep.over_refusal,
            "conditions": [c.name for c in rep.conditions]}


# --------------------------------------------------------------------------- caching


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _constitution_part(path: str, parts: tuple[str, ...]) -> str:
    from cai.constitution import load

    c = load(path).to_json()
    return _digest(c.get(parts[0]) if len(parts) == 1 else [c.get(p) for p in parts])


def cache_key(step: Step, done: dict[str, dict[str, Any]]) -> str:
    """Hash of the step's resolved config, its part of the constitution, and the data
    hashes of the steps it depends on."""
    cfg = dataclasses.asdict(step.config)
    parts: dict[str, Any] = {"stage": step.stage, "config": {k: v for k, v in cfg.items()
                                                              if k != "constitution"}}
    if step.spec and step.spec.constitution_parts:
        parts["constitution"] = _constitution_part(step.config.constitution,
                                                   step.spec.constitution_parts)
    parts["deps"] = {d: done[d]["data"] for d in step.deps}
    # A prompt file's content, not just its path: a new split reruns what read the old one.
    files = {n: getattr(step.config, n) for n in step.prompt_fields()
             if getattr(step.config, n, None) and Path(getattr(step.config, n)).is_file()}
    if files:
        from cai.core.records import file_sha256

        parts["prompt_files"] = {n: file_sha256(Path(v)) for n, v in sorted(files.items())}
    # A python: judge or reward by its source's hash: an edited function reruns the stage.
    funcs = {n: str(v) for n, v in cfg.items() if isinstance(v, str) and v.startswith(PYTHON)}
    if funcs:
        from cai.core.models import model_identity

        parts["functions"] = {n: model_identity(v) for n, v in sorted(funcs.items())}
    return _digest(parts)


def _data_hashes(folder: Path) -> dict[str, Any] | None:
    m = read_manifest(folder)
    return m.data.files if m else None


# --------------------------------------------------------------------------- running


def _say(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def _clear(folder: Path) -> None:
    """A training stage whose inputs changed starts over: old checkpoints would resume
    training on data that no longer exists."""
    if folder.exists():
        trash = folder.with_name(folder.name + ".stale")
        shutil.rmtree(trash, ignore_errors=True)
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def run_pipeline(cfg: PipelineConfig, start: str | None = None, until: str | None = None,
                 force: bool = False, where: str = "pipeline") -> dict[str, Any]:
    """Run (or resume) every step; returns the run manifest (also `<run>/pipeline.json`)."""
    for name, value in (("from", start), ("until", until)):
        if value is not None and value not in cfg.stages:
            raise CaiError(f"{value!r} is not one of this run's stages: {', '.join(cfg.stages)}",
                           field=name)
    order = list(steps_order())
    if start and until and order.index(start) > order.index(until):
        raise CaiError(f"--from {start} comes after --until {until}: nothing would run",
                       field="from")
    try:  # every stage's config, and the prompt split, before anything is written
        steps = plan(cfg, where)
    except CaiError as err:
        raise locate(err, where) from None
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    lock_dir(root)  # one pipeline per run folder: a second is refused before pipeline.json
    steps.write_prompt_files()
    state_path = root / "pipeline.json"
    previous = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
    before = previous.get("steps", {})
    state: dict[str, Any] = {"config": dataclasses.asdict(cfg), "steps": dict(before),
                             "started": time.time(),
                             "prompt_split": copy.deepcopy(steps.prompt_split)}
    done: dict[str, dict[str, Any]] = {}
    t_run = time.time()
    for n, step in enumerate(steps, 1):
        if start and order.index(step.stage) < order.index(start):
            data = _data_hashes(step.folder)
            if data is None:
                raise CaiError(f"--from {start}: the earlier stage {step.key} has no finished "
                               f"output in {step.folder}; run it first", field="from")
            done[step.key] = {"data": data}
            continue
        if until and order.index(step.stage) > order.index(until):
            break
        key = cache_key(step, done)
        prev = before.get(step.key, {})
        data = _data_hashes(step.folder)
        if not force and prev.get("key") == key and data is not None and data == prev.get("data"):
            _say(f"{n}/{len(steps)} {step.key}: cached ({step.folder})")
            done[step.key] = {"data": data}
            state["steps"][step.key]["status"] = "cached"
            continue
        estimate = prev.get("seconds")
        _say(f"{n}/{len(steps)} {step.key}: running" +
             (f" (last run took {estimate:.0f} s)" if estimate else "") +
             f"; {time.time() - t_run:.0f} s elapsed")
        if step.spec.group == "train" and (prev.get("key") not in (None, key) or force):
            _clear(step.folder)
        # The key is recorded before the stage runs, so a killed run whose config then
        # changes is cleared too (its checkpoints would otherwise be refused, or resumed).
        state["steps"][step.key] = {**prev, "stage": step.stage, "key": key, "data": None,
                                    "status": "running", "folder": str(step.folder)}
        write_json_atomic(state_path, state)
        t0 = time.time()
        step.spec.run(step.config)
        seconds = round(time.time() - t0, 2)
        data = _data_hashes(step.folder) or {}
        done[step.key] = {"data": data}
        state["steps"][step.key] = {"stage": step.stage, "key": key, "data": data,
                                    "seconds": seconds, "status": "ran",
                                    "folder": str(step.folder)}
        write_json_atomic(state_path, state)  # a kill after this keeps the finished steps
        _say(f"{n}/{len(steps)} {step.key}: done in {seconds:.0f} s")
    if state["prompt_split"]:
        state["prompt_split"]["overlap"] = heldout_overlap(steps)
    summary = _eval_summary(steps)
    if summary:
        state["eval"] = summary
        _say("eval: overall Elo " + ", ".join(f"{k} {v:.0f}" for k, v in summary["elo"].items()))
    state["finished"] = time.time()
    state["seconds"] = round(time.time() - t_run, 2)
    write_json_atomic(state_path, state)
    from cai.report import write_report, write_report_html

    state["report"] = str(write_report(root))
    state["report_html"] = str(write_report_html(root))  # one file that opens offline
    write_json_atomic(state_path, state)
    _say(f"report: {state['report']}")
    return state





def run_demo(out: Path | None = None, config: Path | None = None) -> dict[str, Any]:
    """`cai demo`: this pipeline on `configs/demo.yaml` (the embedded model).

    The embedded model is far too small to critique or judge well; the demo shows that every
    stage runs, what each writes, and the report a real run produces.
    """
    path = config or Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_pipeline_config(path, {"out": str(out)} if out else None)
    return run_pipeline(cfg, where=str(path))


__all__ = ["PipelineConfig", "Plan", "Step", "load_pipeline_config", "plan", "run_pipeline",
           "cache_key", "run_demo"]
