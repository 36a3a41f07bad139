"""`--engine ray`: a local Ray cluster with two CPU workers gives the same records as the local
engine, and a worker killed mid-run still ends with every record exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import MINIMAL

CAI = str(Path(sys.executable).parent / "cai")
pytestmark = pytest.mark.slow


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _pairs(tmp_path: Path, n: int) -> Path:
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Question {i}: is this safe?", "response_a": f"Yes {i}.",
                                     "response_b": f"No, because {i} is risky."}) + "\n" for i in range(n)))
    return p


def _run(args: list[str], env: dict, kill_after: int | None = None, pids: Path | None = None,
         data: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command; optionally SIGKILL one Ray worker once `kill_after` records exist."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = threading.Event()

    def killer() -> None:
        while proc.poll() is None and not killed.is_set():
            n = len(data.read_text().splitlines()) if data and data.exists() else 0
            if pids and pids.exists() and n >= (kill_after or 0):
                pid = int(pids.read_text().split()[0])
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.set()
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.05)

    if kill_after is not None:
        threading.Thread(target=killer, daemon=True).start()
    out, err = proc.communicate(timeout=900)
    if kill_after is not None:
        assert killed.is_set(), "no worker was killed"
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _local_and_ray(tmp_path: Path, base: list[str], kill_after: int, n: int):
    """Run `base` locally, then on Ray with a worker killed; records of both, by id."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    local = _run([*base, "--out", str(tmp_path / "local")], env)
    assert local.returncode == 0, local.stderr[-2000:]
    pids = tmp_path / "pids"
    ray_dir = tmp_path / "ray"
    r = _run([*base, "--out", str(ray_dir), "--engine", "ray", "--workers", "2"],
             {**env, "CAI_RAY_WORKER_PIDS": str(pids)}, kill_after=kill_after, pids=pids,
             data=ray_dir / "data.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _records(tmp_path / "local" / "data.jsonl"), _records(ray_dir / "data.jsonl")
    assert len((ray_dir / "data.jsonl").read_text().splitlines()) == len(b) == n  # each once
    assert a.keys() == b.keys()
    return a, b


def test_label_ray_equals_local_and_survives_a_killed_worker(tmp_path, tiny_model) -> None:
    base = [CAI, "label", "--pairs", str(_pairs(tmp_path, 12)), "--constitution", str(MINIMAL),
            "--principles", "2", "--feedback-model", f"hf:{tiny_model}?progress=0", "--chunk-size", "2"]
    a, b = _local_and_ray(tmp_path, base, kill_after=2, n=12)
    for rid in a:
        assert abs(a[rid]["p_a"] - b[rid]["p_a"]) < 1e-6


def test_sl_ray_equals_local_and_survives_a_killed_worker(tmp_path, tiny_model) -> None:
    base = [CAI, "sl", "--constitution", str(MINIMAL), "--model", f"hf:{tiny_model}?progress=0",
            "--limit", "6", "--rounds", "1", "--max-new-tokens", "6", "--chunk-size", "2"]
    a, b = _local_and_ray(tmp_path, base, kill_after=1, n=6)
    for rid in a:
        assert a[rid]["final"] == b[rid]["final"] and a[rid]["rounds"] == b[rid]["rounds"]
