"""`cai train dpo`: direct preference optimisation on soft AI labels.

DPO's sigmoid loss treats every pair as certain. With a soft label p the target is the
cross-entropy against p instead:

    −[p · log σ(βΔ) + (1 − p) · log σ(−βΔ)],
    Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)),

minimised at σ(βΔ) = p: the policy's implied preference matches the label instead of
growing without bound. A pair labelled 0.55 then moves the policy a little, and a
0.99 a lot.

TRL 1.16's DPOTrainer computes its loss inside one long method with no per-pair hook, so
the subclass below keeps TRL's dataset tokenisation, reference handling (a frozen copy,
or the adapter switched off under LoRA), fused log-prob head, metrics averaging and
checkpoints, and replaces only `compute_loss`: one policy forward, the reference
log-probs from TRL's own `compute_ref_log_probs`, then the soft loss per pair.

The reference is the SFT model loaded from the same saved folder as the policy, never a
hub name: TRL would otherwise rebuild it from `config._name_or_path`.
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.stage import Input, Output, Stage, register, write_card
from cai.train import prefs
from cai.train.common import CHECKPOINTS, LOG, finish_training, log_callback, log_entries, trainer_args

STAGE = "dpo"


@dataclass
class DPOTrainConfig(prefs.PreferenceTrainConfig):
    """Configuration of `cai train dpo`."""

    model: str = "embedded:smollm2-135m"
    """Model spec of the SFT / SL-CAI policy to start from; also the frozen reference."""
    out: str = "runs/dpo"
    """Folder for the trained policy, eval.json, log.jsonl and manifest."""
    beta: float = 0.1
    """KL strength β: the implied preference is σ(β·Δ) (smaller β lets the policy move further);
    eval.json's calibration is that of σ(β·Δ) against the labels."""
    learning_rate: float = 5e-6
    """Peak learning rate (linear decay); LoRA tolerates ~10× more."""
    max_length: int = 1024
    """Longest prompt + response in tokens; longer ones lose their end (TRL's keep_start)."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise CaiError("must be positive", field="beta")
        prefs.check_common(self)


# --------------------------------------------------------------------------- data


def dpo_rows(rows: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """Rows tokenised as TRL's DPOTrainer splits them (prompt_ids, chosen_ids, rejected_ids),
    plus p_chosen, weight and a row index.

    Tokenised here with `prompt_completion_ids`, so data text stays ordinary tokens: a
    response holding `<|im_end|>` cannot close its turn (TRL's own tokenisation would make
    it a control token). Clean rows get exactly TRL's ids; a tokenizer without a chat
    template gets plain Human/Assistant text with EOS after each response, as in TRL.
    """
    from cai.train.common import prompt_completion_ids

    out = []
    for i, r in enumerate(rows):
        head, (chosen, rejected) = prompt_completion_ids(
            tokenizer, r["prompt"], [r["chosen"][-1]["content"], r["rejected"][-1]["content"]])
        out.append({"prompt_ids": head, "chosen_ids": chosen, "rejected_ids": rejected,
                    "p_chosen": float(r["p_chosen"]), "weight": float(r["weight"]), "row": i})
    return out


def _collator(pad_token_id: int, max_length: int | None):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    base = DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length,
                                     truncation_mode="keep_start")

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's DPO padding plus each pair's p, weight and row index."""
        import torch

        keep = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
        batch = base([{k: e[k] for k in keep if k in e} for e in examples])
        batch["p_chosen"] = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float32)
        batch["weight"] = torch.tensor([e.get("weight", 1.0) for e in examples], dtype=torch.float32)
        batch["row"] = torch.tensor([e.get("row", -1) for e in examples], dtype=torch.long)
        return batch

    return collate


# --------------------------------------------------------------------------- trainer


def completion_logps(model: Any, input_ids: Any, attention_mask: Any, completion_mask: Any) -> Any:
    """Summed log-probability of each row's completion tokens (right-padded batch).

    Logits are computed only from the first completion position on (`logits_to_keep`),
    through the model's own head, so logit scaling or soft-capping stays the model's.
    """
    import torch

    shift = completion_mask[:, 1:]  # shift[:, j]: token j+1 is a completion token, predicted at j
    if not bool(shift.any()):
        return torch.zeros(input_ids.size(0), device=input_ids.device)
    first = int(shift.any(dim=0).float().argmax())
    keep = input_ids.size(1) - first
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=keep).logits[:, :-1].float()
    targets = input_ids[:, first + 1:]
    token_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_lp * shift[:, first:]).sum(dim=1)


def fused_completion_logps(model: Any, input_ids: Any, attention_mask: Any, completion_mask: Any) -> Any:
    """The same sums through TRL's fused head (the model must have `add_fused_lm_head`)."""
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                use_cache=False)
    shift = completion_mask[:, 1:]
    return (out.log_probs[:, -shift.size(1):] * shift).sum(dim=1)


@functools.cache
def _soft_dpo_trainer_cls():
    import torch
    from trl import DPOTrainer

    from cai.train.common import AtomicCheckpoints

    class SoftDPOTrainer(AtomicCheckpoints, DPOTrainer):
        """DPOTrainer with the per-pair soft-target sigmoid loss (see the module docstring)."""

        use_fused_head: bool | None = None
        """None: TRL's fused log-prob head on GPUs, the plain head elsewhere (tests force it)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """Rows `dpo_rows` tokenised already only lose those whose prompt fills
            max_length (TRL's keep_start rule); TRL's own tokenisation is skipped."""
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is not None:
                dataset = dataset.filter(lambda e: len(e["prompt_ids"]) < args.max_length)
            return dataset

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            for col in ("p_chosen", "weight", "row"):
                if col not in self._signature_columns:
                    self._signature_columns.append(col)

        def _fused(self) -> bool:
            # The fused head (Triton) saves memory on GPUs; elsewhere its torch fallback is
            # slower than `completion_logps`, so only a GPU uses it unless asked.
            if self.use_fused_head is not None:
                return self.use_fused_head
            return self.accelerator.device.type in ("cuda", "xpu")

        def pair_logratio(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
            """Δ per pair: policy minus reference log-ratio of chosen over rejected."""
            seq = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
            logps = (fused_completion_logps if self._fused() else completion_logps)(model, **seq)
            pol_c, pol_r = logps.chunk(2, dim=0)
            if "ref_chosen_logps" in inputs:
                ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            elif self._fused():
                # TRL switches the adapter off itself when there is no separate reference model.
                ref_c, ref_r = self.compute_ref_log_probs(self.ref_model or self.model, seq)
            else:
                with torch.no_grad():
                    if self.ref_model is not None:
                        ref = completion_logps(self.ref_model, **seq)
                    else:
                        with self.accelerator.unwrap_model(self.model).disable_adapter():
                            ref = completion_logps(self.model, **seq)
                ref_c, ref_r = ref.chunk(2, dim=0)
            return (pol_c - ref_c) - (pol_r - ref_r)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            delta = self.pair_logratio(model, inputs).float()
            z = self.beta * delta
            loss = prefs.soft_preference_loss(z, inputs["p_chosen"], inputs["weight"])
            with torch.no_grad():
                m = self._metrics[mode]
                implied = torch.sigmoid(z)
                m["implied_p"].append(implied.mean().item())
                m["mean_p"].append(inputs["p_chosen"].float().mean().item())
                m["abs_error"].append((implied - inputs["p_chosen"]).abs().mean().item())
                acc = prefs.direction_accuracy(delta, inputs["p_chosen"])
                if acc is not None:
                    m["accuracy"].append(acc)
                m["rewards/margins"].append(z.mean().item())
            return (loss, {"delta": delta}) if return_outputs else loss

        @torch.no_grad()
        def deltas(self, dataset: Any) -> dict[int, float]:
            """Δ for every row of a prepared dataset, keyed by its `row` index."""
            was_training = self.model.training
            self.model.eval()
            found: dict[int, float] = {}
            for batch in self.get_eval_dataloader(dataset):
                batch = self._prepare_inputs(batch)
                d = self.pair_logratio(self.model, batch)
                found.update(zip(batch["row"].tolist(), d.float().tolist()))
            self.model.train(was_training)
            return found

    return SoftDPOTrainer


def train_dpo(rows: list[dict[str, Any]], cfg: DPOTrainConfig, *, out: Path | None = None,
              resume_from: str | None = None, eval_rows: list[dict[str, Any]] | None = None,
              callbacks: list[Any] | None = None) -> tuple[prefs.TrainResult, list[float | None]]:
    """Soft DPO on rows (as `load_preference_file` returns them).

    Returns the merged policy with its log, and Δ for each of `eval_rows` measured
    before merging (None for a pair cut away by max_length). With `out`, checkpoints go
    to out/checkpoints and every logging step to out/log.jsonl.
    """
    import datasets
    from transformers import set_seed
    from trl import DPOConfig as TRLDPOConfig

    from cai.core.models import local_path
    from cai.train.common import check_policy_folder
    from cai.train.loading import load_model, lora_config, prepare_for_training, tensorboard_dir

    t0 = time.time()
    if not rows:
        raise CaiError("no training pairs left (all dropped as ties?)", field="ties")
    path = local_path(cfg.model)
    check_policy_folder(path)
    tok = prefs.load_tokenizer(path)
    train_data = dpo_rows(rows, tok)  # tokenised (and checked) before the model loads
    if not any(len(r["prompt_ids"]) < cfg.max_length for r in train_data):
        raise CaiError(f"every pair's prompt fills max_length ({cfg.max_length} tokens), leaving "
                       "no response token to learn from; raise --max-length", field="max_length")
    set_seed(cfg.seed)
    model = prepare_for_training(load_model(path, cfg, trainable=True, lora=cfg.lora), cfg,
                                 cfg.lora)
    ref_model = None
    if not cfg.lora:  # under LoRA the reference is the same weights with the adapter off
        ref_model = load_model(path, cfg, trainable=False)
    peft_config = lora_config(cfg) if cfg.lora else None
    ckpt = out / CHECKPOINTS if out is not None else None
    args = trainer_args(TRLDPOConfig, cfg, ckpt, beta=cfg.beta, max_length=cfg.max_length,
                        truncation_mode="keep_start", pad_to_multiple_of=None, loss_type=["sigmoid"],
                        precompute_ref_log_probs=False)
    train_ds = datasets.Dataset.from_list(train_data)
    eval_ds = datasets.Dataset.from_list(dpo_rows(eval_rows, tok)) if eval_rows else None
    with tensorboard_dir(out):
        trainer = _soft_dpo_trainer_cls()(
            model=model, ref_model=ref_model, args=args, train_dataset=train_ds,
            eval_dataset=eval_ds, processing_class=tok,
            data_collator=_collator(tok.pad_token_id, cfg.max_length), peft_config=peft_config,
            callbacks=[log_callback(out / LOG if out is not None else None), *(callbacks or [])])
    kept = len(trainer.train_dataset)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if out is None:
            shutil.rmtree(args.output_dir, ignore_errors=True)
    found = trainer.deltas(trainer.eval_dataset) if eval_ds is not None else {}
    deltas = [found.get(i) for i in range(len(eval_rows or []))]
    log = log_entries(trainer.state.log_history)
    policy = finish_training(trainer, cfg.lora)
    return prefs.TrainResult(policy, tok, log, trainer.state.global_step, round(time.time() - t0, 2),
                       {"train": kept, "too_long_dropped": len(rows) - kept}), deltas


def evaluate_dpo(deltas: list[float | None], rows: list[dict[str, Any]], cfg: DPOTrainConfig
                 ) -> dict[str, Any]:
    """Held-out implied preference σ(β·Δ) against the soft labels (accuracy, ECE, by source).

    `mean_margin` is the mean β·Δ (TRL's "rewards/margins"); `per_pair` lists each pair's
    implied preference as `p_model`.
    """
    pairs = [(d, r) for d, r in zip(deltas, rows) if d is not None]
    report = prefs.preference_report([d for d, _ in pairs], [r for _, r in pairs], cfg.bins,
                                     scale=cfg.beta, tie_threshold=cfg.tie_threshold)
    report["beta"] = cfg.beta
    if "mean_p_model" in report:
        report["mean_implied_p"] = report.pop("mean_p_model")
    return report


def run_dpo(cfg: DPOTrainConfig, *, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when already done) the DPO policy; returns the manifest.

    A run killed mid-way resumes from out/checkpoints when rerun with the same config.
    """
    run = prefs.PreferenceRun.open(cfg, STAGE)
    if run.done is not None:
        return run.done
    out = run.out
    result, deltas = train_dpo(run.train_rows, cfg, out=out, resume_from=run.resume,
                               eval_rows=run.eval_rows, callbacks=callbacks)
    report = evaluate_dpo(deltas, run.eval_rows, cfg)
    manifest = run.finish(result, report, models={"base": cfg.model, "reference": cfg.model},
                          title="DPO implied preference")
    write_card(out, "DPO policy",
               f"`{cfg.model}` trained with soft-label DPO (β = {cfg.beta}, "
               f"{'LoRA, merged' if cfg.lora else 'full'}); the folder is a model spec. Held-out "
               f"implied preference {prefs.fmt(report.get('mean_implied_p'))} vs labels "
               f"{prefs.fmt(report.get('mean_p_target'))} "
               "(eval.json).", manifest)
    return manifest


register(Stage(name=STAGE, config=DPOTrainConfig, run=run_dpo,
               help="DPO of the SL-CAI model on soft AI labels (and SL pairs).",
               inputs=(Input("preferences", "labels"), Input("pairs", "sl-data"),
                       Input("model", "sl-model", model=True)),
               outputs=(Output("policy", player="dpo"),), command="train dpo",
               pipeline=True))

__all__ = ["DPOTrainConfig", "run_dpo", "train_dpo", "evaluate_dpo", "dpo_rows", "completion_logps"]
