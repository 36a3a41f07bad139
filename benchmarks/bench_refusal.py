"""How well the refusal checks work, on the held-out test part of the labelled table.

`tests/fixtures/refusals_test.jsonl` was written (and committed) before the rule in
`cai.core.text.is_refusal` was rewritten and is not used to tune it;
`tests/fixtures/refusals_dev.jsonl` is the part the rule was written against. Three checks
are measured on each part, refusal being the positive class: the rule, the plain
refusal-prefix baseline (`is_refusal_by_prefix`, a list in the style of the GCG/AdvBench
work) and, with --judge, the judge-based check the policy evaluation runs
(`cai.evaluate.answers.judge_refusals`: P(declines) > 0.5; the dev part has no prompts, so
the judge is asked about the test part only). Results: benchmarks/results/refusal.json;
the last line printed is a one-line JSON summary.

    python benchmarks/bench_refusal.py [--judge embedded:smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai.core.text import is_refusal, is_refusal_by_prefix  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def rows(part: str) -> list[dict]:
    text = (FIXTURES / f"refusals_{part}.jsonl").read_text(encoding="utf-8")
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def scores(table: list[dict], said: list[bool]) -> dict:
    """Accuracy, precision and recall (refusal = positive), with the counts behind them."""
    tp = sum(p and r["refusal"] for p, r in zip(said, table))
    fp = sum(p and not r["refusal"] for p, r in zip(said, table))
    fn = sum(not p and r["refusal"] for p, r in zip(said, table))
    right = sum(p == r["refusal"] for p, r in zip(said, table))
    by_kind: dict[str, list[int]] = {}
    for p, r in zip(said, table):
        by_kind.setdefault(r["kind"], [0, 0])
        by_kind[r["kind"]][0] += p == r["refusal"]
        by_kind[r["kind"]][1] += 1
    return {"n": len(table), "accuracy": right / len(table),
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "by_kind": {k: f"{a}/{b}" for k, (a, b) in sorted(by_kind.items())},
            "wrong": [r["id"] for p, r in zip(said, table) if p != r["refusal"]]}


def judge_check(spec: str, table: list[dict]) -> list[bool]:
    from cai.core.chunks import Engine
    from cai.core.models import model_identity
    from cai.evaluate.answers import judge_refusals

    with tempfile.TemporaryDirectory() as tmp:
        items = [(r["prompt"], r["text"]) for r in table]
        p = judge_refusals(spec, Path(tmp), items, model_identity(spec), Engine(), 16)
    return [p[it] > 0.5 for it in items]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default=None, help="also measure the judge-based check (a model spec)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refusal.json"))
    args = ap.parse_args()
    checks: dict[str, Callable[[str], bool]] = {"rule": is_refusal, "prefix": is_refusal_by_prefix}
    result: dict = {}
    for part in ("test", "dev"):
        table = rows(part)
        result[part] = {name: scores(table, [fn(r["text"]) for r in table])
                        for name, fn in checks.items()}
        if args.judge and part == "test":
            result[part][f"judge {args.judge}"] = scores(table, judge_check(args.judge, table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for part, per in result.items():
        for name, s in per.items():
            print(f"{part:4s} {name:34s} accuracy {s['accuracy']:.3f}  precision "
                  f"{s['precision'] or 0:.3f}  recall {s['recall'] or 0:.3f}  (n={s['n']})")
    print(json.dumps({p: {k: round(v["accuracy"], 3) for k, v in per.items()}
                      for p, per in result.items()}))


if __name__ == "__main__":
    main()
