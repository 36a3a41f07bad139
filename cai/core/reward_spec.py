"""Reward specs: what a `reward` (or monitor) value names, parsed in one place.

    pm:PATH                 a preference-model folder saved by `cai train pm` (a bare folder too)
    judge:MODELSPEC         a model asked for a 1–10 rating under sampled RL principles
    python:MODULE:FUNCTION  a Python function `fn(prompt, response) -> float`
    python:FILE.py:FUNCTION

The prefixes live here and nowhere else, so every reader (the RL reward, its monitors,
best-of-k scoring, the memory plan, the pipeline's wiring and manifests) splits a spec the
same way. `python:` also names a function *judge* among model specs: `cai.core.models`
and `cai.core.pyfunc` ask `is_python_spec` rather than spelling the prefix themselves.

The shape of a `python:` spec (`split_spec`) is checked here too, so this module needs
nothing but `cai.core.errors`. Only shapes are checked here; whether a folder exists or a
function imports is for the code that loads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cai.core.errors import CaiError

PM = "pm:"
JUDGE = "judge:"
PYTHON = "python:"
KINDS = ("pm", "judge", "python")

_FOLDER_HINT = "give pm:PATH to a `cai train pm` folder, judge:MODELSPEC or python:FILE.py:FUNCTION"


@dataclass(frozen=True)
class RewardSpec:
    """One reward spec, split: `kind` is "pm", "judge" or "python"; `target` is what follows
    the prefix (the PM folder, the judge's model spec, `MODULE:FUNCTION`); `text` is the spec
    as given, stripped. A bare folder is a "pm" spec whose target is the whole text."""

    kind: str
    target: str
    text: str

    @property
    def path(self) -> Path:
        """The preference-model folder (kind "pm" only)."""
        if self.kind != "pm":
            raise CaiError(f"{self.text!r} names no preference-model folder", field="reward")
        return Path(self.target).expanduser()


def is_python_spec(spec: str) -> bool:
    """Whether a spec (reward or model) names a Python function."""
    return spec.strip().startswith(PYTHON)


def reward_kind(spec: str) -> str:
    """"pm", "judge" or "python" by the spec's prefix; never raises (anything unprefixed,
    the empty string included, is a PM folder)."""
    return _split(spec.strip())[0]


def model_of(spec: str) -> str:
    """The model spec inside a reward or model spec, for identities: the PM folder of
    `pm:PATH`, the model of `judge:MODEL`; a `python:` spec or a plain model spec as is."""
    kind, target = _split(spec)
    return spec if kind == "python" else target


def _split(text: str) -> tuple[str, str]:
    if text.startswith(PYTHON):
        return "python", text[len(PYTHON):]
    if text.startswith(JUDGE):
        return "judge", text[len(JUDGE):]
    return "pm", text.removeprefix(PM)


_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def split_spec(spec: str, field: str = "model") -> tuple[str, str]:
    """`python:TARGET:FUNCTION` → (TARGET, FUNCTION); one clear error for any other shape."""
    raw = spec.strip()
    target, sep, name = raw[len(PYTHON):].rpartition(":")
    if "?" in raw:
        raise CaiError(f"{raw}: a python spec takes no ?options", field=field)
    if not sep or not target or not name.isidentifier():
        raise CaiError(f"{raw!r} is not python:MODULE:FUNCTION or python:path/to/file.py:FUNCTION",
                       field=field)
    if not is_file_target(target) and not _MODULE.match(target):
        raise CaiError(f"{raw}: {target!r} is neither a module name nor a .py file", field=field)
    return target, name


def is_file_target(target: str) -> bool:
    """Whether the target of a `python:` spec is a file (else a module name)."""
    return target.endswith(".py") or "/" in target or "\\" in target


def parse_reward_spec(spec: str, field: str = "reward") -> RewardSpec:
    """Split a reward spec; `CaiError` (naming `field`) for an empty spec, a `pm:` without a
    folder, a `judge:` without a model or a `python:` spec of another shape than
    `python:TARGET:FUNCTION`."""
    text = spec.strip()
    kind, target = _split(text)
    if kind == "judge" and not target:
        raise CaiError("judge: needs a model spec, e.g. judge:embedded:smollm2-135m", field=field)
    if kind == "python":
        split_spec(text, field)
    if kind == "pm" and not target:
        raise CaiError(f"reward folder not found: {target!r} ({_FOLDER_HINT})", field=field)
    return RewardSpec(kind, target, text)


def folder_not_found(path: str | Path, field: str = "reward") -> CaiError:
    """The error for a `pm:` spec whose folder does not exist."""
    return CaiError(f"reward folder not found: {str(path)!r} ({_FOLDER_HINT})", field=field)


def pm_reward(folder: str | Path) -> str:
    """The reward spec of a preference-model folder."""
    return f"{PM}{folder}"


def judge_reward(model: str) -> str:
    """The reward spec of a rating judge."""
    return f"{JUDGE}{model}"


__all__ = ["PM", "JUDGE", "PYTHON", "KINDS", "RewardSpec", "is_python_spec", "reward_kind", "model_of",
           "split_spec", "is_file_target", "parse_reward_spec", "folder_not_found", "pm_reward",
           "judge_reward"]
