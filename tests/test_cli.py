"""The CLI on bad input: one clear message naming file:line and field, exit 2, no traceback,
nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MINIMAL

CAI = str(Path(sys.executable).parent / "cai")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CAI, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("content, where", [
    ('{"prompt": "fine"}\n{"prompt": "broken"\n', ":2"),
    ('{"prompt": "fine"}\n{"text": "no prompt field"}\n', ":2: prompt"),
    ('{"prompt": ""}\n', ":1: prompt"),
])
def test_sl_bad_prompts(tmp_path: Path, content: str, where: str) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    r = _run("sl", "--prompts", str(bad), "--constitution", str(MINIMAL), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert f"{bad}{where}" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_label_bad_pairs_and_options(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "response_a": "a"}\n')
    out = tmp_path / "out"
    r = _run("label", "--pairs", str(bad), "--constitution", str(MINIMAL), "--principles", "2",
             "--out", str(out))
    assert r.returncode == 2 and f"{bad}:1: response_b" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = _run("label", "--pairs", str(bad), "--mode", "vibes", "--out", str(out))
    assert r.returncode == 2 and "mode" in r.stderr and "Traceback" not in r.stderr
    r = _run("label", "--pairs", str(bad), "--principles", "many")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_bad_config_file_names_field(tmp_path: Path) -> None:
    cfg = tmp_path / "sl.yaml"
    cfg.write_text("rounds: 2\nwobble: 3\n")
    r = _run("sl", "--config", str(cfg))
    assert r.returncode == 2 and "wobble" in r.stderr and str(cfg) in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_model_spec(tmp_path: Path) -> None:
    r = _run("models", "path", "nope:thing")
    assert r.returncode == 2 and "unknown model spec" in r.stderr and "Traceback" not in r.stderr


def test_public_api_names_resolve() -> None:
    import cai

    for name in cai.__all__:
        assert getattr(cai, name) is not None
    with pytest.raises(AttributeError):
        cai.not_a_thing  # noqa: B018


def test_list_field_from_one_flag_is_a_list_of_names() -> None:
    """A list field given as one command-line value (`--monitors a,b`) is a list of names,
    not a string read as characters; a YAML list passes as it is; an empty name is refused."""
    from cai.core.config import coerce
    from cai.core.errors import CaiError
    from cai.train.rl import RLConfig

    assert coerce(RLConfig, "monitors", "gold=python:g.py:f") == ["gold=python:g.py:f"]
    assert coerce(RLConfig, "monitors", "python:a.py:f, test-pm") == ["python:a.py:f", "test-pm"]
    assert coerce(RLConfig, "monitors", ["python:a.py:f"]) == ["python:a.py:f"]
    with pytest.raises(CaiError, match="monitors"):
        coerce(RLConfig, "monitors", "a,,b")
    # A field that takes text or a list keeps a single text as text.
    from cai.train.pm import PMConfig
    assert coerce(PMConfig, "preferences", "run/label") == "run/label"
