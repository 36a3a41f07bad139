"""Model specs and the embedded model's cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cai.core.errors import CaiError
from cai.core.models import parse_spec

CAI = str(Path(sys.executable).parent / "cai")


def test_spec_forms(tmp_path: Path) -> None:
    s = parse_spec("embedded:smollm2-135m")
    assert (s.backend, s.target) == ("hf", "embedded:smollm2-135m")
    assert parse_spec("hf:/models/x?dtype=bfloat16").options == {"dtype": "bfloat16"}
    assert parse_spec("vllm:embedded:smollm2-135m").target == "embedded:smollm2-135m"
    o = parse_spec("openai:http://127.0.0.1:8000/v1#smol?tokenizer=embedded:smollm2-135m")
    assert (o.backend, o.target, o.served_name, o.options["tokenizer"]) == (
        "openai", "http://127.0.0.1:8000/v1", "smol", "embedded:smollm2-135m")
    assert parse_spec(str(tmp_path)).backend == "hf"
    for bad in ("", "nope:thing", "openai:localhost#x"):
        with pytest.raises(CaiError):
            parse_spec(bad)


def test_models_list_and_path(embedded_path: Path) -> None:
    r = subprocess.run([CAI, "models", "list"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "embedded:smollm2-135m" in r.stdout and "cached" in r.stdout
    r = subprocess.run([CAI, "models", "path", "embedded:smollm2-135m"], capture_output=True, text=True,
                       timeout=300)
    folder = Path(r.stdout.strip())
    assert r.returncode == 0 and folder == embedded_path
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    r = subprocess.run([CAI, "models", "path", "hf:/does/not/exist"], capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
