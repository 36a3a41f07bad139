"""`manifest.json`, the run record every stage writes into its folder, as one versioned schema.

Stages write it through `write_manifest` (`cai.core.stage`), and the pipeline, the report
and the viewer read it back through `read_manifest` (`cai.core.folders`): both go through
`Manifest`, so a field is named and typed in one place. Fields a stage adds of its own
(`label_stats`, `tokens`, `prompt_ids`, ...) are kept as they are (extra fields are
allowed), so nothing written is lost on reading.

A manifest written before the schema had a version (no `schema_version`) reads as version
0, with the same fields; one of a newer version than this code knows, or one whose fields do
not fit the schema, is refused with one error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from cai.core.errors import CaiError

SCHEMA_VERSION = 1
"""The version `write_manifest` writes; 0 is a manifest from before versioning."""


RENAMED = {"train.sft": "sft", "train.pm": "pm", "train.rl": "rl", "train.dpo": "dpo",
           "eval.policies": "eval", "eval.labeler": "eval-labeler",
           "eval.constitutions": "eval-constitutions", "eval.known-answer": "eval-known-answer"}
"""Stage names that folders written before each stage had one name still carry (in their
manifest's `stage` and their `.cai-stage` marker), and the name each stage has now."""


def stage_name(recorded: str | None) -> str | None:
    """The stage a recorded name means today: every reader of a folder's recorded stage
    goes through this, so an old run folder still resumes, caches and validates."""
    return RENAMED.get(recorded, recorded) if recorded else recorded


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Upstream(_Open):
    """One input of the stage: a data file or folder, a model, a reward spec."""

    path: str
    """The config's value (a path or a model spec)."""
    sha256: str | None = None
    """The file's own hash, when the input is a file."""
    stage: str | None = None
    """The stage that wrote it, when it is a stage's folder (or a file in one)."""
    data_sha256: str | None = None
    """That stage's data hash."""
    constitution: dict[str, Any] | None = None
    """That stage's constitution stamp."""
    identity: Any = None
    """A model's identity (spec without speed options, weights hash)."""


class Data(_Open):
    """The stage's data files and their hashes."""

    file: str | None = None
    """The main file (the first of `files`)."""
    records: int | None = None
    """Its number of records (0 for a file that is not jsonl)."""
    sha256: str | None = None
    files: dict[str, str] | None = None
    """Every data file by name, with its sha256."""


class Manifest(_Open):
    """A stage folder's `manifest.json`."""

    schema_version: int = 0
    stage: str
    """The stage's name (a folder written under an old name reads under the new one)."""
    cai_version: str | None = None
    git: dict[str, Any] | None = None
    """The toolkit's git commit and whether it had local edits."""
    written: str | None = None
    config: dict[str, Any] = {}
    """The resolved config: enough to rerun the stage."""
    constitution: dict[str, Any] | None = None
    """The constitution stamp (name, version, hash), inherited from upstream when the
    stage reads none itself."""
    models: dict[str, Any] = {}
    """Each model the stage ran, by role."""
    upstream: dict[str, Upstream] = {}
    """Every input the stage declared, by config field."""
    counts: dict[str, Any] = {}
    timings_s: dict[str, Any] = {}
    data: Data = Data()
    label_stats: dict[str, Any] | None = None
    """The label stage's statistics (pairs, tie rate, ...)."""
    tokens: dict[str, dict[str, Any]] | None = None
    """Tokens each model read and wrote (and their cost, where priced)."""

    @field_validator("stage")
    @classmethod
    def _new_name(cls, value: str) -> str:
        return stage_name(value)

    @classmethod
    def parse(cls, obj: Any, where: str | Path = "manifest.json") -> Manifest:
        """A manifest from its JSON object; one error naming `where` if it is not one."""
        if not isinstance(obj, dict):
            raise CaiError("not a valid manifest (not a JSON object)", str(where))
        version = obj.get("schema_version", 0)
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise CaiError(f"manifest schema_version {version} is newer than this cai reads "
                           f"({SCHEMA_VERSION}); upgrade cai to read it", str(where))
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "manifest"
            raise CaiError(f"not a valid manifest: {loc}: {err['msg']}", str(where)) from None

    def as_dict(self) -> dict[str, Any]:
        """The JSON object: every field it was given or read with, and no other."""
        return self.model_dump(mode="json", exclude_unset=True)


__all__ = ["Manifest", "Upstream", "Data", "SCHEMA_VERSION"]
