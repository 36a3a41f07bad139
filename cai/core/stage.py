"""The stage contract: every stage — data, training, evaluation — is registered once here.

A stage is a config dataclass, a run function, its typed inputs (config fields and the
kind of thing each holds) and outputs. The CLI builds its commands from this registry and
the pipeline wires its steps from the declarations, so neither keeps its own list.

What every stage shares is written once:
- `StageDir` (in `cai.core.folders`, re-exported here) claims an output folder for one
  stage and locks it, so a second run writing the same folder at the same time is refused;
- `run_chunks` (in `cai.core.chunks`, re-exported) is the resume → chunk → append loop
  over work not yet on disk;
- `write_manifest` records the resolved config, the upstream manifests' data hashes and
  the constitution stamp (inherited from upstream when the stage has none of its own), so a
  trained model can be traced back to the constitution version and data that made it; it
  writes through the versioned schema `cai.core.manifest.Manifest`, the one that
  `read_manifest` reads back.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.chunks import Engine, EngineFields, run_chunks
from cai.core.errors import CaiError
from cai.core.folders import (
    LOCK,
    MANIFEST,
    StageDir,
    check_out_over_inputs,
    claim_dir,
    lock_dir,
    read_manifest,
    spec_parts,
    spec_target,
    stage_name,
)
from cai.core.manifest import SCHEMA_VERSION, Manifest
from cai.core.records import (
    cai_version,
    file_sha256,
    git_revision,
    now,
    write_json_atomic,
    write_text_atomic,
)


@dataclass(frozen=True)
class Input:
    """A config field naming something a stage reads (data, a model, a reward), typed by
    what it holds: the manifest's `upstream` lists every declared input, the output folder
    may not lie over one, and the pipeline splits the prompt sets (kinds "...-prompts") a
    training stage and the evaluation both read. Which step feeds it in a pipeline is the
    recipe's to say (`cai.recipe`)."""

    field: str
    """The config field holding it (a path, a model spec, or a `name=spec,...` list)."""
    kind: str
    """What it holds: "sl-data", "labels", "policy", "reward", "base-model", "judge-model",
    "red-team-prompts", ... (an `Output` of the same kind is what a stage hands on);
    "constitution": a constitution file, recorded as the manifest's constitution stamp
    rather than as an upstream entry."""
    model: bool = False
    """A model (or a reward or judge spec): its upstream entry also records the model's
    identity (spec without speed options, weights hash)."""


@dataclass(frozen=True)
class Output:
    """Something a stage leaves in its folder for later stages to read."""

    kind: str
    """What it is: the recipe names a step's output by it (`cai.recipe.From`)."""
    file: str | None = None
    """The file inside the folder; None: the folder itself (a data folder, a model)."""
    prefix: str = ""
    """How a reader names it: "pm:" makes a PM folder a reward spec."""
    player: str | None = None
    """Its name in an evaluation's list of models ("sl-cai", "rl-cai")."""

    def value(self, folder: Path) -> str:
        """The config value that reads this output of a step written to `folder`."""
        return self.prefix + str(folder / self.file if self.file else folder)


@dataclass(frozen=True)
class Stage:
    """One registered stage."""

    name: str
    """Its one name: registry key, manifest `stage`, folder owner, and (for a pipeline
    stage) its section and folder in a pipeline run: "sl", "sft", "label", "pm", "rl",
    "dpo", "eval" (the policy evaluation), "eval-labeler", ..."""
    config: type
    """The stage's config dataclass (fields become CLI flags and YAML keys)."""
    run: Callable[[Any], dict[str, Any]]
    """Run (or resume) the stage from a config; returns its manifest."""
    help: str
    """One line for `--help`."""
    inputs: tuple[Input | str, ...] = ()
    """What it reads (a bare string: a data file field of no particular kind)."""
    outputs: tuple[Output | str, ...] = ()
    """What it leaves for later stages (a bare string: a file no stage reads)."""
    positional: tuple[str, ...] = ()
    """Config fields also accepted as positional CLI arguments."""
    command: str = ""
    """The words after `cai` that run it ("train pm", "eval policies"); empty: its name.
    How the command line spells it, grouped as users type it, not a name of the stage."""
    pipeline: bool = False
    """A step of the method's recipe (`cai.recipe`), run by the pipeline under its name."""
    constitution_parts: tuple[str, ...] = ()
    """The constitution sections it reads ("sl"; "rl"; "rl" and "helpfulness"): a pipeline
    reruns it when one of them changes, and only then (training stages read none)."""

    @property
    def group(self) -> str | None:
        """Its command group ("train", "eval"), or None for a top-level command."""
        words = (self.command or self.name).split()
        return words[0] if len(words) > 1 else None

    @property
    def reads(self) -> tuple[Input, ...]:
        return tuple(i if isinstance(i, Input) else Input(i, "file") for i in self.inputs)

    @property
    def writes(self) -> tuple[Output, ...]:
        return tuple(o if isinstance(o, Output) else Output(o, o) for o in self.outputs)


REGISTRY: dict[str, Stage] = {}

# The one list of stages: the modules that register them, in the order the CLI lists them
# (the method's order; a pipeline follows `cai.recipe.RECIPE`). The CLI and the pipeline
# import them all.
STAGE_MODULES = (
    "cai.sl",
    "cai.train.sft",
    "cai.label",
    "cai.train.pm",
    "cai.train.rl",
    "cai.train.dpo",
    "cai.evaluate.policies",
    "cai.evaluate.labeler",
    "cai.evaluate.constitutions",
    "cai.evaluate.known_answer_run",
)


_RUNS: dict[str, Callable[[Any], dict[str, Any]]] = {}  # stage name -> its unguarded run


def register(stage: Stage) -> Stage:
    """Add a stage; its registered `run` first refuses an output folder over an input."""
    if stage.name in _RUNS and _RUNS[stage.name] is not stage.run:
        raise RuntimeError(f"stage {stage.name!r} registered twice")
    names = {f.name for f in dataclasses.fields(stage.config)}
    bad = [i.field for i in stage.reads if i.field not in names]
    if bad:
        raise RuntimeError(f"stage {stage.name!r} declares input {bad[0]!r}, not a field of "
                           f"{stage.config.__name__}")
    _RUNS[stage.name] = stage.run
    reads = tuple(i.field for i in stage.reads)
    REGISTRY[stage.name] = dataclasses.replace(stage, run=_guarded(stage.run, reads))
    return REGISTRY[stage.name]


def _guarded(run: Callable[[Any], dict[str, Any]], reads: Sequence[str]
             ) -> Callable[..., dict[str, Any]]:
    def run_stage(cfg: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if getattr(cfg, "out", None):
            check_out_over_inputs(cfg.out, cfg, reads)
        return run(cfg, *args, **kwargs)

    run_stage.__doc__, run_stage.__name__ = run.__doc__, run.__name__
    run_stage.__wrapped__ = run  # type: ignore[attr-defined]
    return run_stage


def load_registry() -> dict[str, Stage]:
    """Import every stage module so the registry is complete, in `STAGE_MODULES` order
    (whichever module another imported first)."""
    for mod in STAGE_MODULES:
        importlib.import_module(mod)
    rank = {m: i for i, m in enumerate(STAGE_MODULES)}
    ordered = sorted(REGISTRY.values(),
                     key=lambda st: rank.get(_RUNS[st.name].__module__, len(rank)))
    REGISTRY.clear()
    REGISTRY.update((st.name, st) for st in ordered)
    return REGISTRY


def finished_run(out: Path, cfg: Any, stage: str) -> dict[str, Any] | None:
    """The manifest of a finished training run of `stage` with exactly this config (its
    saved model folder present), so a rerun returns it instead of training again."""
    m = read_manifest(out) if (out / MANIFEST).is_file() else None
    if not m or m.stage != stage or getattr(cfg, "force", False):
        return None
    want = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    want.pop("force", None)
    have = {k: v for k, v in m.config.items() if k != "force"}
    if have != want or not (out / "config.json").is_file() \
            or not any(out.glob("*.safetensors")):
        return None
    if _python_edited(out, cfg):  # trained under another version of a python: function
        return None
    return m.as_dict()


def _python_edited(out: Path, cfg: Any) -> bool:
    """Whether a `python:` file the run calls changed since `run_config.json` recorded it."""
    from cai.core.pyfunc import changed_sources, python_sources

    try:
        recorded = json.loads((out / "run_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    then = recorded.get("python_sources") if isinstance(recorded, dict) else None
    return bool(then) and bool(changed_sources(then, python_sources(cfg)))


# --------------------------------------------------------------------------- manifests


def _json_safe(obj: Any) -> Any:
    """NaN and infinities become null: manifest.json must stay valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def upstream(config: Any, inputs: Sequence[Input]) -> dict[str, Any]:
    """For each input (each model of a `name=spec` list as `field.name`): its path or spec,
    the upstream stage, its data hash and constitution when a stage wrote it, a file's own
    hash, and a model's identity. A constitution input is left to the constitution stamp."""
    out: dict[str, Any] = {}
    for inp in inputs:
        name = inp.field
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if inp.kind == "constitution":
            continue
        if isinstance(value, list):  # several weighted sources
            from cai.core.data import split_weight

            for i, spec in enumerate(v for v in value if isinstance(v, str)):
                out[f"{name}.{i}"] = _upstream_entry(inp, split_weight(spec)[0])
            continue
        if not value or value == "-" or not isinstance(value, str):
            continue
        for player, spec in spec_parts(value):
            out[f"{name}.{player}" if player else name] = _upstream_entry(inp, spec)
    return out


def _upstream_entry(inp: Input, spec: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": spec}
    target = spec_target(spec)
    if target is not None and target.is_file():
        entry["sha256"] = file_sha256(target)
    m = read_manifest(target) if target is not None and target.exists() else None
    if m:
        entry["stage"] = m.stage
        entry["data_sha256"] = m.data.sha256
        entry["constitution"] = m.constitution
    if inp.model:
        from cai.core.models import model_identity
        from cai.core.reward_spec import model_of

        try:
            entry["identity"] = model_identity(model_of(spec))
        except (CaiError, OSError, ValueError):
            pass  # a reward spec that is no model; the manifest of a finished run still gets written
    return entry


def inherited_constitution(ups: dict[str, Any]) -> dict[str, Any] | None:
    """The constitution stamp of the upstream data, when a stage (training) has none."""
    stamps = [u["constitution"] for u in ups.values() if u.get("constitution")]
    return stamps[0] if stamps else None


def write_manifest(root: str | Path, stage: str, *, config: Any, inputs: Sequence[str] = (),
                   constitution: dict[str, Any] | None = None,
                   models: dict[str, str] | None = None, counts: dict[str, Any] | None = None,
                   started: float | None = None, timings: dict[str, float] | None = None,
                   data: Sequence[str] = ("data.jsonl",),
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `manifest.json` for any stage (through the `Manifest` schema, with its
    `schema_version`) and return it as a dict; the config in it is enough to rerun the stage.

    `upstream` lists every input the stage declared at registration (data and models:
    policy, reference, reward; a model input with its identity) besides any `inputs` given
    here; a stage without a constitution of its own inherits the first upstream stamp,
    through models as well as data (the RL policy from its SFT model and its PM)."""
    root = Path(root)
    declared = (REGISTRY[stage].reads
                if stage in REGISTRY and dataclasses.is_dataclass(config) else ())
    named = {i.field: i for i in (*(Input(f, "file") for f in inputs), *declared)}
    ups = upstream(config, tuple(named.values()))
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    timings = dict(timings or {})
    if started is not None:
        timings.setdefault("total", round(time.time() - started, 2))
    files = {name: file_sha256(root / name) for name in data if (root / name).exists()}
    first = next(iter(files), None)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "cai_version": cai_version(),
        "git": git_revision(),
        "written": now(),
        "config": cfg,
        "constitution": constitution or inherited_constitution(ups),
        "models": models or {},
        "upstream": ups,
        "counts": counts or {},
        "timings_s": timings,
        "data": {"file": first, "records": _count_lines(root / first) if first else 0,
                 "sha256": files.get(first) if first else None, "files": files},
        **(extra or {}),
    }
    as_json = json.loads(json.dumps(_json_safe(manifest), default=str))  # as it is written
    manifest = Manifest.parse(as_json, root / MANIFEST).as_dict()
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def _count_lines(path: Path) -> int:
    if path.suffix != ".jsonl":
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def write_card(root: str | Path, title: str, summary: str, manifest: dict[str, Any]) -> None:
    """A short dataset (or model) card: what it is, how it was made, how to load it."""
    root = Path(root)
    c = manifest.get("constitution") or {}
    git = manifest.get("git") or {}
    lines = [
        f"# {title}", "", summary, "",
        "## Provenance", "",
        f"- stage: `{manifest['stage']}`",
        f"- constitution: `{c.get('name')}` v{c.get('version')} (`{c.get('hash')}`)"
        if c else "- constitution: none",
        *[f"- {role} model: `{spec}`" for role, spec in manifest.get("models", {}).items()],
        *[f"- input `{k}`: `{u['path']}`" + (f" (stage `{u['stage']}`)" if u.get("stage") else "")
          for k, u in manifest.get("upstream", {}).items()],
        f"- records: {manifest['data']['records']}",
        f"- cai {manifest['cai_version']}, git {git.get('commit')}"
        f"{' (dirty)' if git.get('dirty') else ''}",
        "", "## Counts", "",
        *[f"- {k}: {v}" for k, v in manifest.get("counts", {}).items()],
    ]
    if manifest["data"].get("file", "").endswith(".jsonl"):
        lines += ["", "## Load", "", "```python", "from cai.core.records import to_dataset",
                  f"ds = to_dataset('{root / manifest['data']['file']}')", "```"]
    lines += ["", "The exact configuration is in `manifest.json`; rerunning it with the same",
              "output folder resumes and reproduces this.", ""]
    write_text_atomic(root / "README.md", "\n".join(lines))


__all__ = ["Stage", "Input", "Output", "StageDir", "Engine", "EngineFields", "REGISTRY", "register",
           "load_registry", "run_chunks", "finished_run", "write_manifest", "write_card",
           "read_manifest", "upstream", "claim_dir", "lock_dir", "check_out_over_inputs", "LOCK",
           "MANIFEST", "spec_parts", "spec_target", "stage_name"]
