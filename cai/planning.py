"""Planning a pipeline run: the recipe (`cai.recipe`) made into one config per step.

`plan()` is pure: it reads the run config, the stage registry and the prompt sets, and
returns a `Plan` (the steps, each with its config, folder and the steps it depends on, and
the held-out split of the prompt sets); it writes no file and changes nothing it is given.
Writing the split's prompt files is a step of the run (`Plan.write_prompt_files`, called by
`run_pipeline` once it holds the run folder).

Evaluation prompts are held out by construction: every prompt set that a training stage
(sl, label, rl) and the evaluation both read is split once, by a seeded hash of each
prompt's id, into `<run>/prompts/<set>.train.jsonl` and `<set>.eval.jsonl`; the training
steps are planned on the train part, the evaluation on the eval part.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.config import from_dict
from cai.core.errors import CaiError
from cai.core.stage import Output, Stage, load_registry
from cai.recipe import RECIPE, Players, Run, Source

PipelineConfig = Any
"""A `cai.pipeline.PipelineConfig` (not imported: the pipeline imports this module)."""


def stages() -> dict[str, Stage]:
    """The registered stages the recipe runs, by name, in the recipe's order."""
    registry = load_registry()
    return {name: registry[name] for name in RECIPE.order}


def _prompt_inputs(stage: Stage) -> tuple[str, ...]:
    """Config fields of a stage holding a prompt set (declared kinds "...-prompts")."""
    return tuple(i.field for i in stage.reads if i.kind.endswith("-prompts"))


@dataclass
class Step:
    """One stage to run: where, with which config, after which steps."""

    key: str
    """"sl", "label", or "round-2/label" for later rounds."""
    stage: str
    """The stage's name (sl, sft, ...: its `Stage.name`)."""
    config: Any
    deps: list[str]
    folder: Path
    spec: Stage | None = None
    """The registered stage it runs."""

    def prompt_fields(self) -> tuple[str, ...]:
        return _prompt_inputs(self.spec) if self.spec else ()

    @property
    def is_eval(self) -> bool:
        return bool(self.spec) and self.spec.group == "eval"


@dataclass(frozen=True)
class Plan:
    """A planned run: its steps in order and the held-out split of its prompt sets.

    Iterating a plan (or indexing it) gives its steps."""

    root: Path
    steps: tuple[Step, ...]
    prompt_split: dict[str, Any]
    """The split's record, as `pipeline.json` keeps it (sets, sizes, files, held-out ids)."""
    prompt_files: dict[Path, str] = field(default_factory=dict)
    """The split's files and their text, written by `write_prompt_files`."""

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> Step:
        return self.steps[i]

    def write_prompt_files(self) -> None:
        """Write the split's prompt files (an identical file is left as it is)."""
        from cai.core.records import write_text_atomic

        for path, text in self.prompt_files.items():
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, text)


def _build(stage: str, values: dict[str, Any], user: dict[str, Any], where: str,
           root: Path | None = None) -> Any:
    cls = stages()[stage].config
    names = {f.name for f in dataclasses.fields(cls)}
    wired = {k: v for k, v in values.items() if k in names}
    for k in user:  # the folder a stage writes or reads from another stage is the pipeline's
        if k == "out" or (root is not None and k in wired and str(root) in str(wired[k] or "")):
            raise CaiError(f"is wired by the pipeline (to {wired.get(k)}); remove it from the "
                           f"`{stage}:` section (set the run folder with `out:` at the top)",
                           where, f"{stage}.{k}")
    return from_dict(cls, {**wired, **user}, f"{where}: {stage}")


def _output(stage: Stage, kind: str) -> Output:
    return next(o for o in stage.writes if o.kind == kind)


def _source(src: Source, cfg: PipelineConfig, steps: list[Step], registry: dict[str, Stage]
            ) -> tuple[Any, list[str]]:
    """The value a source gives in this run (None: none) and the keys of the steps it reads."""
    if isinstance(src, str):
        return src, []
    if isinstance(src, Run):
        value = getattr(cfg, src.setting)
        return (None if value is None else src.prefix + str(value)), []
    if isinstance(src, Players):
        named: dict[str, tuple[Step | None, str]] = {"base": (None, getattr(cfg, src.base.setting))}
        for st in steps:
            if st.stage in src.stages:
                for out in registry[st.stage].writes:
                    if out.player:
                        named[out.player] = (st, out.value(st.folder))
        return (",".join(f"{n}={v}" for n, (_, v) in named.items()),
                [st.key for st, _ in named.values() if st])
    if src.only_if and not getattr(cfg, src.only_if):
        return None, []
    found = [st for st in steps if st.stage in src.stages]
    if found:
        st = found[0] if src.first else found[-1]
        return _output(registry[st.stage], src.output).value(st.folder), [st.key]
    if src.folder:
        name = src.stages[0]
        return _output(registry[name], src.output).value(cfg.root / name), []
    return None, []


def plan(cfg: PipelineConfig, where: str = "pipeline") -> Plan:
    """The steps of a run as the recipe wires them, and the held-out split of the prompts;
    writes nothing (see the module's docstring)."""
    registry = stages()
    root = cfg.root
    base = {"constitution": cfg.constitution, "seed": cfg.seed}
    steps: list[Step] = []
    for key, name in RECIPE.sequence(cfg.stages, cfg.rounds):
        rs = RECIPE[name]
        values: dict[str, Any] = {**base, "out": str(root / key)}
        deps: list[str] = []
        for name_, sources in rs.inputs.items():
            for src in sources:
                value, used = _source(src, cfg, steps, registry)
                if value is not None:
                    values[name_] = value
                    deps += [d for d in used if d not in deps]
                    break
        for name_, settings in rs.unset.items():
            if name_ not in values:
                values.update(settings)
        conf = _build(name, values, getattr(cfg, name), where, root)
        steps.append(Step(key, name, conf, deps, root / key, registry[name]))
    split, files, moved = split_prompts(cfg, steps, where)
    for i, st in enumerate(steps):
        if st.key in moved:
            steps[i] = dataclasses.replace(st, config=dataclasses.replace(st.config, **moved[st.key]))
    return Plan(root, tuple(steps), split, files)


# --------------------------------------------------------------------------- held-out prompts


def split_prompts(cfg: PipelineConfig, steps: list[Step], where: str = "pipeline"
                  ) -> tuple[dict[str, Any], dict[Path, str], dict[str, dict[str, str]]]:
    """Split each prompt set read by a training step and by the evaluation: returns the
    split's record (kept in `pipeline.json`), the text of each part's file under
    `<run>/prompts/`, and per step key the config fields to point at those files."""
    from cai.core.data import load_prompts
    from cai.core.records import file_sha256
    from cai.core.resources import resolve
    from cai.core.splits import held_out

    record: dict[str, Any] = {"seed": cfg.split_seed, "eval_fraction": cfg.eval_fraction,
                              "by": "prompt id", "sets": {}}
    files: dict[Path, str] = {}
    moved: dict[str, dict[str, str]] = {}
    uses: dict[Path, dict[str, list[tuple[Step, str]]]] = {}
    for step in steps:
        for name in step.prompt_fields():
            value = getattr(step.config, name, None)
            if value:
                side = "eval" if step.is_eval else "train"
                path = resolve(str(value), "prompts", announce=False).resolve()
                uses.setdefault(path, {"train": [], "eval": []})[side].append((step, name))
    if cfg.eval_fraction == 0:
        return record, files, moved
    folder = cfg.root / "prompts"
    stems: set[str] = set()
    for path, by in uses.items():
        if not by["train"] or not by["eval"]:
            continue  # read by one side only: nothing to hold out
        text_field = next((getattr(st.config, "text_field", "prompt") for st, _ in by["train"]),
                          "prompt")
        items = load_prompts(path, text_field)
        held = held_out([it.id for it in items], cfg.eval_fraction, cfg.split_seed)
        if not held:
            raise CaiError(f"eval_fraction {cfg.eval_fraction} of the {len(items)} prompts of "
                           f"{path} holds out none for the evaluation "
                           f"({', '.join(sorted({st.key for st, _ in by['eval']}))}); raise "
                           "eval_fraction, give more prompts, or set eval_fraction: 0 to "
                           "evaluate on training prompts", where, "eval_fraction")
        stem = path.stem if path.stem not in stems else f"{path.stem}-{file_sha256(path)[7:15]}"
        stems.add(stem)
        parts = {}
        for side in ("train", "eval"):
            part = [it for it in items if (it.id in held) == (side == "eval")]
            rows = [{"id": it.id, "prompt": it.prompt, **({text_field: it.prompt}
                    if text_field != "prompt" else {}), "category": it.category} for it in part]
            parts[side] = folder / f"{stem}.{side}.jsonl"
            files[parts[side]] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            for st, name in by[side]:
                moved.setdefault(st.key, {})[name] = str(parts[side])
        record["sets"][stem] = {
            "source": str(path), "sha256": file_sha256(path), "train": len(items) - len(held),
            "eval": len(held), "train_file": str(parts["train"]), "eval_file": str(parts["eval"]),
            "train_stages": sorted({f"{st.key}.{n}" for st, n in by["train"]}),
            "eval_stages": sorted({f"{st.key}.{n}" for st, n in by["eval"]}),
            "eval_ids": sorted(held)}
    return record, files, moved


__all__ = ["Plan", "Step", "plan", "split_prompts", "stages"]
