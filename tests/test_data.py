"""Prompt sets: the shipped ones, and loading a user's jsonl or local dataset folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.core.data import load_pairs, load_prompts
from cai.core.errors import CaiError
from cai.evaluate.labeler import load_items

from .conftest import ROOT


@pytest.mark.parametrize("name, minimum, categories", [
    ("red_team.jsonl", 150, 10), ("helpful.jsonl", 100, 6), ("benign_sensitive.jsonl", 50, 6)])
def test_shipped_prompt_sets(name: str, minimum: int, categories: int) -> None:
    items = load_prompts(ROOT / "prompts" / name)
    assert len(items) >= minimum
    assert all(i.category for i in items) and len({i.category for i in items}) >= categories
    assert len({i.id for i in items}) == len(items) and len({i.prompt for i in items}) == len(items)


def test_red_team_covers_the_harm_areas() -> None:
    cats = {i.category for i in load_prompts(ROOT / "prompts" / "red_team.jsonl")}
    assert {"violence", "crime", "dangerous-knowledge", "discrimination", "privacy", "manipulation",
            "self-harm", "unethical-advice", "toxicity", "deception"} <= cats


def test_labeler_items() -> None:
    items = load_items(ROOT / "prompts" / "labeler_ab.jsonl")
    assert len(items) >= 60 and {i.category for i in items} >= {"harmless", "helpful", "honest"}
    assert {i.correct for i in items} == {0, 1}


def test_jsonl_and_dataset_folder_with_custom_field(tmp_path: Path) -> None:
    import datasets

    p = tmp_path / "mine.jsonl"
    p.write_text("".join(json.dumps({"question": f"q{i}", "category": "x"}) + "\n" for i in range(3)))
    items = load_prompts(p, text_field="question", limit=2)
    assert [i.prompt for i in items] == ["q0", "q1"]
    datasets.Dataset.from_list([{"question": f"d{i}"} for i in range(4)]).save_to_disk(str(tmp_path / "ds"))
    loaded = load_prompts(tmp_path / "ds", text_field="question")
    assert [i.prompt for i in loaded] == ["d0", "d1", "d2", "d3"]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": ', "mine.jsonl:2: invalid JSON"),
    ('{"prompt": "ok"}\n{"text": "x"}\n', "mine.jsonl:2: prompt: missing"),
    ('["not", "an", "object"]\n', "mine.jsonl:1: expected a JSON object"),
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "mine.jsonl:2: id: duplicate"),
])
def test_bad_prompt_files_name_file_line_field(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "mine.jsonl"
    p.write_text(content)
    with pytest.raises(CaiError) as err:
        load_prompts(p)
    assert message in str(err.value)


def test_pairs_loader(tmp_path: Path) -> None:
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "p", "response_a": "a", "response_b": "b"}\n{"prompt": "p"}\n')
    with pytest.raises(CaiError, match="pairs.jsonl:2: response_a"):
        load_pairs(p)
