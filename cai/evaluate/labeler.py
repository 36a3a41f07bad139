"""How good is the feedback model as a labeler? Accuracy, calibration and position bias.

Items are multiple-choice A/B questions with a known better option. Each is judged exactly
as the labelling stage judges a pair (same prompts, same principles, both orders), so
the numbers describe the labels a user would get.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cai.backends import Backend, load_backend
from cai.constitution import load
from cai.core import usage
from cai.core.data import PairItem, _rows
from cai.core.errors import CaiError, ValidationErrors
from cai.core.records import write_json_atomic
from cai.core.stage import Input, Stage, claim_dir, register, write_manifest
from cai.judge import JudgeConfig, LabelRecord, judge_pairs, label_flags
from cai.panel import judge_panel, load_panel
from cai.train.plots import expected_calibration_error, reliability_png

STAGE = "eval-labeler"


@dataclass
class LabelerEvalConfig:
    """Configuration of `cai eval labeler`."""

    items: str = "labeler_ab"
    """A/B items: jsonl with context, options (two responses), correct (0 or 1), category."""
    feedback_model: str = field(default="embedded:smollm2-135m",
                                metadata={"many": "judge.models"})
    """Model spec of the judge under test; given more than once, a panel: each judge and
    the panel are reported, with their agreement."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """How the judge is asked, exactly as in labelling (accuracy per order needs both
    orders); a nested `judge:` mapping in YAML."""
    constitution: str = "harmless"
    """Constitution whose comparison principles are asked (a file or a shipped name)."""
    out: str = "runs/eval/labeler"
    """Folder for report.json and reliability.png."""
    bins: int = 10
    """Bins of the calibration (ECE) estimate and plot."""
    limit: int | None = None
    """Evaluate only the first N items."""
    seed: int = 0
    """Seed of the principle draws."""

    def __post_init__(self) -> None:
        if self.bins < 1:
            raise CaiError("must be at least 1", field="bins")
        if self.limit is not None and self.limit < 1:
            raise CaiError("must be at least 1", field="limit")


@dataclass(frozen=True)
class ABItem:
    id: str
    context: str
    options: tuple[str, str]
    correct: int
    category: str


def load_items(path: str | Path, limit: int | None = None) -> list[ABItem]:
    from cai.core.resources import resolve

    items, errors = [], []
    for where, row in _rows(resolve(path, "prompts")):
        opts, correct = row.get("options"), row.get("correct")
        if not isinstance(row.get("context"), str) or not row["context"].strip():
            errors.append(CaiError("missing or empty", where, "context"))
        elif not (isinstance(opts, list) and len(opts) == 2 and all(isinstance(o, str) for o in opts)):
            errors.append(CaiError("must be a list of two strings", where, "options"))
        elif correct not in (0, 1) or isinstance(correct, bool):
            errors.append(CaiError("must be 0 or 1", where, "correct"))
        else:
            items.append(ABItem(str(row.get("id", len(items))), row["context"], (opts[0], opts[1]),
                                correct, str(row.get("category", ""))))
    if errors:
        raise ValidationErrors(errors[:20])
    return items[:limit] if limit else items


def evaluate_labeler(items: list[ABItem], backend: Backend | list[Backend],
                     cfg: LabelerEvalConfig) -> dict[str, Any]:
    """The report for one judge, or for a panel (a list of judges): then the panel's
    numbers, each judge's under `judges`, and their pairwise `agreement`."""
    c = load(cfg.constitution)
    pairs = [PairItem(i.id, i.context, i.options[0], i.options[1]) for i in items]
    if isinstance(backend, list):
        recs = judge_panel(pairs, c, backend, cfg.judge, cfg.seed)
        report = _report(items, recs, cfg, c, recs[0].provenance.model if recs else "panel")
        ids = [b.identity for b in backend]
        judges = {m: _report(items, [_member(r, m, cfg.judge) for r in recs], cfg, c, m)
                  for m in ids}
        report["judges"] = {m: {k: v for k, v in r.items() if k not in ("constitution", "judge")}
                            for m, r in judges.items()}
        report["agreement"] = agreement({m: [r.panel[m] for r in recs if r.panel] for m in ids})
        return report
    recs = judge_pairs(pairs, c, backend, cfg.judge, cfg.seed)
    return _report(items, recs, cfg, c, backend.identity)


def _member(r: LabelRecord, judge: str, cfg: JudgeConfig) -> LabelRecord:
    """One panel judge's own label of a pair (its p, questions and flags), from the
    panel's record."""
    assert r.panel is not None
    js = [j for j in r.judgements if j.judge == judge]
    return r.model_copy(update={"p_a": r.panel[judge], "judgements": js,
                                "flags": label_flags(js, r.panel[judge], cfg)})


def agreement(ps: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Every pair of judges: Cohen's kappa on which response each prefers (p >= ½ or not)
    and the Pearson correlation of their p (None where a judge's p never varies)."""
    out = []
    names = list(ps)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = np.array(ps[a]), np.array(ps[b])
            sa, sb = x >= 0.5, y >= 0.5
            seen = float(np.mean(sa == sb))
            chance = float(np.mean(sa) * np.mean(sb) + np.mean(~sa) * np.mean(~sb))
            kappa = 1.0 if chance == 1 else (seen - chance) / (1 - chance)
            corr = (float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 and x.std() > 0 and y.std() > 0
                    else None)
            out.append({"judges": [a, b], "kappa": kappa, "correlation": corr,
                        "sign_agreement": seen})
    return out


def _report(items: list[ABItem], recs: list[LabelRecord], cfg: LabelerEvalConfig, c: Any,
            identity: str) -> dict[str, Any]:
    correct = np.array([i.correct for i in items])
    p_a = np.array([r.p_a for r in recs])
    # p of the correct option, per order and averaged over orders.
    def p_correct(order: str | None) -> np.ndarray:
        out = []
        for r, it in zip(recs, items):
            js = [j for j in r.judgements if (order is None or j.order == order)
                  and (j.votes is None or j.mass > 0)]
            if not js:  # verdict mode: no answer chose; counts as wrong, never as ½
                out.append(0.0)
                continue
            pa = np.mean([j.p_first if j.order == "ab" else 1 - j.p_first for j in js])
            out.append(pa if it.correct == 0 else 1 - pa)
        return np.array(out)

    pc_ab, pc_ba, pc = p_correct("ab"), p_correct("ba"), p_correct(None)
    conf = np.maximum(p_a, 1 - p_a)
    right = ((p_a >= 0.5) == (correct == 0)).astype(float)
    ece, table = expected_calibration_error(conf, right, cfg.bins)
    p_letter_a = np.mean([j.p_first for r in recs for j in r.judgements])
    cats = sorted({i.category for i in items})
    report = {
        "items": len(items), "feedback_model": identity, "judge": cfg.judge.method(),
        "constitution": c.stamp.as_dict(),
        "accuracy": float(right.mean()),
        "accuracy_order_ab": float((pc_ab > 0.5).mean()),
        "accuracy_order_ba": float((pc_ba > 0.5).mean()),
        "mean_p_correct": float(pc.mean()),
        "ece": ece,
        "position_bias": float(p_letter_a - 0.5),
        "position_inconsistency_rate": float(np.mean(["position-inconsistent" in r.flags for r in recs])),
        "mean_mass": float(np.mean([j.mass for r in recs for j in r.judgements])),
        "by_category": {k: float(right[[i.category == k for i in items]].mean()) for k in cats},
        "reliability": table,
        **_verdict_rates(recs),
    }
    return report


def _verdict_rates(recs: list[LabelRecord]) -> dict[str, float]:
    """Verdict mode: the share of written answers read as unparsed and as refused."""
    votes = [v for r in recs for j in r.judgements for v in j.votes or ()]
    if not votes:
        return {}
    return {"unparsed_rate": votes.count("unparsed") / len(votes),
            "refused_rate": votes.count("refused") / len(votes)}


def run_labeler_eval(cfg: LabelerEvalConfig, backend: Backend | None = None) -> dict[str, Any]:
    t0, tokens = time.time(), usage.mark()
    items = load_items(cfg.items, cfg.limit)
    out = Path(cfg.out)
    claim_dir(out, STAGE)
    judge: Backend | list[Backend] = (load_panel(cfg.judge) if cfg.judge.models
                                      else backend or load_backend(cfg.feedback_model))
    report = evaluate_labeler(items, judge, cfg)
    reliability_png(report["reliability"], out / "reliability.png",
                    title=f"Labeler reliability (ECE {report['ece']:.3f})",
                    xlabel="confidence max(p, 1-p)", ylabel="accuracy")
    write_json_atomic(out / "report.json", report)
    metrics = {k: report[k] for k in ("accuracy", "accuracy_order_ab", "accuracy_order_ba",
                                      "ece", "position_bias", "mean_mass")}
    return write_manifest(out, STAGE, config=cfg,
                          constitution=report["constitution"],
                          models=_models(report["feedback_model"], judge),
                          counts={"items": len(items)}, started=t0, data=("report.json",),
                          extra={"metrics": metrics, "tokens": usage.since(tokens)})


def _models(identity: str, judge: Backend | list[Backend]) -> dict[str, str]:
    """The manifest's models: the judge, or the panel and each of its members."""
    members = judge if isinstance(judge, list) else []
    return {"feedback": identity, **{f"feedback_{n + 1}": b.identity for n, b in enumerate(members)}}


register(Stage(STAGE, LabelerEvalConfig, run_labeler_eval,
               "Judge accuracy, calibration and position bias on A/B items.",
               inputs=(Input("items", "labeler-items"), Input("feedback_model", "judge-model", model=True),
                       Input("constitution", "constitution")),
               outputs=("report.json", "reliability.png"), positional=("items",),
               command="eval labeler"))

__all__ = ["LabelerEvalConfig", "evaluate_labeler", "run_labeler_eval", "load_items",
           "expected_calibration_error"]

