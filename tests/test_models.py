"""Model specs and the embedded model's cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cai.core.errors import CaiError
from cai.core.models import SPEED_OPTIONS, local_path, model_identity, parse_spec, resolve_spec

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


def test_resolved_spec_identity_and_speed_options() -> None:
    r = resolve_spec("hf:/models/x?dtype=bfloat16&batch_size=4&progress=0")
    assert r.speed == {"batch_size", "progress"} and r.speed <= SPEED_OPTIONS
    assert r.identity == "hf:/models/x?dtype=bfloat16" == model_identity(r.raw)
    assert (r.backend, r.target, r.options["dtype"]) == ("hf", "/models/x", "bfloat16")
    assert resolve_spec(r) is r  # handing a resolved spec on never parses it again
    # Speed options leave the identity alone; an option that changes outputs does not.
    assert resolve_spec("hf:/models/x?dtype=bfloat16&batch_size=16").identity == r.identity
    assert resolve_spec("hf:/models/x?dtype=float32&batch_size=4").identity != r.identity
    assert "dtype" not in SPEED_OPTIONS and "chat" not in SPEED_OPTIONS


def test_resolved_spec_works_things_out_once(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"data": {"sha256": "sha256:' + "a" * 64 + '"}}')
    r = resolve_spec(f"hf:{folder}?batch_size=2")
    assert r.identity == f"hf:{folder}@{'a' * 12}" and r.path == folder
    # Retrained weights: a fresh resolve names another model, the resolved one keeps its own.
    (folder / "manifest.json").write_text('{"data": {"sha256": "sha256:' + "b" * 64 + '"}}')
    assert model_identity(f"hf:{folder}") == f"hf:{folder}@{'b' * 12}"
    assert r.identity.endswith("@" + "a" * 12)
    (folder / "manifest.json").unlink()
    folder.rmdir()
    assert r.path == folder  # found once, kept
    with pytest.raises(CaiError, match="not found"):
        local_path(f"hf:{folder}")


def test_backend_takes_the_resolved_spec(tiny_model: Path) -> None:
    from cai.backends import load_backend

    r = resolve_spec(f"hf:{tiny_model}?progress=0&batch_size=2")
    b = load_backend(r, reuse=False)
    assert b.resolved is r and b.identity == r.identity == f"hf:{tiny_model}"
    assert b.spec == r.raw and b.options.batch_size == 2 and not b.options.progress
