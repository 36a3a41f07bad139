"""`cai demo`: the README demo, i.e. `cai pipeline run configs/demo.yaml` on the embedded model.

The embedded model is far too small to critique or judge well; the demo shows that every
stage runs, what each writes, and the report a real run produces. Point the same config at
real models for real data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_demo(out: Path | None = None, config: Path | None = None) -> dict[str, Any]:
    from cai.pipeline import load_pipeline_config, run_pipeline

    path = config or ROOT / "configs" / "demo.yaml"
    cfg = load_pipeline_config(path, {"out": str(out)} if out else None)
    return run_pipeline(cfg, where=str(path))
