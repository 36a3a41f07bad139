"""What does a constitution edit change? Label the same pairs under both versions and compare,
before spending any compute on training.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cai.backends import Backend, load_backend
from cai.constitution import diff, load
from cai.core import usage
from cai.core.errors import CaiError
from cai.core.records import JsonlStore, read_records, write_json_atomic
from cai.core.stage import Input, Stage, claim_dir, load_registry, register, write_manifest
from cai.judge import JudgeConfig

STAGE = "eval-constitutions"


@dataclass
class ConstitutionsEvalConfig:
    """Configuration of `cai eval constitutions`."""

    old: str = "harmless"
    """The constitution before the edit (a file or a shipped name)."""
    new: str = "harmless"
    """The constitution after the edit."""
    pairs: str = "pairs.jsonl"
    """Pairs to label under both (prompt, response_a, response_b)."""
    feedback_model: str = "embedded:smollm2-135m"
    """Model spec of the judge."""
    out: str = "runs/eval/constitutions"
    """Folder: old/ and new/ label runs (resumable) and report.json."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """How the judge labels under both versions (a nested `judge:` mapping in YAML)."""
    limit: int | None = None
    """Use only the first N pairs."""
    seed: int = 0
    """Seed of the principle draws (the same for both runs)."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise CaiError("must be at least 1", field="limit")


def compare(old_records: list[dict], new_records: list[dict]) -> dict[str, Any]:
    """Agreement, mean shift of p(a ≻ b), and the pairs whose preferred response flipped."""
    old = {r["pair_id"]: r for r in old_records}
    new = {r["pair_id"]: r for r in new_records}
    common = [k for k in old if k in new]
    shifts = np.array([new[k]["p_a"] - old[k]["p_a"] for k in common])
    flipped = [{"pair_id": k, "prompt": old[k]["prompt"], "p_a_old": old[k]["p_a"],
                "p_a_new": new[k]["p_a"]} for k in common
               if (old[k]["p_a"] >= 0.5) != (new[k]["p_a"] >= 0.5)]
    return {"pairs": len(common),
            "agreement": 1 - len(flipped) / len(common) if common else None,
            "mean_shift_p_a": float(shifts.mean()) if common else None,
            "mean_abs_shift_p_a": float(np.abs(shifts).mean()) if common else None,
            "flipped": flipped}


def _run_ids(folder: Path) -> set[str]:
    """The ids of the labels the last run into `folder` produced (its preferences.jsonl)."""
    return {r["id"] for r in read_records(folder / "preferences.jsonl")}


def run_constitutions_eval(cfg: ConstitutionsEvalConfig,
                           backend: Backend | None = None) -> dict[str, Any]:
    t0, tokens = time.time(), usage.mark()
    if cfg.judge.models:
        raise CaiError("a judge panel is taken by `cai label` and `cai eval labeler`; give one "
                       "feedback model here", field="judge.models")
    old_c, new_c = load(cfg.old), load(cfg.new)
    out = Path(cfg.out)
    claim_dir(out, STAGE)
    backend = backend or load_backend(cfg.feedback_model)
    # Each version is an ordinary label run (reached by its registered name, not imported).
    label = load_registry()["label"]
    base = label.config(pairs=cfg.pairs, feedback_model=backend.spec, judge=cfg.judge,
                        limit=cfg.limit, seed=cfg.seed)
    runs = {}
    for name, path in (("old", cfg.old), ("new", cfg.new)):
        label.run(dataclasses.replace(base, constitution=path, out=str(out / name)), backend)
        # Only this run's labels: the folder may hold labels of earlier runs too.
        ids = _run_ids(out / name)
        runs[name] = [r for r in JsonlStore(out / name / "data.jsonl") if r["id"] in ids]
    result = compare(runs["old"], runs["new"])
    report = {"diff": diff(old_c, new_c).as_dict(), **result}
    write_json_atomic(out / "report.json", report)
    metrics = {k: result[k] for k in ("pairs", "agreement", "mean_shift_p_a")} | {
        "flipped": len(result["flipped"])}
    return write_manifest(out, STAGE, config=cfg,
                          constitution=new_c.stamp.as_dict(),
                          models={"feedback": backend.identity}, started=t0,
                          counts={"pairs": result["pairs"]}, data=("report.json",),
                          extra={"metrics": metrics, "tokens": usage.since(tokens),
                                 "constitutions": {"old": old_c.stamp.as_dict(),
                                                   "new": new_c.stamp.as_dict()}})


register(Stage(STAGE, ConstitutionsEvalConfig, run_constitutions_eval,
               "Label the same pairs under two constitutions and compare.",
               inputs=(Input("pairs", "pairs"), Input("feedback_model", "judge-model", model=True),
                       Input("old", "constitution"), Input("new", "constitution")),
               outputs=("report.json",), positional=("old", "new"),
               command="eval constitutions"))

__all__ = ["ConstitutionsEvalConfig", "compare", "run_constitutions_eval"]
