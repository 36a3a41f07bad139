"""SL-CAI stage: structure and chats on a tiny random model; the real run on the embedded one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.backends.base import GenerationConfig, GenRequest
from cai.constitution import load
from cai.sl import SLConfig, quality, run_sl
from cai.templates import CRITIQUE_PREFIX, REVISION_PREFIX

from .conftest import MINIMAL, ROOT


class Recording:
    """A real backend that also keeps every generation request it was sent."""

    def __init__(self, inner):
        self.inner, self.spec, self.identity, self.calls = inner, inner.spec, inner.identity, []

    def generate(self, requests: list[GenRequest], config: GenerationConfig):
        self.calls.append(list(requests))
        return self.inner.generate(requests, config)

    def choice_logprobs(self, requests, choices=("A", "B")):
        return self.inner.choice_logprobs(requests, choices)

    def render(self, chat, answer_prefix=""):
        return self.inner.render(chat, answer_prefix)


def _prompts(tmp_path: Path, n: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question number {i}: how to x{i}?",
                                     "category": "crime"}) + "\n" for i in range(n)))
    return p


def _cfg(tmp_path: Path, n: int = 3, **kw) -> SLConfig:
    base = dict(prompts=str(_prompts(tmp_path, n)), constitution=str(MINIMAL), out=str(tmp_path / "sl"),
                rounds=2, max_new_tokens=6, temperature=1.0, seed=1)
    return SLConfig(**{**base, **kw})


def test_rounds_principles_and_batched_chats(tmp_path: Path, tiny_backend) -> None:
    rec = Recording(tiny_backend)
    manifest = run_sl(_cfg(tmp_path), rec)
    c = load(MINIMAL)
    records = [json.loads(x) for x in (tmp_path / "sl" / "data.jsonl").read_text().splitlines()]
    assert len(records) == 3 and manifest["counts"]["records"] == 3
    # One batched call for the initial responses, then per round one for all critiques and
    # one for all revisions: 1 + 2 x 2 calls, each carrying all three prompts.
    assert [len(call) for call in rec.calls] == [3, 3, 3, 3, 3]
    ids = {p.id for p in c.sl_principles}
    for r in records:
        assert [x["round"] for x in r["rounds"]] == [1, 2]
        assert all(x["principle"] in ids for x in r["rounds"])
        assert r["provenance"]["constitution"] == c.stamp.as_dict()
        assert r["final"] == r["rounds"][-1]["revision"]
    by_prompt = {r["prompt"]: r for r in records}
    for rnd in (1, 2):
        crit_call, rev_call = rec.calls[2 * rnd - 1], rec.calls[2 * rnd]
        for creq, rreq in zip(crit_call, rev_call):
            prompt = next(m["content"] for m in creq.chat[::-1] if m["content"] in by_prompt)
            r = by_prompt[prompt]
            step = r["rounds"][rnd - 1]
            principle = c.sl_principle(step["principle"])
            answer = r["initial"] if rnd == 1 else r["rounds"][rnd - 2]["revision"]
            # The critique request ends with the principle's critique, right after the answer.
            assert creq.chat[-1] == {"role": "user", "content": principle.critique}
            assert answer in creq.chat[-2]["content"]
            assert creq.answer_prefix.startswith(CRITIQUE_PREFIX)
            # The revision request carries the critique just made, then the revision ask.
            assert rreq.chat[-1] == {"role": "user", "content": principle.revision}
            assert rreq.chat[-2]["content"] == f"{CRITIQUE_PREFIX} {step['critique']}"
            assert rreq.answer_prefix.startswith(REVISION_PREFIX)
            # The constitution's worked example comes first in the same conversation.
            assert creq.chat[0]["content"] == c.few_shot[0].prompt


def test_seeded_determinism_and_seed_changes(tmp_path: Path, tiny_backend) -> None:
    run_sl(_cfg(tmp_path / "a"), tiny_backend)
    run_sl(_cfg(tmp_path / "b"), tiny_backend)
    run_sl(_cfg(tmp_path / "c", seed=2), tiny_backend)

    def strip(p: Path) -> list:
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "provenance"} for r in rows]

    a, b, c = (strip(tmp_path / d / "sl" / "data.jsonl") for d in "abc")
    assert a == b
    assert [r["rounds"] for r in a] != [r["rounds"] for r in c]


def test_resume_adds_only_new_prompts(tmp_path: Path, tiny_backend) -> None:
    rec = Recording(tiny_backend)
    run_sl(_cfg(tmp_path, n=4, limit=2), rec)
    first = (tmp_path / "sl" / "data.jsonl").read_text()
    rec.calls.clear()
    manifest = run_sl(_cfg(tmp_path, n=4), rec)
    assert manifest["counts"]["new"] == 2 and manifest["counts"]["records"] == 4
    assert all(len(call) == 2 for call in rec.calls)  # only the two new prompts were sent
    assert (tmp_path / "sl" / "data.jsonl").read_text().startswith(first)


def test_outputs_and_helpful_mix(tmp_path: Path, tiny_backend) -> None:
    helpful = tmp_path / "helpful.jsonl"
    helpful.write_text("".join(json.dumps({"prompt": f"Name a colour {i}"}) + "\n" for i in range(5)))
    cfg = _cfg(tmp_path, n=4, helpful_prompts=str(helpful), helpful_ratio=0.5, min_words=0)
    manifest = run_sl(cfg, tiny_backend)
    counts = manifest["counts"]
    assert counts["red_team"] == 4 and counts["helpful"] <= 2
    sft = [json.loads(x) for x in (tmp_path / "sl" / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (tmp_path / "sl" / "pairs.jsonl").read_text().splitlines()]
    assert len(sft) == counts["kept"] + counts["helpful"] == counts["sft_examples"]
    assert all([m["role"] for m in s["messages"]] == ["user", "assistant"] for s in sft)
    assert len(pairs) == counts["kept"] and all(p["p_chosen"] == 1.0 for p in pairs)
    data = json.loads((tmp_path / "sl" / "manifest.json").read_text())
    assert data["config"]["rounds"] == 2 and data["constitution"]["name"] == "minimal"
    assert (tmp_path / "sl" / "README.md").exists()


def test_quality_filters() -> None:
    from cai.sl import SLRound

    def rnd(crit: str, rev: str) -> SLRound:
        return SLRound(round=1, principle="x", critique_request="c", critique=crit,
                       revision_request="r", revision=rev)

    assert quality("a b c", [rnd("bad", "")], "", "stop", 3)[0] == ["empty-revision"]
    assert "cut-off-revision" in quality("a", [rnd("bad", "x y z w")], "x y z w", "length", 3)[0]
    assert "unchanged-revision" in quality("Same  answer here", [rnd("c", "same answer here")],
                                           "same answer here", "stop", 3)[0]
    assert "critique-format" in quality("a", [rnd("Revision: new", "x y z")], "x y z", "stop", 3)[0]
    assert "revision-format" in quality("a", [rnd("ok", "x y Human: z")], "x y Human: z", "stop", 3)[0]
    filters, flags = quality("a", [rnd("ok", "I'm sorry, but I can't help with that.")],
                             "I'm sorry, but I can't help with that.", "stop", 3)
    assert filters == [] and flags == ["bare-refusal"]


@pytest.mark.slow
def test_embedded_sl_run_and_resume(tmp_path: Path) -> None:
    """The issue's acceptance run: 8 prompts x 2 rounds, then 16 adds only 8."""
    from cai.backends import load_backend

    backend = load_backend("embedded:smollm2-135m")
    cfg = dict(prompts=str(ROOT / "prompts" / "red_team.jsonl"),
               constitution=str(ROOT / "constitutions" / "harmless.yaml"), out=str(tmp_path / "sl"),
               rounds=2, max_new_tokens=16, few_shot=0, seed=0)
    m8 = run_sl(SLConfig(**cfg, limit=8), backend)
    assert m8["counts"]["records"] == 8 and m8["counts"]["new"] == 8
    m16 = run_sl(SLConfig(**cfg, limit=16), backend)
    assert m16["counts"]["records"] == 16 and m16["counts"]["new"] == 8
    rows = [json.loads(x) for x in (tmp_path / "sl" / "data.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == 16 and all(len(r["rounds"]) == 2 for r in rows)
