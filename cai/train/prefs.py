"""The preference-training kit that the PM and DPO stages share: what they read, how they
weigh it, the loss, the held-out split and what a finished run leaves.

Both train on the same inputs: the label stage's soft AI labels (p = "A is better with
probability p") and SL-CAI pairs (revision ≻ initial, p = 1). Both minimise the
cross-entropy against the soft target, −w·[p·log σ(m) + (1 − p)·log σ(−m)], only the
margin m differs (PM: r_chosen − r_rejected; DPO: β·Δ of log-ratios). Both hold out the
same seeded by-prompt split and report accuracy and calibration on it in eval.json.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.data import parse_jsonl, split_weight
from cai.core.errors import CaiError, read_text
from cai.core.records import write_json_atomic
from cai.core.stage import write_manifest
from cai.train.loading import HardwareConfig, precision_record

TIES = ("keep", "drop", "weight")
SOURCES = ("labels", "sl-pairs")


@dataclass
class PreferenceTrainConfig(HardwareConfig):
    """What the preference-trained stages (PM and DPO) share: their data, ties, LoRA and
    schedule fields."""

    preferences: str | list[str] | None = field(default=None, metadata={"many": "preferences"})
    """Preference data: the label stage's preferences.jsonl or its folder, or any file in
    TRL's preference format (prompt, chosen, rejected, optional p_chosen; 1 when absent).
    Repeat the flag (a list in YAML) for several sources, each optionally `PATH:WEIGHT`, its
    pairs' loss weight (default 1): a helpfulness set beside the AI labels keeps the model
    from learning that refusing always wins. eval.json reports accuracy per source."""
    pairs: str | None = None
    """SL-CAI pairs (revision ≻ initial, p = 1): the SL stage's pairs.jsonl or its folder."""
    ties: str = "keep"
    """Ties (|p − ½| < tie_threshold, or flagged "tie"): "keep", "drop" or "weight" (loss ×
    min(1, |p − ½| / tie_threshold): 0 at ½, rising to 1 at the edge of the band, no jump)."""
    tie_threshold: float = 0.05
    """How close to ½ a label must be to count as a tie; held-out accuracy leaves such
    pairs out (they state no direction to agree with)."""
    pairs_weight: float = 1.0
    """Loss weight of each SL pair relative to a labelled pair (0 leaves them out of the loss,
    and out of its mean)."""
    eval_fraction: float = 0.1
    """Fraction of pairs held out (seeded, by prompt) for the accuracy and calibration in
    eval.json after training."""
    batch_size: int = 4
    """Pairs per device per step (each pair is two sequences)."""
    bins: int = 10
    """Bins of the held-out calibration (ECE) estimate and plot."""
    seed: int = 0
    """Seed of the split, data order and initialisation (LoRA, the PM's score head)."""
    lora: bool = True
    """Train LoRA adapters (plus the PM's score head) instead of all weights; merged on save."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    epochs: float = 1.0
    """Passes over the training pairs (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = use epochs)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    save_steps: int = 100
    """Write a resumable checkpoint every N steps (only the latest is kept)."""
    logging_steps: int = 1
    """Append a line to log.jsonl every N steps."""
    force: bool = False
    """Start clean: a folder holding a run with another config is emptied instead of refused."""


def check_common(cfg: Any) -> None:
    """Range checks shared by the PM and DPO configs; each names its field."""
    cfg.check_hardware()
    checks = [
        (cfg.ties in TIES, "ties", f"must be one of {TIES}"),
        (0 <= cfg.tie_threshold < 0.5, "tie_threshold", "must be in [0, 0.5)"),
        (cfg.pairs_weight >= 0, "pairs_weight", "must be ≥ 0"),
        (0 <= cfg.eval_fraction < 1, "eval_fraction", "must be in [0, 1)"),
        (cfg.lora_r >= 1, "lora_r", "must be at least 1"),
        (cfg.lora_alpha > 0, "lora_alpha", "must be positive"),
        (0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
        (cfg.learning_rate > 0, "learning_rate", "must be positive"),
        (cfg.epochs > 0, "epochs", "must be positive"),
        (cfg.max_steps == -1 or cfg.max_steps >= 1, "max_steps", "must be -1 or at least 1"),
        (cfg.batch_size >= 1, "batch_size", "must be at least 1"),
        (cfg.grad_accum >= 1, "grad_accum", "must be at least 1"),
        (cfg.max_length >= 8, "max_length", "must be at least 8"),
        (cfg.save_steps >= 1, "save_steps", "must be at least 1"),
        (cfg.logging_steps >= 1, "logging_steps", "must be at least 1"),
        (cfg.bins >= 1, "bins", "must be at least 1"),
    ]
    for ok, name, msg in checks:
        if not ok:
            raise CaiError(msg, field=name)


# --------------------------------------------------------------------------- data


def _message_text(value: Any, role: str) -> str | None:
    """The text of a one-turn completion given as a string or as [{"role", "content"}]."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and value and isinstance(value[-1], dict)
            and value[-1].get("role") == role and isinstance(value[-1].get("content"), str)):
        return value[-1]["content"]
    return None


def _prompt_chat(value: Any) -> list[dict[str, str]] | None:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def load_preference_file(path: str | Path, source: str, default_name: str,
                         default_p: float | None = None) -> list[dict[str, Any]]:
    """Read TRL conversational preference rows; any bad line fails with `file:line` and field.

    Rows come back in one shape: `prompt` (a chat), `chosen` / `rejected` (one assistant
    message each, as TRL expects), `p_chosen`, `weight` (1.0), `source` and `id`.
    """
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise CaiError(f"not found (expected {default_name} or its stage folder)", str(p))
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    skipped: list[str] = []
    # not UTF-8 or not JSON: file:line, no traceback
    for where, obj in parse_jsonl(read_text(p, "preference file"), str(p)):
        n = where.rpartition(":")[2]
        prompt = _prompt_chat(obj.get("prompt"))
        if prompt is None:
            raise CaiError("expected a string or a list of {role, content} messages", where, "prompt")
        texts = {}
        for key in ("chosen", "rejected"):
            texts[key] = _message_text(obj.get(key), "assistant")
            if texts[key] is None:
                raise CaiError("expected a string or [{\"role\": \"assistant\", \"content\": ...}]",
                               where, key)
        pc = obj.get("p_chosen", default_p)
        if isinstance(pc, bool) or not isinstance(pc, int | float) or not 0 <= pc <= 1:
            raise CaiError(f"expected a probability in [0, 1], got {pc!r}", where, "p_chosen")
        flags = obj.get("flags") or []
        rid = str(obj.get("id") or f"{source}:{n}")
        if rid in seen:
            raise CaiError(f"duplicate id {rid!r}; each pair must appear once", where, "id")
        seen.add(rid)
        if not any(m["content"].strip() for m in prompt):
            raise CaiError("empty prompt", where, "prompt")
        if (not texts["chosen"].strip() or not texts["rejected"].strip()
                or texts["chosen"].strip() == texts["rejected"].strip()):
            skipped.append(where)  # nothing to prefer: not a training pair
            continue
        rows.append({"id": rid, "prompt": prompt,
                     "chosen": [{"role": "assistant", "content": texts["chosen"]}],
                     "rejected": [{"role": "assistant", "content": texts["rejected"]}],
                     "p_chosen": float(pc), "weight": 1.0, "source": source,
                     "tie_flag": isinstance(flags, list) and "tie" in flags})
    if skipped:
        warnings.warn(f"{skipped[0]}: skipped {len(skipped)} pair(s) whose chosen and rejected "
                      "responses are empty or identical (nothing to prefer)", stacklevel=2)
    if not rows:
        raise CaiError("no preference pairs in the file", str(p))
    return rows


def preference_sources(value: str | list[str] | None) -> list[tuple[str, str, float]]:
    """(name, path, loss weight) of each preference source. One source keeps the name
    "labels" (as eval.json always called it); several are named by their paths."""
    specs = [value] if isinstance(value, str) else list(value or [])
    out = []
    for spec in specs:
        path, weight = split_weight(spec)
        if weight is not None and not (math.isfinite(weight) and weight >= 0):
            raise CaiError(f"weight must be a finite number ≥ 0, got {weight}", spec, "preferences")
        out.append(("labels" if len(specs) == 1 else path, path, 1.0 if weight is None else weight))
    names = [n for n, _, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise CaiError("given twice", dup, "preferences")
    if "sl-pairs" in names:
        raise CaiError("a source may not be named sl-pairs (the --pairs source)", "sl-pairs",
                       "preferences")
    return out


def load_training_rows(cfg: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The labelled preferences and SL pairs named by a config, weighted, ties handled."""
    if not cfg.preferences and not cfg.pairs:
        raise CaiError("give --preferences (label stage output), --pairs (SL stage output) or both",
                       field="preferences")
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    sources = preference_sources(cfg.preferences)
    for name, path, weight in sources:
        # TRL's format leaves p_chosen optional: a row without it is a hard preference.
        prefs = load_preference_file(path, name, "preferences.jsonl", default_p=1.0)
        for r in prefs:
            r["weight"] = weight
            if len(sources) > 1:  # ids of different files may coincide
                r["id"] = f"{name}/{r['id']}"
        counts["preferences" if len(sources) == 1 else f"preferences:{name}"] = len(prefs)
        rows += prefs
    if cfg.pairs:
        pairs = load_preference_file(cfg.pairs, "sl-pairs", "pairs.jsonl", default_p=1.0)
        for r in pairs:
            r["weight"] = float(cfg.pairs_weight)
        counts["sl_pairs"] = len(pairs)
        rows += pairs
    rows, tie_counts = apply_ties(rows, cfg.ties, cfg.tie_threshold)
    return rows, {**counts, **tie_counts}


def is_tie(row: dict[str, Any], threshold: float) -> bool:
    return bool(row.get("tie_flag")) or abs(row["p_chosen"] - 0.5) < threshold


def tie_weight(p: float, threshold: float) -> float:
    """The "weight" ties mode's factor: min(1, |p − ½| / threshold), a function of p alone.

    It is 0 at ½ and reaches 1 exactly at the edge of the tie band, so a label just inside
    the band and one just outside it weigh almost the same (a step from |2p − 1| to 1 would
    jump tenfold at the default threshold). With no band (threshold 0) every label weighs 1.
    """
    return 1.0 if threshold <= 0 else min(1.0, abs(p - 0.5) / threshold)


def apply_ties(rows: list[dict[str, Any]], mode: str, threshold: float
               ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Keep, drop or down-weight near-½ labels (a tie teaches only "no preference").

    "weight" scales each label's loss by `tie_weight(p)`: an exact ½ contributes nothing,
    0.52 (threshold 0.05) 0.4 of a full label, anything outside the band its full weight.
    A "tie" flag from the label stage decides keep/drop, not the weight: that is p's alone.
    """
    if mode not in TIES:
        raise CaiError(f"must be one of {TIES}", field="ties")
    ties = [r for r in rows if is_tie(r, threshold)]
    if mode == "drop":
        rows = [r for r in rows if not is_tie(r, threshold)]
    elif mode == "weight":
        rows = [dict(r, weight=r["weight"] * tie_weight(r["p_chosen"], threshold)) for r in rows]
    return rows, {"ties": len(ties), "ties_dropped": len(ties) if mode == "drop" else 0}


def prompt_key(prompt: Any) -> str:
    """What makes two rows "the same prompt": the text of the user's turns (a label pair and
    an SL pair of one red-team prompt share it, whatever else their chats hold)."""
    from cai.core.splits import text_key

    turns = ([m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
             if isinstance(prompt, list) else [str(prompt)])
    return text_key("\n\n".join(turns))


def split_rows(rows: list[dict[str, Any]], fraction: float, seed: int
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded held-out split by prompt: every pair of one prompt (AI-labelled pairs and SL
    pairs alike) lands on the same side, so no held-out pair shares a prompt, nor a response
    to it, with a training pair. round(fraction × prompts) prompts are held out, chosen by
    a seeded hash of the prompt text (the same prompts whatever the row order); at least
    one training prompt is always left."""
    from cai.core.splits import held_out

    keys = [prompt_key(r["prompt"]) for r in rows]
    held = held_out(keys, fraction, seed)
    return ([r for r, k in zip(rows, keys) if k not in held],
            [r for r, k in zip(rows, keys) if k in held])


def split_summary(train: list[dict[str, Any]], held: list[dict[str, Any]], fraction: float,
                  seed: int) -> dict[str, Any]:
    """What eval.json says about the split: by prompt, how many prompts and pairs each side
    holds, and the held-out prompts' keys (so anyone can check that no prompt is on both)."""
    ev = sorted({prompt_key(r["prompt"]) for r in held})
    return {"by": "prompt", "fraction": fraction, "seed": seed,
            "train_prompts": len({prompt_key(r["prompt"]) for r in train}),
            "eval_prompts": len(ev), "train_pairs": len(train), "eval_pairs": len(held),
            "eval_prompt_keys": ev}


# --------------------------------------------------------------------------- loss


def soft_preference_loss(margin: Any, p: Any, weight: Any = None) -> Any:
    """Mean of −w·[p·log σ(m) + (1 − p)·log σ(−m)] over pairs; m = r_chosen − r_rejected.

    With p = 1 this is the usual Bradley–Terry loss −log σ(m); for p < 1 its minimum is at
    σ(m) = p, so a soft label trains a finite, calibrated margin. With weights the mean is
    over the pairs of non-zero weight: a weight-0 pair (`pairs_weight: 0`, an exact tie
    under `ties: weight`) is out of the loss, and does not shrink the others' step either.
    """
    import torch.nn.functional as F

    margin = margin.float()
    p = p.to(margin)
    per_pair = -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin))
    if weight is None:
        return per_pair.mean()
    w = weight.to(margin)
    return (per_pair * w).sum() / (w > 0).sum().clamp(min=1)


def direction_accuracy(margin: Any, p: Any) -> float | None:
    """Share of pairs whose margin has the sign of p − ½ (the label's direction), ties
    (p = ½) left out; None when every pair is a tie. A file may hold p_chosen < ½."""
    import torch

    margin, p = margin.float(), p.to(margin.device).float()
    keep = p != 0.5
    if not bool(keep.any()):
        return None
    return (torch.sign(margin[keep]) == torch.sign(p[keep] - 0.5)).float().mean().item()


# --------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What a training call hands back: the merged model, its tokenizer and the log."""

    model: Any
    tokenizer: Any
    log: list[dict[str, Any]]
    steps: int
    seconds: float
    counts: dict[str, int]


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _agreement(m: Any, p: Any, tie_threshold: float) -> tuple[float | None, int]:
    """Accuracy as agreement of sign(margin) with sign(p − ½) over the pairs outside the tie
    band (|p − ½| ≥ tie_threshold, and never p = ½), and how many pairs that was."""
    import numpy as np

    keep = (np.abs(p - 0.5) >= tie_threshold) & (p != 0.5)
    if not keep.any():
        return None, 0
    return float((np.sign(m[keep]) == np.sign(p[keep] - 0.5)).mean()), int(keep.sum())


def preference_report(margins: list[float], rows: list[dict[str, Any]], bins: int,
                      scale: float = 1.0, tie_threshold: float = 0.0) -> dict[str, Any]:
    """Held-out accuracy, mean margin (× scale), per-source accuracy, calibration of σ(scale·margin).

    Accuracy is agreement with the label's direction (sign of p − ½), so a file whose
    p_chosen is below ½ is scored against the response it actually prefers; labels
    within `tie_threshold` of ½ state no direction and are left out (`accuracy_pairs`
    counts the rest).

    Calibration compares the model's probability for the response it prefers with the
    soft target's probability for that same response (so a 0.6 label is "right" 60 %
    of the time), binned as in the labeler evaluation.
    """
    import numpy as np

    from cai.train.plots import expected_calibration_error

    if not rows:
        return {"pairs": 0}
    m = np.asarray(margins, dtype=float) * scale
    p = np.asarray([r["p_chosen"] for r in rows], dtype=float)
    q = 1 / (1 + np.exp(-m))
    conf = np.maximum(q, 1 - q)
    target = np.where(q >= 0.5, p, 1 - p)
    ece, table = expected_calibration_error(conf, target, bins)
    sources = sorted({r["source"] for r in rows})
    accuracy, n_acc = _agreement(m, p, tie_threshold)
    src = {s: np.array([r["source"] == s for r in rows]) for s in sources}
    return {
        "pairs": len(rows),
        "accuracy": accuracy,
        "accuracy_pairs": n_acc,
        "accuracy_ties_excluded": len(rows) - n_acc,
        "mean_margin": float(m.mean()),
        "mean_p_target": float(p.mean()),
        "mean_p_model": float(q.mean()),
        "mean_abs_error": float(np.abs(q - p).mean()),
        "ece": ece,
        "by_source": {s: {"pairs": int(src[s].sum()),
                          "accuracy": _agreement(m[src[s]], p[src[s]], tie_threshold)[0],
                          "accuracy_pairs": _agreement(m[src[s]], p[src[s]], tie_threshold)[1]}
                      for s in sources},
        "reliability": table,
        "per_pair": [{"id": r["id"], "source": r["source"], "p_chosen": r["p_chosen"],
                      "p_model": round(float(qi), 6)} for r, qi in zip(rows, q)],
    }


def fmt(x: Any) -> str:
    """A number for a card: three decimals, or "n/a"."""
    return f"{x:.3f}" if isinstance(x, int | float) and not isinstance(x, bool) else "n/a"


# --------------------------------------------------------------------------- stage


def summary_metrics(log: list[dict[str, Any]], report: dict[str, Any]) -> dict[str, Any]:
    return {"first_loss": log[0]["loss"] if log else None, "last_loss": log[-1]["loss"] if log else None,
            **{f"eval_{k}": v for k, v in report.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}}


@dataclass
class PreferenceRun:
    """A PM or DPO run entering its folder: the rows it trains and is scored on, what it
    resumes from, or (`done`) the manifest of the same run already finished."""

    cfg: Any
    stage: str
    out: Path
    started: float
    counts: dict[str, Any]
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    resume: str | None
    done: dict[str, Any] | None = None

    @classmethod
    def open(cls, cfg: Any, stage: str) -> PreferenceRun:
        """Read and check the inputs, claim the folder (the shared resume rule), split."""
        from cai.train.common import resume_point, start_run
        from cai.train.loading import check_run_options

        t0, out = time.time(), Path(cfg.out)
        check_run_options(cfg)  # before anything is read or loaded
        rows, counts = load_training_rows(cfg)
        done = start_run(out, cfg, stage)
        if done is not None:
            return cls(cfg, stage, out, t0, counts, [], [], None, done)
        train_rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
        return cls(cfg, stage, out, t0, counts, train_rows, eval_rows, resume_point(out))

    def finish(self, result: TrainResult, report: dict[str, Any], *, models: dict[str, str],
               title: str) -> dict[str, Any]:
        """Save the trained run with its held-out report (and how the split was made)."""
        cfg = self.cfg
        report["split"] = split_summary(self.train_rows, self.eval_rows, cfg.eval_fraction, cfg.seed)
        return save_preference_run(self.out, self.stage, cfg, result, report, t0=self.started,
                                   counts=self.counts, n_eval=len(self.eval_rows),
                                   resumed=bool(self.resume), models=models, title=title)


def save_preference_run(out: Path, stage: str, cfg: Any, result: TrainResult, report: dict[str, Any],
                        *, t0: float, counts: dict[str, Any], n_eval: int, resumed: bool,
                        models: dict[str, str], title: str) -> dict[str, Any]:
    """What a finished PM or DPO run leaves: the model folder, log.jsonl, eval.json, the
    calibration plot and the manifest; its checkpoints are no longer needed."""
    from cai.train.common import LOG, disk_errors, write_log
    from cai.train.plots import reliability_png

    with disk_errors(out, "model"):
        result.model.save_pretrained(str(out), safe_serialization=True)
        result.tokenizer.save_pretrained(str(out))
    log = write_log(out / LOG, result.log)
    write_json_atomic(out / "eval.json", report)
    if report.get("reliability") is not None:
        reliability_png(report["reliability"], out / "calibration.png",
                        title=f"{title} ({report['pairs']} held-out pairs)")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return write_manifest(
        out, stage, config=cfg, models=models,
        counts={**counts, **result.counts, "eval": n_eval, "steps": result.steps,
                "resumed": resumed},
        started=t0, timings={"train": result.seconds}, data=("model.safetensors",),
        extra={"metrics": summary_metrics(log, report), "precision": precision_record(cfg)})
