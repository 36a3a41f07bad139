"""What does a constitution edit change? Label the same pairs under both versions and compare,
before spending any compute on training.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cai.backends import Backend, load_backend
from cai.config import to_dict
from cai.constitution import diff, load
from cai.feedback import LabelConfig, run_label
from cai.records import JsonlStore, write_json_atomic


@dataclass
class ConstitutionsEvalConfig:
    """Configuration of `cai eval constitutions`."""

    old: str = "constitutions/harmless.yaml"
    """The constitution before the edit."""
    new: str = "constitutions/harmless.yaml"
    """The constitution after the edit."""
    pairs: str = "pairs.jsonl"
    """Pairs to label under both (prompt, response_a, response_b)."""
    feedback_model: str = "embedded:smollm2-135m"
    """Model spec of the judge."""
    out: str = "runs/eval/constitutions"
    """Folder: old/ and new/ label runs (resumable) and report.json."""
    principles: int = 4
    """K principles per pair."""
    orders: str = "both"
    """"both" or "one"."""
    limit: int | None = None
    """Use only the first N pairs."""
    seed: int = 0
    """Seed of the principle draws (the same for both runs)."""


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


def run_constitutions_eval(cfg: ConstitutionsEvalConfig,
                           backend: Backend | None = None) -> dict[str, Any]:
    t0 = time.time()
    old_c, new_c = load(cfg.old), load(cfg.new)
    backend = backend or load_backend(cfg.feedback_model)
    out = Path(cfg.out)
    base = LabelConfig(pairs=cfg.pairs, feedback_model=backend.spec, principles=cfg.principles,
                       orders=cfg.orders, limit=cfg.limit, seed=cfg.seed)
    for name, path in (("old", cfg.old), ("new", cfg.new)):
        run_label(dataclasses.replace(base, constitution=path, out=str(out / name)), backend)
    result = compare(JsonlStore(out / "old" / "data.jsonl").read(),
                     JsonlStore(out / "new" / "data.jsonl").read())
    report = {"stage": "eval-constitutions", "config": to_dict(cfg),
              "diff": diff(old_c, new_c).as_dict(), **result,
              "timings_s": {"total": round(time.time() - t0, 2)}, "output": str(out)}
    write_json_atomic(out / "report.json", report)
    return {"stage": report["stage"], "output": str(out),
            "metrics": {k: result[k] for k in ("pairs", "agreement", "mean_shift_p_a")}
            | {"flipped": len(result["flipped"])}}


__all__ = ["ConstitutionsEvalConfig", "compare", "run_constitutions_eval"]
