"""Programmatic judges and rewards: a Python function where a model would go.

Specs: `python:MODULE:FUNCTION` (a module importable from `sys.path`) or
`python:path/to/file.py:FUNCTION` (a file, loaded by path). A *judge* is called as
`fn(prompt, response_a, response_b, principle)` — `principle` is the principle's question
text — and returns the probability that `response_a` is the better answer. A *reward*
(`cai.train.rewards.PythonReward`) is called as `fn(prompt, response)` and returns a float.

Why a judge is a backend and not a separate label path: every stage that takes a feedback
model reaches it through `load_backend(spec)` and reads a label from the log-probs of "A"
and "B". `PythonJudge` answers `choice_logprobs` with log p for "A" and log(1 − p) for "B",
so the softmax over the two letters gives back p, the mass on the letters is 1, and the rest
— K sampled principles, both orders, the mean over principles, the flags, record ids and
manifests, Ray actors that rebuild the judge from its spec — is the code an LM judge runs.
Swapping a pair's responses swaps the questions asked, so the label becomes exactly 1 − p.
The judge reads the pair's parts from the request's `question` (set by the label planner),
never by parsing the rendered chat.

Identity: the spec plus the first 12 hex digits of the sha256 of the function's source file
(`python:judges.py:safe@0123456789ab`): editing the function changes every record id it
made, so a rerun labels afresh instead of reusing labels the old function gave.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cai.backends.base import (
    Chat,
    Generation,
    GenerationConfig,
    GenRequest,
    JudgeQuestion,
    ScoreRequest,
    ScoreResult,
    render_plain,
)
from cai.errors import CaiError
from cai.models import ModelSpec

PREFIX = "python:"
LOG_ZERO = -1000.0
"""The log-prob written for a probability of exactly 0: finite, so records stay valid
JSON, and exp() of it is 0.0, so the label reads back exactly 0 or 1."""
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_python_spec(spec: str) -> bool:
    return spec.strip().startswith(PREFIX)


def split_spec(spec: str, field: str = "model") -> tuple[str, str]:
    """`python:TARGET:FUNCTION` → (TARGET, FUNCTION); one clear error for any other shape."""
    raw = spec.strip()
    target, sep, name = raw[len(PREFIX):].rpartition(":")
    if "?" in raw:
        raise CaiError(f"{raw}: a python spec takes no ?options", field=field)
    if not sep or not target or not name.isidentifier():
        raise CaiError(f"{raw!r} is not python:MODULE:FUNCTION or python:path/to/file.py:FUNCTION",
                       field=field)
    if not _is_file_target(target) and not _MODULE.match(target):
        raise CaiError(f"{raw}: {target!r} is neither a module name nor a .py file", field=field)
    return target, name


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def source_file(spec: str, field: str = "model") -> Path:
    """The file that holds the function's source (found without running the module)."""
    raw = spec.strip()
    target, _ = split_spec(raw, field)
    if _is_file_target(target):
        path = Path(target).expanduser()
        if not path.is_file():
            raise CaiError(f"{raw}: file not found: {path}", field=field)
        return path
    try:
        found = importlib.util.find_spec(target)
    except Exception as exc:  # a parent package that fails to import, a bad name
        raise CaiError(f"{raw}: cannot import module {target}: {_one_line(exc)}",
                       field=field) from None
    origin = getattr(found, "origin", None)
    if found is None or not origin or not Path(origin).is_file():
        raise CaiError(f"{raw}: cannot import module {target} (not found on sys.path; give "
                       "python:path/to/file.py:FUNCTION for a file)", field=field)
    return Path(origin)


def python_identity(spec: str, field: str = "model") -> str:
    """The spec plus a hash of the function's source file: what record ids and manifests name.

    The function is loaded to name it, so a spec that does not import fails wherever its
    identity is first needed — before a stage writes anything.
    """
    return load_function(spec, field).identity


def _read(path: Path, spec: str, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaiError(f"{spec.strip()}: cannot read {path}: {exc.strerror or exc}",
                       field=field) from None


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


@dataclass(frozen=True)
class PythonFunction:
    """A loaded function and what names it."""

    spec: str
    """The spec as given."""
    fn: Callable[..., Any]
    source: Path
    """The file its source was read from."""
    identity: str
    """The spec plus `@` and 12 hex digits of the source file's sha256."""


_LOADED: dict[tuple[str, str], PythonFunction] = {}


def load_function(spec: str, field: str = "model") -> PythonFunction:
    """Import the module or file a spec names and return its function.

    A file is executed once per content (a module named after its hash, registered in
    `sys.modules` so what it defines can be pickled); an import that fails, a missing
    name or a name that is not callable is one `CaiError` naming the spec.
    """
    raw = spec.strip()
    target, name = split_spec(raw, field)
    path = source_file(raw, field)
    data = _read(path, raw, field)
    digest = hashlib.sha256(data).hexdigest()
    key = (raw, digest)
    if key in _LOADED:
        return _LOADED[key]
    try:
        if _is_file_target(target):
            mod_name = f"cai_python_{digest[:12]}_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
            module = sys.modules.get(mod_name)
            if module is None:
                mspec = importlib.util.spec_from_file_location(mod_name, path)
                if mspec is None or mspec.loader is None:
                    raise CaiError(f"{raw}: {path} cannot be loaded as Python", field=field)
                module = importlib.util.module_from_spec(mspec)
                sys.modules[mod_name] = module
                try:
                    mspec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(mod_name, None)
                    raise
        else:
            module = importlib.import_module(target)
    except CaiError:
        raise
    except (Exception, SystemExit) as exc:  # the user's code: any failure is one line
        raise CaiError(f"{raw}: importing {target} failed: {_one_line(exc)}", field=field) from None
    fn = getattr(module, name, None)
    if fn is None:
        raise CaiError(f"{raw}: {target} has no function {name!r}", field=field)
    if not callable(fn):
        raise CaiError(f"{raw}: {target}.{name} is not callable", field=field)
    loaded = PythonFunction(raw, fn, path, f"{raw}@{digest[:12]}")
    _LOADED[key] = loaded
    return loaded


def call(f: PythonFunction, args: tuple[Any, ...], item: str, field: str) -> Any:
    """Call the user's function; an exception it raises is one line naming spec and item."""
    try:
        return f.fn(*args)
    except Exception as exc:  # the user's code: report it, do not print its traceback
        raise CaiError(f"{f.spec} raised {_one_line(exc)} on {item}", field=field) from None


def as_float(value: Any, f: PythonFunction, item: str, field: str) -> float:
    """The function's return value as a float; anything else is one line naming the item."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise CaiError(f"{f.spec} returned {value!r} on {item}; it must return a number",
                       field=field)
    return float(value)


class PythonJudge:
    """A judge function behind the `Backend` protocol (see the module docstring)."""

    def __init__(self, spec: str | ModelSpec):
        raw = spec if isinstance(spec, str) else spec.raw
        self.function = load_function(raw, "feedback_model")
        self.spec = self.function.spec
        self.identity = self.function.identity

    def probability(self, q: JudgeQuestion) -> float:
        """P(option A is better) from the function, checked to be a number in [0, 1]."""
        item = q.item or "a pair"
        p = as_float(call(self.function, (q.prompt, q.first, q.second, q.principle), item,
                          "feedback_model"), self.function, item, "feedback_model")
        if not 0.0 <= p <= 1.0:  # NaN fails this too
            raise CaiError(f"{self.spec} returned {p!r} on {item}; a judge returns the "
                           "probability that A is better, in [0, 1]", field="feedback_model")
        return p

    def choice_logprobs(self, requests: list[ScoreRequest],
                        choices: tuple[str, ...] = ("A", "B")) -> ScoreResult:
        """log p for "A" and log(1 − p) for "B": the label code's softmax gives back p."""
        if tuple(choices) != ("A", "B"):
            raise CaiError(f"{self.spec} is a python judge: it says which of (A) and (B) is "
                           "better, so it works in mode logprob only (for ratings as a reward, "
                           "give --reward python:...:FUNCTION of (prompt, response))", field="mode")
        out = np.zeros((len(requests), 2))
        for n, r in enumerate(requests):
            if r.question is None:
                raise CaiError(f"{self.spec} is a python judge: it can only compare two "
                               "responses", field="feedback_model")
            p = self.probability(r.question)
            out[n] = (_log(p), _log(1.0 - p))
        return ScoreResult(out, list(choices))

    def generate(self, requests: list[GenRequest], config: GenerationConfig) -> list[Generation]:
        raise CaiError(f"{self.spec} is a python judge: it compares responses but writes no "
                       "text (not a policy, and not usable in mode cot)", field="model")

    def render(self, chat: Chat, answer_prefix: str = "") -> str:
        """The question as plain text (what `--keep-prompts` stores for a function judge)."""
        return render_plain(chat, answer_prefix)

    def context_length(self) -> int | None:
        return None

    def count_tokens(self, chat: Chat, answer_prefix: str = "") -> int | None:
        return None


def _log(p: float) -> float:
    return math.log(p) if p > 0 else LOG_ZERO


__all__ = ["PythonJudge", "PythonFunction", "load_function", "python_identity",
           "is_python_spec", "split_spec", "source_file", "call", "as_float", "LOG_ZERO"]
