"""A training run killed with SIGKILL and rerun ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

CAI = str(Path(sys.executable).parent / "cai")


@pytest.fixture(scope="module")
def tiny_pm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    out = tmp_path_factory.mktemp("crash-pm")
    LlamaForSequenceClassification(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _args(tiny_model: Path, pm: Path, out: Path) -> list[str]:
    return [CAI, "train", "rl", "--algo", "ppo", "--model", str(tiny_model), "--reward", f"pm:{pm}",
            "--prompts", "red_team", "--limit", "8", "--steps", "5", "--batch-size", "2",
            "--minibatch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "6",
            "--save-every", "1", "--no-lora", "--seed", "3", "--out", str(out)]


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]


def test_ppo_killed_and_rerun_equals_uninterrupted(tmp_path, tiny_model, tiny_pm) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    r = subprocess.run(_args(tiny_model, tiny_pm, straight), capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_args(tiny_model, tiny_pm, killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "log.jsonl").exists() and len(_log(killed)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    r = subprocess.run(_args(tiny_model, tiny_pm, killed), capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _log(straight), _log(killed)
    assert [e["step"] for e in b] == [1, 2, 3, 4, 5]  # every step once
    for x, y in zip(a, b):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-5)
        assert x["kl"] == pytest.approx(y["kl"], abs=1e-5)
