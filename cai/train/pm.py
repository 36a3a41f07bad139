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

What the PM shares with DPO (reading preference files, ties, the held-out split, the
soft loss, eval.json and the calibration plot) is in `cai.train.prefs`; the checkpoints,
resume rule and per-step log every trainer shares are in `cai.train.common`.
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.reward_spec import PM
from cai.core.stage import Input, Output, Stage, register, write_card
from cai.train.common import CHECKPOINTS, LOG, finish_training, log_callback, log_entries, trainer_args
from cai.train.prefs import (
    PreferenceRun,
    PreferenceTrainConfig,
    TrainResult,
    check_common,
    direction_accuracy,
    fmt,
    load_tokenizer,
    preference_report,
    soft_preference_loss,
)

STAGE = "pm"


@dataclass
class PMConfig(PreferenceTrainConfig):
    """Configuration of `cai train pm`."""

    model: str = "embedded:smollm2-135m"
    """Model spec of the base model; a scalar score head is added on top of it."""
    out: str = "runs/pm"
    """Folder for the trained model, eval.json, log.jsonl, calibration.png and manifest."""
    learning_rate: float = 1e-4
    """Peak learning rate (linear decay)."""
    max_length: int = 1024
    """Longest sequence in tokens; longer texts keep their end, where the score is read."""
    split: str = "none"
    """"halves": train two PMs on disjoint halves of the training pairs (split by prompt):
    the train PM here, the test PM in `test/` (RL can log it with the `test-pm` monitor)."""

    def __post_init__(self) -> None:
        from cai.train.pm_halves import SPLITS

        check_common(self)
        if self.split not in SPLITS:
            raise CaiError(f"must be one of {SPLITS}", field="split")


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


def train_pm(rows: list[dict[str, Any]], cfg: PMConfig, *, out: Path | None = None,
             resume_from: str | None = None, callbacks: list[Any] | None = None) -> TrainResult:
    """Train a soft-label preference model on rows (the shape `load_preference_file` returns).

    With `out`, checkpoints go to out/checkpoints and every logging step to out/log.jsonl;
    without it nothing is written (benchmarks). Extra `callbacks` are TrainerCallbacks.
    Saving is the caller's job.
    """
    import datasets
    from transformers import set_seed
    from trl import RewardConfig as TRLRewardConfig

    from cai.core.models import local_path
    from cai.train.loading import load_model, lora_config, prepare_for_training, tensorboard_dir

    t0 = time.time()
    base = local_path(cfg.model)
    tok = load_tokenizer(base)
    set_seed(cfg.seed)  # the score head is initialised at load time
    model = load_model(base, cfg, trainable=True, lora=cfg.lora, head="score", num_labels=1)
    model = prepare_for_training(model, cfg, cfg.lora)
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

    peft_config = lora_config(cfg, task_type="SEQ_CLS", modules_to_save=["score"]) if cfg.lora else None
    ckpt = out / CHECKPOINTS if out is not None else None
    args = trainer_args(TRLRewardConfig, cfg, ckpt, max_length=None, pad_to_multiple_of=None,
                        center_rewards_coefficient=None)
    with tensorboard_dir(out):
        trainer = _soft_reward_trainer_cls()(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(data),
            processing_class=tok, data_collator=_collator(tok.pad_token_id), peft_config=peft_config,
            callbacks=[log_callback(out / LOG if out is not None else None), *(callbacks or [])])
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


def load_reward_model(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """A saved preference model (a folder or model spec) and its tokenizer, ready to score;
    held in `dtype` (a `cai.train.loading` dtype name: RL holds it in the run's)."""
    from cai.core.models import local_path
    from cai.train.loading import HardwareConfig, load_model

    p = local_path(str(path))
    tok = load_tokenizer(p)
    model = load_model(p, HardwareConfig(dtype=dtype), trainable=False, head="score")
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


def run_pm(cfg: PMConfig, *, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when already done) the preference model; returns the manifest.

    A run killed mid-way resumes from out/checkpoints when rerun with the same config.
    """
    run = PreferenceRun.open(cfg, STAGE)
    if run.done is not None:
        return run.done
    out = run.out
    if cfg.split == "halves":  # the test PM first, into out/test; this trains on the rest
        from cai.train.pm_halves import train_test_half

        run.train_rows = train_test_half(out, cfg, run.train_rows, run.eval_rows, run.counts,
                                         stage=STAGE, train_pm=train_pm, evaluate_pm=evaluate_pm)
    result = train_pm(run.train_rows, cfg, out=out, resume_from=run.resume, callbacks=callbacks)
    result.tokenizer.model_max_length = cfg.max_length  # pm_scores truncates as training did
    report = evaluate_pm(result.model, result.tokenizer, run.eval_rows, cfg)
    manifest = run.finish(result, report, models={"base": cfg.model}, title="PM calibration")
    write_card(out, "Preference model",
               f"A soft-label preference model on `{cfg.model}` ({'LoRA, merged' if cfg.lora else 'full'}): "
               "load it with `cai.train.pm.load_reward_model` and score with `pm_scores`. Held-out "
               f"accuracy {fmt(report.get('accuracy'))}, ECE {fmt(report.get('ece'))} (eval.json).", manifest)
    return manifest


register(Stage(name=STAGE, config=PMConfig, run=run_pm,
               help="Train a preference model on soft AI labels (and SL pairs).",
               inputs=(Input("preferences", "labels"), Input("pairs", "sl-data"),
                       Input("model", "base-model", model=True)),
               outputs=(Output("reward", prefix=PM), Output("pm-eval", file="eval.json")),
               command="train pm", pipeline=True))

__all__ = ["PMConfig", "run_pm", "train_pm", "load_reward_model", "pm_scores", "encode_pm",
           "evaluate_pm"]
