"""Supervised fine-tuning on SL-CAI data with TRL's SFTTrainer, full or LoRA.

The SL stage's sft.jsonl holds chats (prompt → final revision). They are given to TRL as
prompt/completion pairs so the loss falls on the assistant's answer only, not on the
red-team prompt. A LoRA run is merged into the base weights before saving, so the saved
folder is an ordinary transformers model: it works as a model spec for every later stage
and as the frozen reference of RL and DPO.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.config import to_dict
from cai.errors import CaiError
from cai.records import git_revision, write_json_atomic


@dataclass
class SFTConfig:
    """Configuration of `cai train sft`; saved beside the model as cai_train.json."""

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
    bf16: bool = False
    """bf16 mixed precision (GPUs that support it)."""


def load_sft_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read chats and turn each into a TRL conversational prompt/completion pair."""
    p = Path(path)
    if p.is_dir():
        p = p / "sft.jsonl"
    if not p.exists():
        raise CaiError("SFT data not found (run `cai sl` first)", str(p))
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                msgs = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CaiError("expected a JSON object with `messages`", f"{p}:{n}", "messages") from None
            if not msgs or msgs[-1].get("role") != "assistant":
                raise CaiError("the last message must be the assistant's", f"{p}:{n}", "messages")
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    if not rows:
        raise CaiError("no SFT examples (were all SL records filtered out?)", str(p))
    return rows


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune, save the model folder and its training log; returns a summary."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from cai.models import local_path

    t0 = time.time()
    rows = load_sft_rows(cfg.data)
    base = local_path(cfg.model)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    out = Path(cfg.out)
    cuda = torch.cuda.is_available()
    args = TRLSFTConfig(
        output_dir=str(out / "checkpoints"), learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length, logging_steps=cfg.logging_steps, seed=cfg.seed,
        save_strategy="no", report_to=[], bf16=cfg.bf16 and cuda, use_cpu=not cuda,
        gradient_checkpointing=False, completion_only_loss=True, dataset_num_proc=None,
        disable_tqdm=False,
    )
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                                 target_modules="all-linear")
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config)
    trainer.train()
    trained = trainer.model
    if cfg.lora:
        trained.save_pretrained(str(out / "adapter"))
        trained = trained.merge_and_unload()
    trained.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    log = [e for e in trainer.state.log_history if "loss" in e]
    with open(out / "training_log.jsonl", "w", encoding="utf-8") as f:
        for e in trainer.state.log_history:
            f.write(json.dumps(e) + "\n")
    summary = {"stage": "sft", "output": str(out), "model": cfg.model, "examples": len(rows),
               "steps": trainer.state.global_step,
               "metrics": {"first_loss": log[0]["loss"] if log else None,
                           "last_loss": log[-1]["loss"] if log else None},
               "timings_s": {"total": round(time.time() - t0, 2)}}
    write_json_atomic(out / "cai_train.json", {"config": to_dict(cfg), "git": git_revision(),
                                               **summary})
    return summary


__all__ = ["SFTConfig", "run_sft", "load_sft_rows"]
