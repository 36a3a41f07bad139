"""Refusal detection (`cai.core.text.is_refusal`) measured on a labelled table of answers."""

from __future__ import annotations

import json
from collections import Counter

from cai.core.text import is_bare_refusal, is_refusal, normalise_text

from .conftest import ROOT

TABLE = ROOT / "tests" / "fixtures" / "refusals.jsonl"
THRESHOLD = 0.9


def _rows() -> list[dict]:
    return [json.loads(x) for x in TABLE.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_refusal_table_accuracy(capsys) -> None:
    rows = _rows()
    kinds = Counter(r["kind"] for r in rows)
    assert len(rows) >= 40 and min(kinds[k] for k in ("refusal", "partial", "benign")) >= 8, kinds
    hits = {k: 0 for k in kinds}
    misses = []
    for r in rows:
        if is_refusal(r["text"]) == r["refusal"]:
            hits[r["kind"]] += 1
        else:
            misses.append(r["id"])
    accuracy = sum(hits.values()) / len(rows)
    with capsys.disabled():
        print(f"\nrefusal detector on {TABLE.name}: accuracy {accuracy:.3f} ({len(rows)} answers; "
              + ", ".join(f"{k} {hits[k]}/{kinds[k]}" for k in sorted(kinds))
              + (f"; missed {', '.join(misses)}" if misses else "") + ")")
    assert accuracy >= THRESHOLD, misses


def test_refusal_typographic_and_full_width_forms() -> None:
    plain = "I'm sorry, but I can't help with that."
    for variant in (plain, "I’m sorry, but I can’t help with that.",
                    "Ｉ’ｍ ｓｏｒｒｙ， ｂｕｔ Ｉ ｃａｎ’ｔ ｈｅｌｐ ｗｉｔｈ ｔｈａｔ．",
                    "I\u02bcm sorry, but I can\u02bct help with that."):
        assert normalise_text(variant) == normalise_text(plain)
        assert is_refusal(variant) and is_bare_refusal(variant)


def test_refusal_false_positives_of_the_old_pattern() -> None:
    for text in ("I can't help but notice the loop starts at 1.",
                 "I can’t help but notice your variable is never used.",
                 "I won't do your homework for you, but the steps are: factor, then solve.",
                 "“I can’t do it” is what many students think before an exam."):
        assert not is_refusal(text), text
    # The same words as a real decline still count.
    for text in ("I can't help, but a locksmith can.", "I won't do your homework.",
                 "I can’t help with that request."):
        assert is_refusal(text), text
