"""Loading a Python function named by a spec: `python:MODULE:FUNCTION` or
`python:path/to/file.py:FUNCTION`.

Low in the stack (it needs only `cai.core.errors` and the spec shapes of
`cai.core.reward_spec`) because three layers read these specs: the
model registry names them (`cai.core.models`), the judge backend calls them
(`cai.backends.pyfunc`) and the RL reward calls them (`cai.train.rewards`).

Identity: the spec plus the first 12 hex digits of the sha256 of the function's source file
(`python:judges.py:safe@0123456789ab`), so editing the function changes every record id it
made and a rerun computes afresh instead of reusing what the old function gave.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cai.core.errors import CaiError
from cai.core.reward_spec import PYTHON as PREFIX
from cai.core.reward_spec import is_file_target as _is_file_target
from cai.core.reward_spec import is_python_spec, split_spec


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
    if found is None:
        raise CaiError(f"{raw}: cannot import module {target} (not found on sys.path; give "
                       "python:path/to/file.py:FUNCTION for a file)", field=field)
    if origin and Path(origin).is_file():
        return Path(origin)
    # A frozen or aliased module (os.path is posixpath): its file, if it has one.
    module = sys.modules.get(target) or sys.modules.get(found.name)
    file = getattr(module, "__file__", None) if module is not None else None
    if file and Path(file).is_file():
        return Path(file)
    raise CaiError(f"{raw}: module {target} is built into Python (no source file to identify "
                   "the function by); call it from a function in a .py file of your own",
                   field=field)


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
                    with contextlib.redirect_stdout(sys.stderr):
                        mspec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(mod_name, None)
                    raise
        else:
            with contextlib.redirect_stdout(sys.stderr):
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


def python_sources(config: Any) -> dict[str, str]:
    """`spec -> sha256:...` of the source file of every `python:` spec in a config's string
    fields (a reward, a judge, each `name=spec` of a list such as RL monitors): part of a
    training run's identity, so a resume under an edited function is refused. A spec that
    does not resolve is left out here; the stage reports it when it loads the spec."""
    import dataclasses

    out: dict[str, str] = {}
    values = (dataclasses.asdict(config) if dataclasses.is_dataclass(config)
              else dict(config or {}))
    texts = [t for v in values.values() for t in (v if isinstance(v, list | tuple) else [v])
             if isinstance(t, str) and PREFIX in t]
    for value in texts:
        for part in value.split(","):  # a spec, or each `name=spec` of a list
            spec = part.strip()
            if not is_python_spec(spec):
                spec = spec.partition("=")[2].strip()
            if not is_python_spec(spec):
                continue
            try:
                path = source_file(spec)
                out[spec.strip()] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
            except (CaiError, OSError):
                continue
    return dict(sorted(out.items()))


def changed_sources(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """The specs whose source file's hash differs between a recorded run and now."""
    return sorted(k for k in recorded if k in now and recorded[k] != now[k])


def call(f: PythonFunction, args: tuple[Any, ...], item: str, field: str) -> Any:
    """Call the user's function; an exception it raises, or `sys.exit`, is one line naming
    spec and item. What it prints goes to stderr: stdout is the command's summary JSON."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return f.fn(*args)
    except SystemExit as exc:
        raise CaiError(f"{f.spec} called sys.exit({exc.code!r}) on {item}; a judge or reward "
                       "must return a value", field=field) from None
    except Exception as exc:  # the user's code: report it, do not print its traceback
        raise CaiError(f"{f.spec} raised {_one_line(exc)} on {item}", field=field) from None


def as_float(value: Any, f: PythonFunction, item: str, field: str) -> float:
    """The function's return value as a float; anything else is one line naming the item."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise CaiError(f"{f.spec} returned {value!r} on {item}; it must return a number",
                       field=field)
    return float(value)


__all__ = ["PREFIX", "PythonFunction", "load_function", "python_identity", "is_python_spec",
           "split_spec", "source_file", "call", "as_float", "python_sources", "changed_sources"]
