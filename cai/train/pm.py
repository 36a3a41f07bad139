"""`cai train pm`: a preference (reward) model trained on soft AI labels.

The label stage does not say "A is better"; it says "A is better with probability p".
Training on the hard label would push every margin towards infinity and throw that
information away, so the loss here is the cross-entropy against the soft target:

    −w · [p · log σ(r_c − r_r) + (1 − p) · log σ(r_r − r_c)]

whose optimum is σ(r_c − r_r) = p. A pair labelled 0.6 should end up with a small margin,
not the same margin as a pair labelled 0.99 — that is what makes the model usable as a
calibrated reward. SL-CAI pairs (revision ≻ initial) come in with p = 1.

The trainer is TRL's `RewardTrainer` with two changes: a collator that carries each
pair's `p_chosen` and `weight`, and `compute_loss` replaced by the soft loss. Texts are
tokenised here with `cai.train.common.pm_text`, the one rendering that the RL reward and
best-of-k also use, so the model scores at inference exactly the text it was trained on.

Also here, because DPO reads the same inputs: loading and validating preference files,
tie handling, the held-out split, the per-step log and checkpoint/resume helpers.
"""

from __future__ import annotations

import functools
import io
import json
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, read_text
from cai.core.records import write_json_atomic, write_text_atomic
from cai.core.stage import Stage, claim_dir, finished_run, register, write_card, write_manifest

STAGE = "train.pm"
TIES = ("keep", "drop", "weight")
SOURCES = ("labels", "sl-pairs")


@dataclass
class PreferenceTrainConfig:
    """What the preference-trained stages (PM and DPO) share: their data, ties, LoRA and
    schedule fields."""

    preferences: str | None = None
    """Soft AI labels: the label stage's preferences.jsonl or its folder."""
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
    bf16: bool = False
    """bf16 mixed precision (only on a GPU that supports it; ignored on CPU)."""
    force: bool = False
    """Start clean: a folder holding a run with another config is emptied instead of refused."""


@dataclass
class PMConfig(PreferenceTrainConfig):
    """Configuration of `cai train pm`."""

    model: str = "embedded:smollm2-135m"
    """Model spec of the base model; a scalar score head is added on top of it."""
    out: str = "runs/pm"
    """Folder for the trained model, eval.json, log.jsonl, calibration.png and manifest."""
    eval_fraction: float = 0.1
    """Fraction of pairs held out (seeded) for accuracy and calibration after training."""
    learning_rate: float = 1e-4
    """Peak learning rate (linear decay)."""
    batch_size: int = 4
    """Pairs per device per step (each pair is two sequences)."""
    max_length: int = 1024
    """Longest sequence in tokens; longer texts keep their end, where the score is read."""
    bins: int = 10
    """Bins of the held-out calibration (ECE) estimate and plot."""
    seed: int = 0
    """Seed of the split, data order, score-head and LoRA init."""

    def __post_init__(self) -> None:
        check_common(self)


def check_common(cfg: Any) -> None:
    """Range checks shared by the PM and DPO configs; each names its field."""
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
    ]
    if hasattr(cfg, "bins"):
        checks.append((cfg.bins >= 1, "bins", "must be at least 1"))
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
    with io.StringIO(read_text(p, "preference file")) as f:  # not UTF-8: file:line, no traceback
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CaiError(f"not valid JSON ({exc.msg})", where) from None
            if not isinstance(obj, dict):
                raise CaiError("expected a JSON object", where)
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
            if not texts["chosen"].strip() or not texts["rejected"].strip() \
                    or texts["chosen"].strip() == texts["rejected"].strip():
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


def load_training_rows(cfg: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The labelled preferences and SL pairs named by a config, weighted, ties handled."""
    if not cfg.preferences and not cfg.pairs:
        raise CaiError("give --preferences (label stage output), --pairs (SL stage output) or both",
                       field="preferences")
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    if cfg.preferences:
        prefs = load_preference_file(cfg.preferences, "labels", "preferences.jsonl")
        counts["preferences"] = len(prefs)
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

    turns = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"] \
        if isinstance(prompt, list) else [str(prompt)]
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


def encode_pm(tokenizer: Any, prompt: Any, response: str, max_length: int | None = None) -> list[int]:
    """Token ids a preference model scores for (prompt, response), cut to the last max_length.

    The text is `pm_text` (chat template, or Human/Assistant text). A template already
    holds its special tokens, so none are added; plain text gets the tokenizer's usual
    ones. Data text stays ordinary tokens (`encode_chat`): a response holding
    `<|im_end|>` cannot end its turn early. Truncation keeps the end because the score
    is read at the last token.
    """
    from cai.train.common import as_chat, encode_chat

    ids = encode_chat(tokenizer, as_chat(prompt) + [{"role": "assistant", "content": response}])
    return ids[-max_length:] if max_length and len(ids) > max_length else ids


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


# --------------------------------------------------------------------------- training helpers


def prepare_checkpoints(out: Path, cfg: Any) -> str | None:
    """The newest complete checkpoint to resume from, if an interrupted run with this config
    left one; a folder of a run with another config is refused (`force` starts clean)."""
    from cai.train.common import check_run_config, last_checkpoint

    check_run_config(out, cfg, force=bool(getattr(cfg, "force", False)))
    return last_checkpoint(out / "checkpoints")


def trainer_args(cls: type, cfg: Any, output_dir: Path | None, **extra: Any) -> Any:
    """TRL config with this project's CPU-safe defaults (no bf16, no gradient checkpointing).

    Without an output folder nothing is saved, and the Trainer gets a scratch folder (the
    caller removes it) instead of creating ./trainer_output in the working directory.
    """
    import torch

    cuda = torch.cuda.is_available()
    if output_dir is not None:
        folder = str(output_dir)
        save = {"save_strategy": "steps", "save_steps": cfg.save_steps, "save_total_limit": 1}
    else:
        folder, save = tempfile.mkdtemp(prefix="cai-train-"), {"save_strategy": "no"}
    return cls(output_dir=folder,
               learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
               per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
               gradient_accumulation_steps=cfg.grad_accum, logging_steps=cfg.logging_steps,
               seed=cfg.seed, data_seed=cfg.seed, bf16=bool(cfg.bf16 and cuda), use_cpu=not cuda,
               gradient_checkpointing=False, report_to=[], dataset_num_proc=None,
               disable_tqdm=False, **save, **extra)


def log_callback(path: Path | None):
    """A TrainerCallback appending one JSON line per logging step (for live plots).

    When a run resumes, the file is first rewritten from the checkpoint's log history, so
    steps after the checkpoint are not listed twice.
    """
    from transformers import TrainerCallback

    class _JsonlLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if path is not None:
                write_log(path, state.log_history)

        def on_log(self, args, state, control, logs=None, **kw):
            if path is not None and logs and "loss" in logs:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(_log_entry(state.global_step, logs)) + "\n")

    return _JsonlLog()


def _log_entry(step: int, logs: dict[str, Any]) -> dict[str, Any]:
    entry = {"step": int(logs.get("step", step))}
    entry.update({k: v for k, v in logs.items() if isinstance(v, int | float) and k != "step"})
    return entry


def log_entries(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training-step entries of a Trainer log history, flattened to numbers."""
    return [_log_entry(e.get("step", 0), e) for e in history if "loss" in e]


def write_log(path: Path, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write the training steps of a Trainer log history as log.jsonl; returns them."""
    entries = log_entries(history)
    write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))
    return entries


def finish_training(trainer: Any, lora: bool) -> Any:
    """The trained model as a plain transformers model (LoRA merged into the weights)."""
    model = trainer.model
    if lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    return model


# --------------------------------------------------------------------------- trainer


def _collator(pad_token_id: int):
    from trl.trainer.reward_trainer import DataCollatorForPreference

    base = DataCollatorForPreference(pad_token_id=pad_token_id)

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's padding (chosen rows first, then rejected) plus each pair's p and weight."""
        import torch

        batch = base([{"chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]} for e in examples])
        batch["p_chosen"] = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float32)
        batch["weight"] = torch.tensor([e.get("weight", 1.0) for e in examples], dtype=torch.float32)
        return batch

    return collate


@functools.cache
def _soft_reward_trainer_cls():
    from trl import RewardTrainer

    from cai.train.common import AtomicCheckpoints

    class SoftRewardTrainer(AtomicCheckpoints, RewardTrainer):
        """RewardTrainer whose loss is the soft-label cross-entropy (see the module docstring).

        TRL keeps its model set-up, PEFT wrapping, metrics averaging and checkpoints; only
        the columns kept and the loss differ.
        """

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "p_chosen", "weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            mode = "train" if self.model.training else "eval"
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            use_cache=False)
            r_c, r_r = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            margin = (r_c - r_r).float()
            loss = soft_preference_loss(margin, inputs["p_chosen"], inputs["weight"])
            with torch.no_grad():
                m = self._metrics[mode]
                acc = direction_accuracy(margin, inputs["p_chosen"])
                if acc is not None:
                    m["accuracy"].append(acc)
                m["margin"].append(margin.mean().item())
                m["mean_p"].append(inputs["p_chosen"].float().mean().item())
                m["p_model"].append(torch.sigmoid(margin).mean().item())
                m["abs_error"].append((torch.sigmoid(margin) - inputs["p_chosen"]).abs().mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftRewardTrainer


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


def train_pm(rows: list[dict[str, Any]], cfg: PMConfig, *, out: Path | None = None,
             resume_from: str | None = None, callbacks: list[Any] | None = None) -> TrainResult:
    """Train a soft-label preference model on rows (the shape `load_preference_file` returns).

    With `out`, checkpoints go to out/checkpoints and every logging step to out/log.jsonl;
    without it nothing is written (benchmarks). Extra `callbacks` are TrainerCallbacks.
    Saving is the caller's job.
    """
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig as TRLRewardConfig

    from cai.core.models import local_path

    t0 = time.time()
    base = local_path(cfg.model)
    tok = load_tokenizer(base)
    set_seed(cfg.seed)  # the score head is initialised at load time
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=1, dtype=torch.float32, use_safetensors=True)
    model.config.pad_token_id = tok.pad_token_id

    truncated = 0
    data = []
    for r in rows:
        ids = {}
        for key in ("chosen", "rejected"):
            full = encode_pm(tok, r["prompt"], r[key][-1]["content"])
            truncated += len(full) > cfg.max_length
            ids[key] = full[-cfg.max_length:]
        data.append({"chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"],
                     "p_chosen": r["p_chosen"], "weight": r["weight"]})
    if not data:
        raise CaiError("no training pairs left (all dropped as ties?)", field="ties")

    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="SEQ_CLS", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, target_modules="all-linear",
                                 modules_to_save=["score"])
    ckpt = out / "checkpoints" if out is not None else None
    args = trainer_args(TRLRewardConfig, cfg, ckpt, max_length=None, pad_to_multiple_of=None,
                        center_rewards_coefficient=None)
    trainer = _soft_reward_trainer_cls()(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(data), processing_class=tok,
        data_collator=_collator(tok.pad_token_id), peft_config=peft_config,
        callbacks=[log_callback(out / "log.jsonl" if out is not None else None), *(callbacks or [])])
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if out is None:
            shutil.rmtree(args.output_dir, ignore_errors=True)
    log = log_entries(trainer.state.log_history)
    model = finish_training(trainer, cfg.lora)
    model.config.pad_token_id = tok.pad_token_id
    return TrainResult(model, tok, log, trainer.state.global_step, round(time.time() - t0, 2),
                       {"train": len(data), "truncated_sequences": truncated})


# --------------------------------------------------------------------------- scoring


def load_reward_model(path: str | Path) -> tuple[Any, Any]:
    """A saved preference model (a folder or model spec) and its tokenizer, ready to score."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from cai.core.models import local_path

    p = local_path(str(path))
    tok = load_tokenizer(p)
    model = AutoModelForSequenceClassification.from_pretrained(str(p), dtype=torch.float32,
                                                               use_safetensors=True)
    if model.config.num_labels != 1:
        raise CaiError(f"expected a reward model with one output, found {model.config.num_labels}",
                       str(p))
    model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def pm_scores(model: Any, tok: Any, prompts: list[Any], responses: list[str], batch_size: int = 8,
              max_length: int | None = None) -> list[float]:
    """Scalar scores of (prompt, response) pairs, read exactly as in training.

    `max_length` defaults to the one the model was trained with (kept in the tokenizer).
    Sequences are sorted by length so a batch pads little, and right-padded so the model
    reads the score at the last real token.
    """
    import torch

    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    if max_length is None:  # the training run stores its max_length in the tokenizer
        limit = getattr(tok, "model_max_length", None)
        max_length = limit if isinstance(limit, int) and limit < 10**7 else None
    ids = [encode_pm(tok, p, r, max_length) for p, r in zip(prompts, responses)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    scores = [0.0] * len(ids)
    device = next(model.parameters()).device
    pad = tok.pad_token_id
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                x[row, :len(ids[i])] = torch.tensor(ids[i])
                mask[row, :len(ids[i])] = 1
            out = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False)
            for row, i in enumerate(idx):
                scores[i] = float(out.logits[row, 0].float())
    return scores


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

    from cai.evaluate.labeler import expected_calibration_error

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


def evaluate_pm(model: Any, tok: Any, rows: list[dict[str, Any]], cfg: PMConfig) -> dict[str, Any]:
    """Score held-out pairs and report accuracy and calibration against their soft labels."""
    prompts = [r["prompt"] for r in rows]
    r_c = pm_scores(model, tok, prompts, [r["chosen"][-1]["content"] for r in rows], cfg.batch_size,
                    cfg.max_length)
    r_r = pm_scores(model, tok, prompts, [r["rejected"][-1]["content"] for r in rows], cfg.batch_size,
                    cfg.max_length)
    return preference_report([c - r for c, r in zip(r_c, r_r)], rows, cfg.bins,
                             tie_threshold=cfg.tie_threshold)


# --------------------------------------------------------------------------- stage


def summary_metrics(log: list[dict[str, Any]], report: dict[str, Any]) -> dict[str, Any]:
    return {"first_loss": log[0]["loss"] if log else None, "last_loss": log[-1]["loss"] if log else None,
            **{f"eval_{k}": v for k, v in report.items()
               if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}}


def save_preference_run(out: Path, stage: str, cfg: Any, result: TrainResult, report: dict[str, Any],
                        *, t0: float, counts: dict[str, Any], n_eval: int, resumed: bool,
                        models: dict[str, str], title: str) -> dict[str, Any]:
    """What a finished PM or DPO run leaves: the model folder, log.jsonl, eval.json, the
    calibration plot and the manifest; its checkpoints are no longer needed."""
    from cai.train.common import disk_errors
    from cai.train.plots import reliability_png

    with disk_errors(out, "model"):
        result.model.save_pretrained(str(out), safe_serialization=True)
        result.tokenizer.save_pretrained(str(out))
    log = write_log(out / "log.jsonl", result.log)
    write_json_atomic(out / "eval.json", report)
    if report.get("reliability") is not None:
        reliability_png(report["reliability"], out / "calibration.png",
                        title=f"{title} ({report['pairs']} held-out pairs)")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return write_manifest(
        out, stage, config=cfg, inputs=("preferences", "pairs"), models=models,
        counts={**counts, **result.counts, "eval": n_eval, "steps": result.steps,
                "resumed": resumed},
        started=t0, timings={"train": result.seconds}, data=("model.safetensors",),
        extra={"metrics": summary_metrics(log, report)})


def run_pm(cfg: PMConfig, *, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when already done) the preference model; returns the manifest.

    A run killed mid-way resumes from out/checkpoints when rerun with the same config.
    """
    t0 = time.time()
    out = Path(cfg.out)
    rows, counts = load_training_rows(cfg)
    claim_dir(out, STAGE)
    done = finished_run(out, cfg, STAGE)
    if done is not None:
        return done
    train_rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    resume = prepare_checkpoints(out, cfg)
    result = train_pm(train_rows, cfg, out=out, resume_from=resume, callbacks=callbacks)
    result.tokenizer.model_max_length = cfg.max_length  # pm_scores truncates as training did
    report = evaluate_pm(result.model, result.tokenizer, eval_rows, cfg)
    report["split"] = split_summary(train_rows, eval_rows, cfg.eval_fraction, cfg.seed)
    manifest = save_preference_run(out, STAGE, cfg, result, report, t0=t0, counts=counts,
                                   n_eval=len(eval_rows), resumed=bool(resume),
                                   models={"base": cfg.model}, title="PM calibration")
    write_card(out, "Preference model",
               f"A soft-label preference model on `{cfg.model}` ({'LoRA, merged' if cfg.lora else 'full'}): "
               "load it with `cai.train.pm.load_reward_model` and score with `pm_scores`. Held-out "
               f"accuracy {fmt(report.get('accuracy'))}, ECE {fmt(report.get('ece'))} (eval.json).", manifest)
    return manifest


register(Stage(name=STAGE, config=PMConfig, run=run_pm,
               help="Train a preference model on soft AI labels (and SL pairs).",
               inputs=("preferences", "pairs"),
               outputs=("model.safetensors", "eval.json", "log.jsonl", "calibration.png")))

__all__ = ["PMConfig", "run_pm", "train_pm", "load_reward_model", "pm_scores", "soft_preference_loss",
           "load_preference_file", "load_training_rows", "apply_ties", "split_rows", "encode_pm",
           "evaluate_pm", "preference_report", "TrainResult"]
