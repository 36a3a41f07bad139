"""Supervised fine-tuning on SL-CAI data with TRL's SFTTrainer, full or LoRA.

The SL stage's sft.jsonl holds chats (prompt → final revision). They are given to TRL as
prompt/completion pairs so the loss falls on the assistant's answer only, not on the
red-team prompt. A LoRA run is merged into the base weights before saving, so the saved
folder is an ordinary transformers model: it works as a model spec for every later stage
and as the frozen reference of RL and DPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.models import resolve_spec
from cai.core.stage import Input, Output, Stage, register, write_card, write_manifest
from cai.train.loading import HardwareConfig, precision_record

STAGE = "sft"


@dataclass
class SFTConfig(HardwareConfig):
    """Configuration of `cai train sft`; saved in the model folder's manifest.json."""

    data: str = "runs/sl/sft.jsonl"
    """SFT data: a jsonl of {"messages": [...]} chats, or an SL stage folder."""
    model: str = "embedded:smollm2-135m"
    """Model spec of the base model to fine-tune."""
    out: str = "runs/sft"
    """Folder for the trained model, tokenizer, config and training log."""
    lora: bool = True
    """Train LoRA adapters (peft) instead of all weights; merged before saving."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    learning_rate: float = 2e-4
    """Peak learning rate (LoRA likes ~1e-4–5e-4; full fine-tuning ~1e-5)."""
    epochs: float = 1.0
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = use epochs)."""
    batch_size: int = 4
    """Examples per device per step."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    max_length: int = 512
    """Truncate examples to this many tokens."""
    logging_steps: int = 1
    """Log the loss every N steps."""
    seed: int = 0
    """Training seed (data order, LoRA init)."""
    save_steps: int = 50
    """Checkpoint every N steps into out/checkpoints; a rerun resumes from the last one."""
    force: bool = False
    """Start clean: a folder holding a run with another config is emptied instead of refused."""

    def __post_init__(self) -> None:
        self.check_hardware()
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length",
                     "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise CaiError("must be at least 1", field=name)
        if not 0 <= self.lora_dropout < 1:
            raise CaiError(f"must be in [0, 1), got {self.lora_dropout}", field="lora_dropout")
        for name in ("learning_rate", "epochs"):
            if not getattr(self, name) > 0:
                raise CaiError("must be > 0", field=name)
        if self.max_steps == 0 or self.max_steps < -1:
            raise CaiError("must be -1 (use epochs) or at least 1", field="max_steps")


def load_sft_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read chats and turn each into a TRL conversational prompt/completion pair."""
    from cai.core.data import parse_jsonl
    from cai.core.errors import read_text

    p = Path(path)
    if p.is_dir():
        p = p / "sft.jsonl"
    if not p.exists():
        raise CaiError("SFT data not found (run `cai sl` first)", str(p))
    rows = []
    for where, obj in parse_jsonl(read_text(p, "SFT data"), str(p)):
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise CaiError("expected a list of {role, content} messages", where, "messages")
        if not msgs or msgs[-1].get("role") != "assistant":
            raise CaiError("the last message must be the assistant's", where, "messages")
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    if not rows:
        raise CaiError("no SFT examples (were all SL records filtered out?)", str(p))
    return rows


def sft_features(rows: list[dict[str, Any]], tokenizer: Any, max_length: int
                 ) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids and completion mask of each prompt/completion row, as TRL's SFTTrainer
    would build them, but with data text always ordinary tokens (`encode_chat`): an answer
    holding `<|im_end|>\n<|im_start|>assistant\n` is learnt as text, not as a new turn.

    A row whose prompt alone fills `max_length` has no answer token left to learn from and
    is dropped; returns the rows kept and how many were dropped.
    """
    from cai.train.common import prompt_completion_ids

    kept, dropped = [], 0
    for r in rows:
        head, (answer,) = prompt_completion_ids(tokenizer, r["prompt"],
                                                [r["completion"][-1]["content"]])
        if len(head) >= max_length or not answer:
            dropped += 1
            continue
        kept.append({"input_ids": head + answer,
                     "completion_mask": [0] * len(head) + [1] * len(answer)})
    return kept, dropped


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune, save the model folder, its log and manifest; returns the manifest.

    A rerun with the same config returns the finished run; an interrupted one continues
    from its last complete checkpoint; one with another config is refused (`force` starts
    clean).
    """
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from cai.train.common import (
        CHECKPOINTS,
        LOG,
        atomic_trainer,
        check_policy_folder,
        disk_errors,
        log_callback,
        resume_point,
        start_run,
        trainer_args,
        write_log,
    )
    from cai.train.loading import (
        check_run_options,
        load_model,
        lora_config,
        prepare_for_training,
        tensorboard_dir,
    )

    t0 = time.time()
    check_run_options(cfg)  # before anything is read or loaded
    rows = load_sft_rows(cfg.data)
    out = Path(cfg.out)
    done = start_run(out, cfg, STAGE, ignore=("save_steps", "logging_steps"))
    if done is not None:
        return done
    base_model = resolve_spec(cfg.model)  # its folder and identity, worked out once
    base = base_model.path
    check_policy_folder(base)
    tok = AutoTokenizer.from_pretrained(str(base))
    features, too_long = sft_features(rows, tok, cfg.max_length)
    if not features:  # checked before the model loads
        raise CaiError(f"every example's prompt fills max_length ({cfg.max_length} tokens), "
                       "leaving no answer token to learn from; raise --max-length", field="max_length")
    model = prepare_for_training(load_model(base, cfg, trainable=True, lora=cfg.lora), cfg,
                                 cfg.lora)
    args = trainer_args(TRLSFTConfig, cfg, out / CHECKPOINTS, max_length=cfg.max_length,
                        completion_only_loss=True)
    peft_config = lora_config(cfg) if cfg.lora else None
    with tensorboard_dir(out):
        trainer = atomic_trainer(SFTTrainer)(model=model, args=args,
                                             train_dataset=datasets.Dataset.from_list(features),
                                             processing_class=tok, peft_config=peft_config,
                                             callbacks=[log_callback(out / LOG)])
    resume = resume_point(out)
    trainer.train(resume_from_checkpoint=resume)
    trained = trainer.model
    with disk_errors(out, "model"):
        if cfg.lora:
            trained.save_pretrained(str(out / "adapter"))
            trained = trained.merge_and_unload()
        trained.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))
    log = write_log(out / LOG, trainer.state.log_history)
    metrics = {"first_loss": log[0]["loss"] if log else None,
               "last_loss": log[-1]["loss"] if log else None, "resumed": resume is not None}
    manifest = write_manifest(out, STAGE, config=cfg,
                              models={"base": base_model.identity},
                              counts={"examples": len(features), "too_long_dropped": too_long,
                                      "steps": trainer.state.global_step},
                              started=t0, data=("model.safetensors",),
                              extra={"metrics": metrics, "output": str(out),
                                     "precision": precision_record(cfg)})
    write_card(out, "SL-CAI model", f"`{cfg.model}` fine-tuned on SL-CAI revisions "
               f"({'LoRA, merged' if cfg.lora else 'full'}); load it as the model spec "
               f"`{out}`.", manifest)
    return manifest


register(Stage(STAGE, SFTConfig, run_sft, "Supervised fine-tuning on SL-CAI data.",
               inputs=(Input("data", "sl-data"), Input("model", "base-model", model=True)),
               outputs=(Output("policy", player="sl-cai"), Output("sl-model")), command="train sft",
               pipeline=True))

__all__ = ["SFTConfig", "run_sft", "load_sft_rows", "sft_features"]
