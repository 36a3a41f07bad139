"""Dataclass configs: field docs read from the source, YAML loading, overrides, and CLI help.

Each stage has one dataclass whose fields carry a docstring right under them. Those
docstrings are the only description of a field: the CLI help and the docs come from them,
so the two cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import reprlib
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from cai.core.errors import CaiError, read_text


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `list[str]` stays a list type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return tp


MAX_YAML_NODES = 100_000
"""More YAML values than this (aliases nested to expand exponentially, say) is refused."""


def short(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to a readable length for an error message (a config value can be
    a huge YAML structure)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 6, 6, 3
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _yaml_size(node: yaml.Node | None, where: str) -> None:
    """Count the values a YAML document expands to (each alias counted at every use),
    refusing a document over `MAX_YAML_NODES` or one that contains itself."""
    count, stack = 0, [(node, frozenset())]
    while stack:
        n, active = stack.pop()
        if n is None:
            continue
        count += 1
        if count > MAX_YAML_NODES:
            raise CaiError(f"YAML expands to more than {MAX_YAML_NODES} values (nested aliases?)",
                           where)
        if id(n) in active:
            raise CaiError("YAML value contains itself (a recursive alias)", where)
        if isinstance(n, yaml.MappingNode):
            inner = active | {id(n)}
            stack.extend((x, inner) for pair in n.value for x in pair)
        elif isinstance(n, yaml.SequenceNode):
            inner = active | {id(n)}
            stack.extend((x, inner) for x in n.value)


def safe_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load` with alias expansion bounded (a few hundred bytes of nested aliases
    can expand to gigabytes); syntax errors are left to the caller as `yaml.YAMLError`."""
    try:
        _yaml_size(yaml.compose(text), where)
        return yaml.safe_load(text)
    except RecursionError:
        raise CaiError("YAML nested too deeply", where) from None


def nested_configs(cls: type) -> dict[str, type]:
    """The fields of `cls` that hold a config of their own (a `judge: JudgeConfig`), by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: tp for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(tp := _base_type(hints[f.name])) and isinstance(tp, type)}


def flat_fields(cls: type) -> list[tuple[str, dataclasses.Field, type]]:
    """Every leaf field as (path, field, owner): a nested config's fields appear under their
    own names with the path "judge.principles", so the CLI keeps one flat flag per field."""
    inner = nested_configs(cls)
    out: list[tuple[str, dataclasses.Field, type]] = []
    for f in dataclasses.fields(cls):
        if f.name in inner:
            out += [(f"{f.name}.{path}", g, owner) for path, g, owner in flat_fields(inner[f.name])]
        else:
            out.append((f.name, f, cls))
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"judge.principles": 2, "seed": 1} -> {"judge": {"principles": 2}, "seed": 1}."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *heads, leaf = path.split(".")
        node = out
        for h in heads:
            node = node.setdefault(h, {})
        node[leaf] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, nested mappings merged key by key (a flag given for one judge
    field keeps the other judge fields a YAML file set)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def coerce(cls: type, name: str, value: Any, where: str = "") -> Any:
    """Check (and gently convert) one config value against the field's annotation."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        home = [k for k, sub in nested_configs(cls).items() if name in typing.get_type_hints(sub)]
        hint = f"; it is a {home[0]} setting: put it under `{home[0]}:`" if home else ""
        raise CaiError(f"unknown field{hint or '; known: ' + ', '.join(sorted(hints))}",
                       where or None, name)
    if value is None:
        return None
    args = typing.get_args(hints[name])
    wants_list = hints[name] == list[str] or (list[str] in args and str not in args)
    if isinstance(value, str) and wants_list:  # one command-line flag: names joined by commas
        value = [v.strip() for v in value.split(",")]
    if isinstance(value, list) and (wants_list or list[str] in args):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise CaiError(f"expected a list of names, got {short(value)}", where or None, name)
        return list(value)
    tp = _base_type(hints[name])
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _nested(tp, name, value, where)
    try:
        if tp is bool and isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if tp in (int, float, str, bool):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if tp in (int, float) and isinstance(value, bool):
                raise ValueError(value)
            if tp is str and (isinstance(value, bool) or not isinstance(value, str | int | float)):
                raise ValueError(value)  # a YAML list or mapping is not silently str()-ed
            if tp is bool and not (isinstance(value, bool) or value in (0, 1)):
                raise ValueError(value)
            out = tp(value)
            # NaN and infinities pass every `x < lo` check and then poison a run silently.
            if tp is float and not math.isfinite(out):
                raise CaiError(f"expected a finite number, got {short(value)}", where or None, name)
            return out
    except (TypeError, ValueError, OverflowError):
        raise CaiError(f"expected {tp.__name__}, got {short(value)}", where or None, name) from None
    return value


def _nested(tp: type, name: str, value: Any, where: str) -> Any:
    """A nested config from its mapping; an error names the field by its path ("judge.mode")."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise CaiError(f"expected a mapping of {name} settings, got {short(value)}",
                       where or None, name)
    try:
        return from_dict(tp, value, where)
    except CaiError as err:
        err.field = f"{name}.{err.field}" if err.field else name
        raise


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build a config dataclass from a mapping, naming the file and field on any error."""
    kwargs = {k: coerce(cls, k, v, where) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
        check = getattr(obj, "check_engine", None)  # engine fields: checked here, before any model
        if callable(check):
            check()
        return obj
    except CaiError as err:
        if where and not err.where:
            err.where = where
        raise
    except (TypeError, ValueError) as exc:
        raise CaiError(short(str(exc), 300).strip("'"), where or None) from None


def yaml_error(exc: yaml.YAMLError, path: str) -> CaiError:
    """A YAML syntax error as one `file:line` error, at the line a user would edit.

    Something left open (a quote, a bracket) is only noticed at the end of the file, so
    such an error points at where it was opened instead."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None) or ""
    opened = getattr(exc, "context_mark", None)
    if opened is not None and ("scanning" in context or "<stream end>" in problem
                               or "end of stream" in problem):
        mark = opened
    if context:
        problem = f"{problem} ({context})"
    return CaiError(f"YAML syntax error: {problem}", f"{path}:{mark.line + 1 if mark else 1}")


def yaml_line(text: str, keys: list[str]) -> int | None:
    """The 1-based line of the deepest key of a path of mapping keys (`["rl", "steps"]`)
    found in a YAML text; None when not even the first is there."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


def locate(err: CaiError, path: str | Path) -> CaiError:
    """An error about YAML file `path` (its `where` the file, or "file: section") pointed at
    the line of its field: `file:LINE` and the field's full dotted path."""
    p = str(path)
    where, field = err.where or "", err.field or ""
    if where == p:
        section = None
    elif where.startswith(p + ": "):
        section = where[len(p) + 2:]
    else:
        return err
    keys = [*([section] if section else []), *(field.split(".") if field else [])]
    try:
        line = yaml_line(Path(p).read_text(encoding="utf-8-sig"), keys) if keys else None
    except (OSError, UnicodeDecodeError):
        line = None
    if line is not None:
        err.where = f"{p}:{line}"
        err.field = ".".join(keys)
    return err


def load_yaml_mapping(path: str | Path, what: str = "config", section: str | None = None) -> dict[str, Any]:
    """The `option: value` mapping of a YAML config file (or of one section of it; an empty
    file or section is `{}`). Every way of failing is one `CaiError` naming the file: a read
    or UTF-8 error, a syntax error at its line (`yaml_error`), a document that is no mapping,
    an option name that is not text."""
    p = Path(path)
    text = read_text(p, what)
    try:
        data = safe_yaml(text, str(p)) or {}
    except yaml.YAMLError as exc:
        raise yaml_error(exc, str(p)) from None
    if section is not None and isinstance(data, dict):
        data = data.get(section) or {}
    if not isinstance(data, dict):
        raise CaiError("expected a mapping of option: value", str(p), section)
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise CaiError(f"option names must be text, got {bad[0]!r}", str(p), section)
    return data


def load_yaml_config(cls: type, path: str | Path, section: str | None = None,
                     overrides: dict[str, Any] | None = None) -> Any:
    """Read a YAML config (optionally one section of it), apply overrides, validate."""
    data = load_yaml_mapping(path, "config", section)
    return from_dict(cls, merge(data, overrides or {}), str(Path(path)))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
