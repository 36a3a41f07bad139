"""Stage folders: who owns an output folder, one writer at a time, and what a config reads.

A folder belongs to the stage that first wrote it (`.cai-stage`), is locked by the process
writing it (`.cai-lock`, an OS lock the kernel drops when the process dies), and may not
be, contain or sit inside anything the stage reads. `cai.core.stage` re-exports these for
the stages; the manifest of a folder is read here because ownership falls back to it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.manifest import RENAMED, Manifest, stage_name
from cai.core.records import JsonlStore
from cai.core.reward_spec import is_python_spec, model_of

MANIFEST = "manifest.json"


class StageDir:
    """`<out>/` of one stage: data.jsonl, manifest.json and a dataset card README.md.

    A folder belongs to the stage that first wrote it: a different stage refuses it before
    anything is touched, so `cai label --out runs/sl` cannot mix records into SL data.
    """

    def __init__(self, out: str | Path, stage: str, data: str | None = "data.jsonl"):
        self.root = Path(out)
        self.stage = stage
        claim_dir(self.root, stage)
        self.store = JsonlStore(self.root / data) if data else None

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> Manifest | None:
        return read_manifest(self.root)


def claim_dir(root: Path, stage: str) -> None:
    """Create `root` for `stage`, lock it (one writer per folder), test-write it, and refuse
    a folder of another stage (before touching it)."""
    if root.exists() and not root.is_dir():
        raise CaiError("exists and is not a folder; pick another --out", str(root))
    owner = _owner(root)
    if owner is not None and owner != stage:
        raise CaiError(f"this folder holds the output of stage `{owner}`; give `{stage}` its "
                       "own --out folder", str(root))
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock_dir(root)
        probe = root / ".cai-stage"
        if owner is None:
            probe.write_text(stage + "\n", encoding="utf-8")
        else:
            with open(probe, "a", encoding="utf-8"):
                pass
    except OSError as exc:
        raise CaiError(f"cannot write the output folder: {exc.strerror}", str(root)) from None


LOCK = ".cai-lock"
_HELD: dict[str, int] = {}  # resolved folder -> file descriptor holding its lock


def lock_dir(root: Path) -> None:
    """Take this process's exclusive lock on `root` (one writer per folder).

    An OS lock (`flock`) on `root/.cai-lock`: the kernel drops it when the process exits or
    dies, so a killed run never leaves a stale lock. It is held until the process ends, so
    a pipeline keeps the folders of the stages it ran. Taking it again in the same process
    is a no-op; a second process gets a `CaiError` at once instead of writing alongside.
    """
    import fcntl

    key = str(root.resolve())
    path = root / LOCK
    held = _HELD.get(key)
    if held is not None:
        try:  # still the lock file in this folder (not one moved away with a cleared folder)
            if os.fstat(held).st_ino == os.stat(path).st_ino:
                return
        except OSError:
            pass
        os.close(held)
        del _HELD[key]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = _lock_owner(path)
        raise CaiError(f"another cai run{f' (pid {pid})' if pid else ''} is writing this folder; "
                       "wait for it to finish or use another --out", str(root)) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd


def spec_parts(value: str) -> list[tuple[str | None, str]]:
    """A config value as (name, spec) parts: itself, or each of a `name=spec,...` list."""
    out: list[tuple[str | None, str]] = []
    for part in value.split(","):
        part = part.strip()
        name, eq, rest = part.partition("=")
        if eq and "/" not in name and not Path(part).exists():
            out.append((name, rest))  # "label=spec" in a list of models
        elif part:
            out.append((None, part))
    return out


def spec_target(spec: str) -> Path | None:
    """The local file or folder a spec names (a path, `hf:`/`vllm:` folder, `pm:` reward,
    `judge:` model, `embedded:` cache folder), if there is one."""
    from cai.core.models import embedded_dir

    body = spec.split("?", 1)[0] if not Path(spec).exists() else spec
    body = model_of(body)  # the folder of a pm: reward, the model of a judge:
    for prefix in ("hf:", "vllm:"):
        body = body.removeprefix(prefix)
    if body.startswith("embedded:"):
        return embedded_dir(body[len("embedded:"):])
    if body and not is_python_spec(body) and not body.startswith(("openai:", "http:", "https:")):
        path = Path(body).expanduser()
        if path.exists():
            return path
    return None


def _spec_paths(value: str) -> list[Path]:
    """The local files or folders a config value names (see `spec_target`)."""
    return [p for _, spec in spec_parts(value) if (p := spec_target(spec)) is not None]


def check_out_over_inputs(out: str | Path, cfg: Any, fields: Sequence[str]) -> None:
    """Refuse an output folder equal to, inside or containing anything the stage reads (the
    config `fields` naming data files or folders, model folders, the embedded model
    cache), before any work: a stage writing there would replace the input it reads."""
    from cai.core.models import cache_root

    values = [(name, v) for name in fields
              for v in (lambda x: x if isinstance(x, list) else [x])(getattr(cfg, name, None))]
    found = [(name, p) for name, v in values if isinstance(v, str) for p in _spec_paths(v)]
    found.append(("model cache", cache_root()))
    o = Path(out).expanduser().resolve()
    for name, path in found:
        r = path.resolve()
        how = ("is" if o == r else "is inside" if r in o.parents
               else "contains" if o in r.parents else None)
        if how:
            what = "the model cache" if name == "model cache" else f"the input `{name}`"
            raise CaiError(f"--out {how} {what} ({path}); writing there would overwrite what "
                           "the stage reads: pick another --out", str(out), "out")


def check_out_file(out: str | Path, *, inputs: Sequence[str | Path] = (), overwrite: bool = False,
                   own: Sequence[str | Path] = (), field: str = "out") -> Path:
    """The one rule for a command that writes a single file: never over an input, never over
    an existing file unless `overwrite`.

    `inputs` are the files or folders the command reads: an output that is one of them, sits
    inside one or contains one is refused even with `overwrite` (writing it would replace
    what the command reads). `own` are the command's own default outputs (`report.html` of
    the run it reports on), which it refreshes whenever it runs. Symlinks are resolved, so
    a link to an input is the input. Returns the path to write.
    """
    path = Path(out).expanduser()
    if path.is_dir():
        raise CaiError("is a folder; give a file name", str(out), field)
    o = path.resolve()
    if o in {Path(p).expanduser().resolve() for p in own}:
        return path
    for item in inputs:
        r = Path(item).expanduser().resolve()
        how = ("is" if o == r else "is inside" if r in o.parents
               else "contains" if o in r.parents else None)
        if how:
            raise CaiError(f"--{field.replace('_', '-')} {how} an input of this command ({item}); "
                           "writing there would replace what it reads: pick another "
                           f"--{field.replace('_', '-')}", str(out), field)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise CaiError("exists; pass --overwrite to replace it, or pick another "
                       f"--{field.replace('_', '-')}", str(out), field)
    return path


def _lock_owner(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _owner(root: Path) -> str | None:
    marker = root / ".cai-stage"
    if marker.is_file():
        return stage_name(marker.read_text(encoding="utf-8").strip() or None)
    m = read_manifest(root)
    return m.stage if m else None


def read_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of a stage folder (or of the folder holding a file), if there is one,
    read through its schema (`cai.core.manifest`); one that does not fit it is an error."""
    p = Path(folder)
    if p.is_file() or not p.exists():
        p = p.parent
    path = p / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CaiError("not a valid manifest", str(path)) from None
    return Manifest.parse(m, path)


__all__ = ["MANIFEST", "LOCK", "RENAMED", "StageDir", "claim_dir", "lock_dir", "read_manifest",
           "spec_parts", "spec_target", "stage_name", "check_out_over_inputs", "check_out_file"]
