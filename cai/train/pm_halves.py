"""Train/test preference models: two PMs on disjoint halves of the labels, split by prompt.

The HH paper's robustness check: RL pushes on a *train PM*; a *test PM*, trained the same
way on the other half of the comparisons, scores the same rollouts. While the policy finds
real improvements both rise together; once it exploits the train PM's quirks the train
score keeps climbing and the test score stalls or falls. (`cai train pm --split halves`;
RL logs the test PM with the monitor `test-pm`, see `cai.train.monitors`.)

The halves are split by prompt, as the held-out split is, so no prompt (nor a response to
it) teaches both PMs. The held-out pairs are set aside first and score both PMs, so their
accuracies are comparable. The train PM is the stage's model (RL's reward, unchanged
wiring); the test PM is saved in the `test/` folder inside it, with its own eval.json and
manifest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError

SPLITS = ("none", "halves")
"""`split` values of the PM: one PM on all training pairs, or a train and a test PM."""
TEST_FOLDER = "test"
"""Where the test PM is saved, inside the train PM's folder (RL's `test-pm` monitor)."""
HALF_SEED = "pm-halves"
"""Mixed into the split's seed so the halves do not line up with the held-out split."""


def split_halves(rows: list[dict[str, Any]], seed: int
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train half, test half) of preference rows, disjoint by prompt and covering all.

    Half of the distinct prompts (rounded down; the train half keeps the odd one) go to
    the test half, chosen by a seeded hash of the prompt, so the split does not depend on
    row order. Fewer than two prompts cannot be halved: one line, naming the field.
    """
    from cai.core.splits import held_out
    from cai.train.prefs import prompt_key

    keys = [prompt_key(r["prompt"]) for r in rows]
    distinct = set(keys)
    if len(distinct) < 2:
        raise CaiError(f"split: halves needs pairs of at least two prompts (got "
                       f"{len(distinct)})", field="split")
    test = held_out(keys, (len(distinct) // 2) / len(distinct), f"{HALF_SEED}:{seed}")
    return ([r for r, k in zip(rows, keys) if k not in test],
            [r for r, k in zip(rows, keys) if k in test])


def train_test_half(out: Path, cfg: Any, train_rows: list[dict[str, Any]],
                    eval_rows: list[dict[str, Any]], counts: dict[str, Any], *, stage: str,
                    train_pm: Callable[..., Any], evaluate_pm: Callable[..., dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """Halve `train_rows` by prompt, train the test PM on one half and save it in
    `out/test` (scored on the same held-out `eval_rows` as the train PM); returns the other
    half, on which the caller trains the train PM. The test PM is trained first, so a rerun
    after a kill finds it finished (its own manifest) and goes on with the train PM. The PM
    stage hands in its own trainer and evaluator (`stage` names its manifests), so this
    module needs nothing from it."""
    from cai.train.common import resume_point, start_run
    from cai.train.prefs import save_preference_run, split_summary

    t0 = time.time()
    train_half, test_half = split_halves(train_rows, cfg.seed)
    folder = out / TEST_FOLDER
    test_cfg = dataclasses.replace(cfg, out=str(folder), split="none")
    if start_run(folder, test_cfg, stage) is not None:  # the shared finished-run and resume rule
        return train_half
    resume = resume_point(folder)
    result = train_pm(test_half, test_cfg, out=folder, resume_from=resume)
    result.tokenizer.model_max_length = cfg.max_length  # pm_scores truncates as training did
    report = evaluate_pm(result.model, result.tokenizer, eval_rows, test_cfg)
    report["split"] = split_summary(test_half, eval_rows, cfg.eval_fraction, cfg.seed)
    report["half"] = {"role": "test", "train_pairs": len(train_half), "test_pairs": len(test_half)}
    save_preference_run(folder, stage, test_cfg, result, report, t0=t0,
                        counts={**counts, "half": "test"}, n_eval=len(eval_rows),
                        resumed=bool(resume), models={"base": cfg.model},
                        title="Test PM calibration")
    return train_half


__all__ = ["SPLITS", "split_halves", "train_test_half", "TEST_FOLDER"]
