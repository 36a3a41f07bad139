"""Behaviour pinned across refactors: a fixed tiny run (sl, sft, label, pm, rl on the tiny
random model, fixed seeds) must write the same data, byte for byte, before and after code
moves. Paths are relative so record ids do not depend on the temporary folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import ROOT

CAI = str(Path(sys.executable).parent / "cai")

# Recorded on the layout before the architecture step. Change them only in a commit that
# means to change outputs, and say so there.
GOLDEN: dict[str, dict[str, str]] = {
    "sl": {"data.jsonl": "86a6886276b26b5f",
           "pairs.jsonl": "50059c1d3c5f3479", "sft.jsonl": "73d2ae979c85e9c6"},
    "sft": {"model.safetensors": "5e48c55dee685d30"},
    "label": {"data.jsonl": "190a7420900ffa37",
              "preferences.jsonl": "f51a5ce06f79095f", "responses.jsonl": "e692e5867f0eef5d"},
    "pm": {"model.safetensors": "6e81239e9125dab7"},
    "rl": {"model.safetensors": "fae416844d2f6a80"},
}


def _without_clock(value: object) -> object:
    """A record less its `created` time: the one field that differs between two runs."""
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if k != "created"}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


def _digest(path: Path) -> str:
    if path.suffix != ".jsonl":
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    lines = [json.dumps(_without_clock(json.loads(x)), sort_keys=True)
             for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _digests(root: Path) -> dict[str, dict[str, str]]:
    """Each stage's data files (as its manifest lists them), hashed without the clock."""
    out: dict[str, dict[str, str]] = {}
    for stage in ("sl", "sft", "label", "pm", "rl"):
        m = json.loads((root / stage / "manifest.json").read_text())
        out[stage] = {name: _digest(root / stage / name) for name in sorted(m["data"]["files"])}
    return out


def test_golden_tiny_run_hashes(tiny_model: Path, tmp_path: Path) -> None:
    """sl, label, pm and rl write the same bytes as on the recorded layout.

    The run is a fresh `cai` process with one thread: in the test process an earlier test
    (vLLM's CPU worker binds threads) can change the thread count, and with it the last bits
    of a float sum."""
    os.symlink(tiny_model, tmp_path / "tiny")
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.update(model="tiny", feedback_model="hf:tiny?progress=0", out="run",
                stages=["sl", "sft", "label", "pm", "rl"])
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([CAI, "pipeline", "run", "pipeline.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    got = _digests(tmp_path / "run")
    assert got == GOLDEN
