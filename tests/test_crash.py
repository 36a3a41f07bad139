"""Crash safety: `cai sl` and `cai label` killed with SIGKILL part-way, then rerun, end with
exactly the dataset an uninterrupted run with the same seed writes (same ids, same content;
only the `created` timestamps differ)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import MINIMAL

CAI = str(Path(sys.executable).parent / "cai")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_when(args: list[str], data: Path, at: int, timeout: float = 120) -> None:
    """Run `cai ARGS` and SIGKILL it once `data` holds `at` complete lines."""
    proc = subprocess.Popen([CAI, *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while _lines(data) < at and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _run(args: list[str]) -> str:
    r = subprocess.run([CAI, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def _records(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    for r in rows:
        r["provenance"].pop("created")
    return rows


def _check_resumed(killed: Path, reference: Path, n: int) -> None:
    got, want = _records(killed / "data.jsonl"), _records(reference / "data.jsonl")
    assert len(want) == n and len({r["id"] for r in got}) == len(got)  # every id exactly once
    assert got == want  # same records, same order, same content
    mk, mr = (json.loads((d / "manifest.json").read_text()) for d in (killed, reference))
    assert mk["counts"]["records"] == mr["counts"]["records"] == n
    assert mk["counts"]["new"] < n  # the rerun resumed: it did not start over


def test_sl_killed_and_rerun_equals_an_uninterrupted_run(tmp_path: Path, tiny_model: Path) -> None:
    n = 5
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"How do I do risky thing {i}?"})
                               + "\n" for i in range(n)))
    args = ["sl", "--prompts", str(prompts), "--constitution", str(MINIMAL), "--model",
            f"hf:{tiny_model}?progress=0", "--rounds", "1", "--max-new-tokens", "16",
            "--temperature", "1.0", "--seed", "7", "--chunk-size", "1"]
    at = random.Random(os.getpid()).randint(1, n - 2)  # a different point on each run
    _kill_when([*args, "--out", str(tmp_path / "killed")], tmp_path / "killed" / "data.jsonl", at)
    assert not (tmp_path / "killed" / "manifest.json").exists()
    _run([*args, "--out", str(tmp_path / "killed")])
    _run([*args, "--out", str(tmp_path / "reference")])
    _check_resumed(tmp_path / "killed", tmp_path / "reference", n)
    for name in ("sft.jsonl", "pairs.jsonl"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "reference" / name).read_text()


def test_label_killed_and_rerun_equals_an_uninterrupted_run(tmp_path: Path, tiny_model: Path) -> None:
    n = 6
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": f"Question {i}: how should I handle this?",
        "response_a": f"Answer {i}: do it carefully. " * 12,
        "response_b": f"Answer {i}: I would rather not say. " * 12}) + "\n" for i in range(n)))
    args = ["label", "--pairs", str(pairs), "--constitution", str(MINIMAL), "--principles", "3",
            "--feedback-model", f"hf:{tiny_model}?progress=0", "--seed", "3", "--chunk-size", "1"]
    killed = tmp_path / "killed"
    at = random.Random(os.getpid()).randint(1, n - 2)
    _kill_when([*args, "--out", str(killed)], killed / "data.jsonl", at)
    # As if the kill had also landed in the middle of writing a line: the rerun drops it.
    with open(killed / "data.jsonl", "ab") as fh:
        fh.write(b'{"schema_version": "cai.record/v1", "id": "0123')
    assert "dropped a torn last line" in _run([*args, "--out", str(killed)])
    _run([*args, "--out", str(tmp_path / "reference")])
    _check_resumed(killed, tmp_path / "reference", n)
    reference = tmp_path / "reference" / "preferences.jsonl"
    assert (killed / "preferences.jsonl").read_text() == reference.read_text()
