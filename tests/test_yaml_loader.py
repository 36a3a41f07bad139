"""One YAML loader (`cai.core.config.load_yaml_mapping`) under stage and pipeline configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai.core.config import load_yaml_mapping
from cai.core.errors import CaiError
from cai.pipeline import load_pipeline_config


def _file(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "c.yaml"
    p.write_bytes(data)
    return p


def test_mapping_and_section(tmp_path: Path) -> None:
    p = _file(tmp_path, b"\xef\xbb\xbfa: 1\nrl:\n  steps: 3\n")
    assert load_yaml_mapping(p) == {"a": 1, "rl": {"steps": 3}}
    assert load_yaml_mapping(p, section="rl") == {"steps": 3}
    assert load_yaml_mapping(_file(tmp_path, b"")) == {}


@pytest.mark.parametrize(("data", "where", "message"), [
    (b"a: 1\nb: x: y\n", ":2", "YAML syntax error"),
    (b"a: 1\nb: \xff\n", ":2", "not UTF-8 text"),
    (b"- 1\n- 2\n", "", "expected a mapping"),
    (b"1: x\n", "", "option names must be text"),
])
def test_errors_name_file_and_line(tmp_path: Path, data: bytes, where: str, message: str) -> None:
    p = _file(tmp_path, data)
    for load in (load_yaml_mapping, load_pipeline_config):
        with pytest.raises(CaiError, match=message) as e:
            load(p)
        assert e.value.where == f"{p}{where}"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CaiError, match="cannot read pipeline config"):
        load_pipeline_config(tmp_path / "none.yaml")
