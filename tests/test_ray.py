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


@pytest.fixture(scope="module")
def second_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random init of the tiny Llama: a second policy whose answers differ."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-llama-b")
    LlamaForCausalLM(AutoConfig.from_pretrained(str(tiny_model))).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(out))
    return out


def _same(a: object, b: object, where: str = "") -> None:
    """Equal records: floats (log-probs, probabilities) within 1e-3, everything else exact."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), where
        assert abs(a - b) < 1e-3, f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k != "created":  # a record's timestamp: when, not what
                _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for n, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{n}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_ray_policies_equal_local_and_survive_a_killed_worker(tmp_path, tiny_model, second_model) -> None:
    spec = "hf:{}?progress=0"
    base = [CAI, "eval", "policies", "--models",
            f"base={spec.format(tiny_model)},other={spec.format(second_model)}",
            "--feedback-model", spec.format(tiny_model), "--constitution", str(MINIMAL),
            "--principles", "1", "--limit", "3", "--max-new-tokens", "12", "--n-boot", "20",
            "--chunk-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    local = _run([*base, "--out", str(tmp_path / "local")], env)
    assert local.returncode == 0, local.stderr[-2000:]
    pids, ray_dir = tmp_path / "pids", tmp_path / "ray"
    # A worker of the first pool (the base policy's answers) dies after the first answer.
    r = _run([*base, "--out", str(ray_dir), "--engine", "ray", "--workers", "2"],
             {**env, "CAI_RAY_WORKER_PIDS": str(pids)}, kill_after=1, pids=pids,
             data=ray_dir / "responses.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("responses.jsonl", "comparisons.jsonl", "refusal_judgements.jsonl"):
        lines = (ray_dir / name).read_text().splitlines()
        a, b = _records(tmp_path / "local" / name), _records(ray_dir / name)
        assert len(lines) == len(b) and a and a.keys() == b.keys(), name  # each record once
        for rid in a:
            _same(a[rid], b[rid], f"{name}:{rid}")
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "local", ray_dir))
    _same(ra["elo"], rb["elo"], "elo")
    m = json.loads((ray_dir / "manifest.json").read_text())
    assert m["config"]["engine"] == "ray" and m["counts"]["new_comparisons"] == len(
        _records(ray_dir / "comparisons.jsonl"))
    # Resume: a rerun on Ray finds everything done and writes nothing.
    again = _run([*base, "--out", str(ray_dir), "--engine", "ray", "--workers", "2"], env)
    assert again.returncode == 0, again.stderr[-2000:]
    m2 = json.loads((ray_dir / "manifest.json").read_text())
    assert m2["counts"]["new_answers"] == m2["counts"]["new_comparisons"] == 0


def test_eval_policies_takes_the_engine_fields_from_cli_and_pipeline(tmp_path) -> None:
    """The same engine fields as sl/label: set or unset, from a YAML section, and refused in
    one line when bad (before any model loads)."""
    import yaml

    from cai.core.config import from_dict
    from cai.core.errors import CaiError
    from cai.evaluate.policies import PoliciesEvalConfig
    from cai.pipeline import load_pipeline_config, plan

    unset = from_dict(PoliciesEvalConfig, {"models": "a=x,b=y"})
    assert (unset.engine, unset.workers, unset.ray_address) == ("local", 2, None)
    ray = from_dict(PoliciesEvalConfig, {"models": "a=x,b=y", "engine": "ray", "workers": 3,
                                         "gpus_per_worker": 0.5})
    assert (ray.engine, ray.workers, ray.gpus_per_worker) == ("ray", 3, 0.5)

    def pipeline(section: dict) -> Path:
        path = tmp_path / "pipe.yaml"
        path.write_text(yaml.safe_dump({"name": "t", "out": str(tmp_path / "run"), "model": "hf:/a",
                                        "stages": ["sl", "sft", "eval"], "eval": section}))
        return path

    step = plan(load_pipeline_config(pipeline({"engine": "ray", "workers": 3})))[-1]
    assert step.stage == "eval" and (step.config.engine, step.config.workers) == ("ray", 3)
    assert plan(load_pipeline_config(pipeline({})))[-1].config.engine == "local"
    with pytest.raises(CaiError, match="eval: engine: use local or ray"):
        plan(load_pipeline_config(pipeline({"engine": "spark"})))
    r = subprocess.run([CAI, "eval", "policies", "a=hf:/x,b=hf:/y", "--engine", "spark",
                        "--out", str(tmp_path / "e")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "engine: use local or ray" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
    r = subprocess.run([CAI, "eval", "policies", "--help"], capture_output=True, text=True, timeout=120)
    assert "--engine" in r.stdout and "--ray-address" in r.stdout and "--workers" in r.stdout
