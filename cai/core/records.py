"""Typed records with provenance, an append-only jsonl store that survives a kill, the run
manifest, the dataset card and export to `datasets`.

Why a store this careful: a labelling run over a hundred thousand pairs gets interrupted.
Lines are appended whole, flushed and fsynced per batch; a rerun reads the ids already on
disk and skips them; a torn last line from a crash is cut off with a warning. Nothing is
lost and nothing is written twice.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from cai.core.errors import CaiError

RECORD_SCHEMA = "cai.record/v1"


def cai_version() -> str:
    from cai import __version__

    return __version__


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def record_id(*parts: Any) -> str:
    """Id of a record: a hash of everything that determines it (inputs, config, seed, model)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


class Provenance(BaseModel):
    """Where a record came from; enough to reproduce it."""

    model_config = ConfigDict(extra="forbid")

    constitution: dict[str, str]
    """`{name, version, hash}` of the constitution."""
    model: str
    """Model spec that produced the record (the feedback model for labels)."""
    sampling: dict[str, Any] = Field(default_factory=dict)
    """Sampling parameters (temperature, top_p, max_new_tokens, ...)."""
    seed: int
    """Run seed; per-item seeds are derived from it and the record's inputs."""
    cai_version: str = Field(default_factory=cai_version)
    created: str = Field(default_factory=now)


class Record(BaseModel):
    """Base of every stored record: an id, the stage that wrote it and its provenance."""

    model_config = ConfigDict(extra="forbid")

    schema_version: str = RECORD_SCHEMA
    id: str
    stage: str
    provenance: Provenance


class OptionalFields(BaseModel):
    """Leaves out of the stored record the later fields that are unset (`OPTIONAL`), so the
    records of the inputs and modes that never set them keep their exact bytes."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        out = handler(self)
        for name in getattr(self, "OPTIONAL", ()):
            if out.get(name) is None:
                out.pop(name, None)
        return out


# ---------------------------------------------------------------------------- jsonl store


class JsonlStore:
    """Append-only jsonl file keyed by record id.

    Opening the store repairs a torn last line (a write cut by a crash) by truncating the
    file to the last complete line, so the next append starts clean.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ids: set[str] = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not self.path.is_file():
                raise CaiError("exists and is not a file; remove it or pick another --out",
                               str(self.path))
            existed = self.path.exists()
            self._repair_and_index()
            # Test-write now: an unwritable store must fail before any work, not after it.
            # A store that did not exist is not left behind (an empty file is not output).
            with open(self.path, "ab"):
                pass
            if not existed:
                self.path.unlink()
        except OSError as exc:
            raise CaiError(f"cannot write: {exc.strerror or exc}", str(self.path)) from None

    def _repair_and_index(self) -> None:
        if not self.path.exists():
            return
        good_end = 0
        with open(self.path, "rb") as f:
            data = f.read()
        pos = 0
        torn = False
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl == -1:
                torn = True
                break
            line = data[pos:nl]
            if line.strip():
                try:
                    obj = json.loads(line.decode("utf-8"))
                except (ValueError, RecursionError):  # bad JSON or not UTF-8
                    torn = nl + 1 >= len(data)
                    if not torn:
                        lineno = data.count(b"\n", 0, pos) + 1
                        raise CaiError(f"corrupt line {lineno} in the middle of the store; fix or "
                                       "remove it", f"{self.path}:{lineno}") from None
                    break
                if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                    lineno = data.count(b"\n", 0, pos) + 1
                    raise CaiError("a stored record without a text `id`; this is not a cai "
                                   "store, or the line was edited: fix or remove it",
                                   f"{self.path}:{lineno}", "id")
                if obj["id"] in self.ids:
                    lineno = data.count(b"\n", 0, pos) + 1
                    raise CaiError(f"duplicate id {obj['id']!r} (two runs wrote this folder at "
                                   "once?); remove the repeated line", f"{self.path}:{lineno}", "id")
                self.ids.add(obj["id"])
            pos = nl + 1
            good_end = pos
        if torn:
            warnings.warn(f"{self.path}: dropped a torn last line left by an interrupted write",
                          stacklevel=2)
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def __contains__(self, rid: str) -> bool:
        return rid in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, records: Iterable[BaseModel | dict]) -> int:
        """Append the records not yet stored, as whole lines, then fsync. Returns how many."""
        lines = []
        for r in records:
            obj = r.model_dump(mode="json") if isinstance(r, BaseModel) else r
            if obj["id"] in self.ids:
                continue
            self.ids.add(obj["id"])
            lines.append(obj)
        if not lines:
            return 0
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(jsonl_text(lines))
            f.flush()
            os.fsync(f.fileno())
        return len(lines)

    def __iter__(self) -> Iterator[dict]:
        from cai.core.data import read_jsonl

        yield from read_jsonl(self.path, what="store")

    def read(self) -> list[dict]:
        return list(self)


# ---------------------------------------------------------------------------- run folder


def git_revision() -> dict[str, Any]:
    """The git commit of the toolkit's checkout and whether it had local edits."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, capture_output=True, text=True,
                                    timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def jsonl_text(rows: Iterable[Any], ensure_ascii: bool = False) -> str:
    """Rows as jsonl: one JSON line each, every line ended by a newline."""
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows)


def write_jsonl(path: str | Path, rows: Iterable[Any], ensure_ascii: bool = False) -> None:
    """Write a whole jsonl file atomically (`write_text_atomic`): readers see the old file or
    the new one, never a part."""
    write_text_atomic(path, jsonl_text(rows, ensure_ascii))


def file_sha256(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------- export


def _flatten_for_arrow(row: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts with varying keys stay as JSON strings so every row has one schema."""
    out = {}
    for k, v in row.items():
        out[k] = json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) and k in (
            "provenance", "extra") else v
    return out


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a jsonl file of records without touching it; bad lines are clear errors.

    Unlike opening a `JsonlStore`, this never repairs (truncates) the file: a user's own
    file is left exactly as it is, and a torn or malformed line is reported by number.
    """
    from cai.core.data import _rows

    p = Path(path)
    if p.exists() and not p.is_file():
        raise CaiError("not a file", str(p))
    rows, seen = [], set()
    for where, row in _rows(p):
        if "id" not in row:
            raise CaiError("missing", where, "id")
        key = json.dumps(row["id"], sort_keys=True, default=str)
        if key in seen:
            raise CaiError(f"duplicate id {row['id']!r}", where, "id")
        seen.add(key)
        rows.append(row)
    return rows


def to_dataset(path: str | Path, columns: list[str] | None = None):
    """Load a jsonl file of records as a `datasets.Dataset` (provenance kept as JSON text)."""
    import datasets

    rows = [_flatten_for_arrow(r) for r in read_records(path)]
    if not rows:
        raise CaiError("no records to export", str(path))
    if columns:
        rows = [{k: r.get(k) for k in columns} for r in rows]
    try:
        return datasets.Dataset.from_list(rows)
    except (ValueError, TypeError, OverflowError) as exc:  # pyarrow's errors subclass these
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CaiError(f"records do not form one table (a field changes type?): {msg}",
                       str(path)) from None


def _stage_data(path: str | Path) -> tuple[Path, Path | None]:
    """The records file a path names (a stage folder means its data.jsonl) and the stage
    folder whose card and manifest describe it (None when there is none)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "data.jsonl").is_file():
            raise CaiError("no data.jsonl in this folder (give a stage folder or a records file)",
                           str(p))
        return p / "data.jsonl", p
    root = p.parent
    return p, root if (root / "manifest.json").is_file() else None


def dataset_card(path: str | Path) -> str:
    """README.md of an exported dataset: the stage's own card under YAML metadata that
    carries the constitution stamp (name, version, hash), so the Hub page says which
    constitution made the data."""
    import yaml

    data, root = _stage_data(path)
    manifest, body = {}, f"# {data.name}\n\nRecords exported by cai.\n"
    if root is not None:
        try:
            manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        if (root / "README.md").is_file():
            body = (root / "README.md").read_text(encoding="utf-8")
    meta: dict[str, Any] = {"tags": ["cai", "constitutional-ai"]}
    if manifest.get("stage"):
        meta["cai_stage"] = manifest["stage"]
    if manifest.get("constitution"):
        meta["constitution"] = {k: str(v) for k, v in manifest["constitution"].items()}
    return "---\n" + yaml.safe_dump(meta, sort_keys=True, allow_unicode=True) + "---\n\n" + body


def push_to_hub(path: str | Path, repo: str, private: bool = False) -> str:
    """Upload a stage's records to the Hub (`datasets`' push_to_hub) with `dataset_card` as
    README.md, keeping the metadata push_to_hub wrote there (its configs and features)."""
    from huggingface_hub import DatasetCard

    data, _ = _stage_data(path)
    ds = to_dataset(data)
    card = dataset_card(path)
    try:
        ds.push_to_hub(repo, private=private)
        ours = DatasetCard(card)
        try:
            theirs = DatasetCard.load(repo).data.to_dict()
        except Exception:  # noqa: BLE001 - no card yet: ours alone
            theirs = {}
        have = ours.data.to_dict()
        for k, v in theirs.items():
            if k not in have:
                ours.data[k] = v
        ours.push_to_hub(repo, repo_type="dataset")
    except Exception as exc:  # noqa: BLE001 - network, auth and Hub errors: one line
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CaiError(f"cannot push to the Hub dataset {repo!r}: {first}", str(path)) from None
    return f"https://huggingface.co/datasets/{repo}"


def export(path: str | Path, out: str | Path, fmt: str = "disk", overwrite: bool = False) -> Path:
    """Export records to a `datasets` folder (save_to_disk) or a parquet file; a stage
    folder exports its data.jsonl, and a `datasets` folder gets the card `push_to_hub`
    would upload as its README.md.

    The output is written beside its final name and renamed into place, so a failed or
    killed export leaves no half file; it never replaces its own input, and replaces an
    existing output only with `overwrite`.
    """
    if fmt not in ("disk", "parquet"):
        raise CaiError(f"unknown export format {fmt!r}; use 'disk' or 'parquet'")
    src, out = _stage_data(path)[0], Path(out)
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents or s in o.parents:
        raise CaiError(f"--out {'is' if o == s else 'contains' if o in s.parents else 'is inside'} "
                       f"the file being exported ({src}); pick another --out", str(out), "out")
    if fmt == "disk" and out.exists() and not out.is_dir():
        raise CaiError("exists and is not a folder; pick another --out", str(out))
    if fmt == "parquet" and out.is_dir():
        raise CaiError("is a folder; give a file name for the parquet file", str(out))
    if out.exists() and not overwrite:
        raise CaiError("exists; pass --overwrite to replace it, or pick another --out", str(out))
    ds = to_dataset(src)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "disk":
            shutil.rmtree(tmp, ignore_errors=True)
            ds.save_to_disk(str(tmp))
            (tmp / "README.md").write_text(dataset_card(path), encoding="utf-8")
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        else:
            ds.to_parquet(str(tmp))
            os.replace(tmp, out)
    except OSError as exc:
        raise CaiError(f"cannot write: {exc.strerror or exc}", str(out)) from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return out
