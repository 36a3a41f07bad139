"""The constitutions and prompt sets that ship with the toolkit, found from any folder.

`--constitution harmless` or `--prompts red_team` name a shipped file; a path that exists
is used as given. In a source checkout the files live in `constitutions/` and `prompts/`
at the repository root; an installed wheel carries the same files as package data
(`cai/_shipped/`, mapped in pyproject.toml).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cai.core.errors import CaiError

_PKG = Path(__file__).resolve().parents[1]  # the `cai` package
KINDS = {"constitutions": ".yaml", "prompts": ".jsonl"}


def shipped_dir(kind: str) -> Path:
    """The folder of shipped files of one kind ("constitutions" or "prompts")."""
    for root in (_PKG.parent / kind, _PKG / "_shipped" / kind):
        if root.is_dir():
            return root
    return _PKG.parent / kind


def shipped(kind: str) -> list[str]:
    """Names of the shipped files of one kind."""
    return sorted(p.stem for p in shipped_dir(kind).glob("*" + KINDS[kind]))


def resolve(value: str | Path, kind: str, announce: bool = True) -> Path:
    """A path as given when it exists; otherwise the shipped file it names.

    Accepts a bare name (`harmless`), a file name (`harmless.yaml`) or the repository-
    relative path the defaults used to carry (`constitutions/harmless.yaml`). When a shipped
    file is picked, one line on stderr says which, so a run never uses a file silently.
    """
    try:
        return _resolve(Path(value), kind, announce)
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise CaiError(f"cannot read {kind[:-1]}: {getattr(exc, 'strerror', None) or exc}",
                       str(value)) from None


def _resolve(p: Path, kind: str, announce: bool) -> Path:
    if p.exists():
        return p
    name = p.name if p.parent in (Path("."), Path(kind)) else None
    if name:
        cand = shipped_dir(kind) / (name if name.endswith(KINDS[kind]) else name + KINDS[kind])
        if cand.is_file():
            if announce:
                print(f"[cai] using the shipped {kind[:-1]} {cand.stem!r} ({cand})", file=sys.stderr)
            return cand
    return p


__all__ = ["resolve", "shipped", "shipped_dir"]
