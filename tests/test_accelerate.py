"""Every TRL-based trainer runs under `accelerate launch` with a shipped config (one CPU
process here; the same command with configs/accelerate/ddp|fsdp|zero2|zero3.yaml on GPUs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def _prefs(path: Path) -> Path:
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"A kind answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"A rude answer {i}!"}],
             "p_chosen": 0.8} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("stage, extra", [
    ("sft", ["--data", "{sft}"]),
    ("pm", ["--preferences", "{prefs}", "--eval-fraction", "0.34"]),
    ("dpo", ["--preferences", "{prefs}", "--eval-fraction", "0.34"]),
])
def test_trainer_under_accelerate_launch(tmp_path, tiny_model, stage, extra) -> None:
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                    {"role": "assistant", "content": "hello there"}]})
                           + "\n" for i in range(4)))
    prefs = _prefs(tmp_path / "prefs.jsonl")
    out = tmp_path / stage
    args = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu.yaml"),
            "-m", "cai.cli", "train", stage, "--model", str(tiny_model), "--out", str(out),
            "--max-steps", "2", "--batch-size", "2",
            *[a.format(sft=sft, prefs=prefs) for a in extra]]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == f"train.{stage}" and (out / "model.safetensors").exists()
