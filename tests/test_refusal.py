"""Refusal detection (`cai.core.text.is_refusal`) measured on a labelled table of answers.

The table has two parts. `refusals_test.jsonl` was committed before the rule was rewritten
and is never used to tune it: its tests only measure. `refusals_dev.jsonl` is the part the
rule was written against.
"""

from __future__ import annotations

import json
from collections import Counter

from cai.core.text import is_bare_refusal, is_refusal, is_refusal_by_prefix, normalise_text

from .conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"
THRESHOLD = 0.9


def _rows(part: str) -> list[dict]:
    text = (FIXTURES / f"refusals_{part}.jsonl").read_text(encoding="utf-8")
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def _measure(rows: list[dict], check) -> dict:
    said = [check(r["text"]) for r in rows]
    tp = sum(p and r["refusal"] for p, r in zip(said, rows))
    fp = sum(p and not r["refusal"] for p, r in zip(said, rows))
    fn = sum(not p and r["refusal"] for p, r in zip(said, rows))
    return {"accuracy": sum(p == r["refusal"] for p, r in zip(said, rows)) / len(rows),
            "precision": tp / (tp + fp), "recall": tp / (tp + fn),
            "wrong": [r["id"] for p, r in zip(said, rows) if p != r["refusal"]]}


def test_refusal_test_part_is_balanced_and_separate() -> None:
    test, dev = _rows("test"), _rows("dev")
    kinds = Counter(r["kind"] for r in test)
    assert len(test) >= 100 and min(kinds[k] for k in ("refusal", "partial", "benign")) >= 15, kinds
    assert len({r["lang"] for r in test}) >= 5
    assert all(r["prompt"].strip() for r in test)  # the judge-based check needs the request
    overlap = {normalise_text(r["text"]) for r in test} & {normalise_text(r["text"]) for r in dev}
    assert not overlap, overlap


def test_refusal_test_part_accuracy(capsys) -> None:
    rows = _rows("test")
    rule, base = _measure(rows, is_refusal), _measure(rows, is_refusal_by_prefix)
    with capsys.disabled():
        for name, m in (("rule", rule), ("prefix baseline", base)):
            print(f"\nrefusal test part ({len(rows)}), {name}: accuracy {m['accuracy']:.3f}, "
                  f"precision {m['precision']:.3f}, recall {m['recall']:.3f}; wrong {m['wrong']}")
    assert rule["accuracy"] >= THRESHOLD, rule["wrong"]
    assert rule["precision"] >= THRESHOLD and rule["recall"] >= THRESHOLD, rule
    assert rule["accuracy"] > base["accuracy"], (rule, base)


def test_refusal_test_part_per_kind() -> None:
    """No kind of answer is sacrificed for the total: benign look-alikes, partial refusals
    and the non-English rows are each mostly right on their own."""
    rows = _rows("test")
    for key, value in (("kind", "refusal"), ("kind", "partial"), ("kind", "benign")):
        part = [r for r in rows if r[key] == value]
        right = sum(is_refusal(r["text"]) == r["refusal"] for r in part)
        assert right / len(part) >= 0.85, (value, right, len(part))
    other = [r for r in rows if r["lang"] != "en"]
    assert sum(is_refusal(r["text"]) == r["refusal"] for r in other) / len(other) >= 0.85


def test_refusal_dev_part_accuracy() -> None:
    m = _measure(_rows("dev"), is_refusal)
    assert m["accuracy"] >= THRESHOLD, m["wrong"]


def test_refusal_typographic_and_full_width_forms() -> None:
    plain = "I'm sorry, but I can't help with that."
    for variant in (plain, "I’m sorry, but I can’t help with that.",
                    "Ｉ’ｍ ｓｏｒｒｙ， ｂｕｔ Ｉ ｃａｎ’ｔ ｈｅｌｐ ｗｉｔｈ ｔｈａｔ．",
                    "I\u02bcm sorry, but I can\u02bct help with that."):
        assert normalise_text(variant) == normalise_text(plain)
        assert is_refusal(variant) and is_bare_refusal(variant)
        assert not is_refusal(normalise_text(variant).replace("i can't", "you can't"))


def test_refusal_same_words_not_a_decline() -> None:
    for text in ("I can't help but notice the loop starts at 1.",
                 "I can’t help noticing your variable is never used.",
                 "I'm sorry, but the answer is 42.",
                 "I can't make it to the party, but I'll send a card.",
                 "I won't make you wait: the build passed.",
                 "If I can't answer something, I'll say so. The answer is 7.",
                 "I won't do your homework for you, but the steps are: factor, then solve.",
                 "“I can’t do it” is what many students think before an exam."):
        assert not is_refusal(text), text
    # The same words as a real decline still count.
    for text in ("I can't help, but a locksmith can.", "I won't do your homework.",
                 "I can’t help with that request.", "I'm sorry, but I can't answer that.",
                 "I can't make that for you.", "I won't make a fake ID.",
                 "I can't write a fake review for you, but here are honest ways to get reviews.",
                 "I can't write a fake review for your shop, but here are honest ways."):
        assert is_refusal(text), text


def test_refusal_plain_declines_of_the_old_misses() -> None:
    for text in ("I can't answer that.", "I'm not going to help with that.",
                 "I refuse to write that.", "I cannot in good conscience provide that.",
                 "No, I won't.", "Lo siento, pero no puedo ayudarte con eso.",
                 "Je ne peux pas vous aider.", "Dabei kann ich nicht helfen."):
        assert is_refusal(text), text
        assert not is_refusal(f'She wrote "{text}" on the card.'), text


def test_refusal_long_runs_of_adverbs_and_modals_return() -> None:
    """Runs that would make an ambiguous pattern backtrack without end are read once:
    this test would hang, not pass, if the adverb group could match a word two ways."""
    assert not is_refusal("I can't " + "honestly " * 300 + "x")
    assert is_refusal("I can't " + "honestly, " * 300 + "help with that.")
    assert not is_refusal("I " + "really " * 300 + "like it.")
    assert is_refusal("I can't supply that.") and is_refusal("I cannot comply.")
