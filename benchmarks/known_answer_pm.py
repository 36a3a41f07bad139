"""How well a preference model learns the known-answer gold from a label run's labels.

    python benchmarks/known_answer_pm.py runs/known-answer/label '{"learning_rate": 1e-3}'

The label run's prompts are halved by a seeded hash (`split_rows`): a PM is trained on the
first half's labelled pairs (ties dropped, as `configs/known-answer.yaml` does) with the
known-answer PM settings plus the JSON overrides given, then scored on every pair of the
other half on which the exact gold differs. That separates "the PM cannot learn the gold
from this many examples" from "the PM was trained badly": vary the overrides, not the data.
Prints one JSON line: the overrides, train and test pair counts, gold accuracy, seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cai.core.config import from_dict  # noqa: E402
from cai.core.errors import CaiError  # noqa: E402
from cai.evaluate.known_answer import valence_score as gold_score  # noqa: E402
from cai.train.pm import PMConfig, pm_scores, train_pm  # noqa: E402
from cai.train.prefs import apply_ties, load_preference_file, split_rows  # noqa: E402

KNOWN_ANSWER_PM = {"model": "embedded:smollm2-135m", "batch_size": 8, "max_length": 160,
                   "learning_rate": 3e-4, "epochs": 1}
"""The PM settings of configs/known-answer.yaml (the overrides change these)."""


def _text(row: dict, key: str) -> str:
    return row[key][0]["content"]


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "runs/known-answer/label"
    try:
        overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    except json.JSONDecodeError as exc:
        raise CaiError(f"not a JSON object of PM settings: {exc.msg}", field="overrides") from None
    if not isinstance(overrides, dict):
        raise CaiError("expected a JSON object of PM settings", field="overrides")
    rows = load_preference_file(label, "labels", "preferences.jsonl")
    train, test = split_rows(rows, 0.5, 7)
    train, _ = apply_ties(train, "drop", 0.05)
    test = [r for r in test if gold_score("", _text(r, "chosen")) != gold_score("", _text(r, "rejected"))]
    cfg = from_dict(PMConfig, {**KNOWN_ANSWER_PM, "save_steps": 10**6, **overrides}, "overrides")
    t0 = time.time()
    result = train_pm(train, cfg)
    seconds = time.time() - t0
    prompts = [r["prompt"] for r in test]
    scores = pm_scores(result.model, result.tokenizer, prompts + prompts,
                       [_text(r, "chosen") for r in test] + [_text(r, "rejected") for r in test])
    n = len(test)
    right = sum((scores[i] > scores[n + i]) == (gold_score("", _text(test[i], "chosen"))
                                                 > gold_score("", _text(test[i], "rejected")))
                for i in range(n))
    print(json.dumps({"overrides": overrides, "train_pairs": len(train), "test_pairs": n,
                      "gold_accuracy": round(right / max(n, 1), 3), "train_s": round(seconds, 1)}))


if __name__ == "__main__":
    try:
        main()
    except CaiError as err:  # a bad folder, JSON or override: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
