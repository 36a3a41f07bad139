"""How every trainer holds its models: one loader and the options it reads.

Each trainer (sft, pm, dpo, rl with PPO, RLOO or GRPO) loads its policy, reference,
reward and LoRA base here, through the same safe loader the inference backend uses
(`cai.backends.hf.load_pretrained`: safetensors only, never code from the folder), so the
memory options exist once:

- `dtype`: what the frozen models (reference, reward, a LoRA run's base) are held in; a
  fully fine-tuned model keeps fp32 master weights and fp32 optimizer state, and only its
  compute runs in the lower precision (the Trainer's mixed precision, autocast in PPO);
- `gradient_checkpointing`: activations recomputed in the backward pass (with LoRA the
  embeddings' outputs are made to require grads, so the adapters still get gradients);
- `load_in_4bit`: QLoRA, a 4-bit NF4 base through bitsandbytes, CUDA only;
- `report_to`: TensorBoard or Weights & Biases beside the run's own log.jsonl.

Under one process nothing is sharded. Under DeepSpeed ZeRO-3 an `Accelerator` made before
loading registers its config with transformers, whose `from_pretrained` then builds the
model partitioned (`deepspeed.zero.Init`); under FSDP with `fsdp_cpu_ram_efficient_loading`
only process 0 reads the weights and the others build on the meta device. Either way the
loaded model is left where it is (`keep_on_cpu`) for the sharding engine to place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError

DTYPES = ("auto", "bfloat16", "float16", "float32")
REPORT_TO = ("none", "tensorboard", "wandb")
TENSORBOARD = "tensorboard"
"""Where a run's TensorBoard event files go, inside its folder."""


@dataclass
class HardwareConfig:
    """The memory and logging options every trainer shares (see `cai.train.loading`)."""

    dtype: str = "auto"
    """"auto" (bfloat16 on a GPU that has it, float32 on a CPU), "bfloat16", "float16" or
    "float32": frozen models (reference, reward, a LoRA base) are held in it; full
    fine-tuning keeps fp32 weights and optimizer state and computes in it (mixed precision)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory,
    about a third more compute)."""
    load_in_4bit: bool = False
    """QLoRA: hold the LoRA base in 4-bit NF4 (bitsandbytes; needs a CUDA GPU and lora)."""
    report_to: str = "none"
    """Also log training to "tensorboard" (event files in OUT/tensorboard) or "wandb"
    (set WANDB_MODE=offline to keep it local), or "none"."""

    def check_hardware(self) -> None:
        """Range checks of these fields, each naming its field."""
        if self.dtype not in DTYPES:
            raise CaiError(f"must be one of {DTYPES}, got {self.dtype!r}", field="dtype")
        if self.report_to not in REPORT_TO:
            raise CaiError(f"must be one of {REPORT_TO}, got {self.report_to!r}",
                           field="report_to")


def resolve_dtype(name: str) -> Any:
    """The torch dtype a `dtype` field names; "auto" is bf16 on a GPU that has it, else fp32
    (a CPU run under "auto" is exactly the fp32 run it always was)."""
    import torch

    if name == "auto":
        cuda = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else torch.float32
    if name not in DTYPES:
        raise CaiError(f"must be one of {DTYPES}, got {name!r}", field="dtype")
    return getattr(torch, name)


def precision_record(cfg: Any) -> dict[str, Any]:
    """What a manifest records of the precision a run actually used ("auto" resolved on
    this machine)."""
    dtype = str(resolve_dtype(cfg.dtype)).removeprefix("torch.")
    return {"dtype": cfg.dtype, "resolved": dtype, "trained_weights": "float32"
            if not getattr(cfg, "lora", False) else dtype,
            "gradient_checkpointing": bool(cfg.gradient_checkpointing),
            "load_in_4bit": bool(cfg.load_in_4bit), "report_to": cfg.report_to}


def check_run_options(cfg: Any, lora: bool | None = None) -> None:
    """What must hold before anything is loaded: 4-bit needs CUDA, bitsandbytes and LoRA;
    a reporting tool must be installed. Each failure is one line naming the option."""
    import importlib.util

    import torch

    if getattr(cfg, "dtype", "auto") == "float16" and not torch.cuda.is_available():
        raise CaiError("float16 mixed precision needs a CUDA GPU; use bfloat16 or float32 on a "
                       "CPU", field="dtype")
    if getattr(cfg, "load_in_4bit", False):
        if not torch.cuda.is_available():
            raise CaiError("needs a CUDA GPU (bitsandbytes' 4-bit kernels); none is visible "
                           "here: drop --load-in-4bit", field="load_in_4bit")
        if not (cfg.lora if lora is None else lora):
            raise CaiError("a 4-bit base cannot be trained itself: add --lora (QLoRA)",
                           field="load_in_4bit")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise CaiError("needs bitsandbytes (pip install bitsandbytes)", field="load_in_4bit")
    tool = getattr(cfg, "report_to", "none")
    if tool != "none" and importlib.util.find_spec(tool) is None:
        raise CaiError(f"{tool} is not installed (pip install {tool}), or use --report-to none",
                       field="report_to")


def weights_dtype(cfg: Any, trainable: bool, lora: bool) -> Any:
    """The dtype a model is loaded in: fp32 for weights the optimizer updates (full
    fine-tuning keeps fp32 masters), `cfg.dtype` for frozen ones (a reference, a reward
    model, a LoRA base)."""
    import torch

    return torch.float32 if trainable and not lora else resolve_dtype(cfg.dtype)


def quantization(cfg: Any) -> Any:
    """The bitsandbytes 4-bit (NF4, double quantised) config of a QLoRA base, or None."""
    if not getattr(cfg, "load_in_4bit", False):
        return None
    from transformers import BitsAndBytesConfig

    dtype = resolve_dtype(cfg.dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=dtype)


def load_model(path: str | Path, cfg: Any, *, trainable: bool, lora: bool = False,
               head: str = "causal", **kwargs: Any) -> Any:
    """A model for training from a local folder, safely, in the dtype `weights_dtype` gives.

    `head`: "causal" (a policy or reference) or "score" (a one-logit preference model);
    the trainable base of a LoRA run is 4-bit when `cfg.load_in_4bit`. Extra `kwargs` go to
    `from_pretrained`.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from cai.backends.hf import load_pretrained

    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    q = quantization(cfg) if trainable and lora else None
    if q is not None:
        kwargs["quantization_config"] = q
        kwargs.setdefault("device_map", {"": _local_device()})
    with sharded_loading(trainable):
        return load_pretrained(auto, path, dtype=weights_dtype(cfg, trainable, lora), **kwargs)


@contextlib.contextmanager
def sharded_loading(trainable: bool) -> Iterator[None]:
    """Under `accelerate launch` (several processes) the process group exists before a
    model is loaded, so transformers takes the sharding engine's path: under FSDP with
    `fsdp_cpu_ram_efficient_loading` only local process 0 reads the trained model's weights
    (the others hold placeholders until accelerate's prepare broadcasts the shards), under
    ZeRO-3 the registered DeepSpeed config partitions it as it loads. A frozen model is read
    by every process: `cai.train.placement` (and TRL) shard it afterwards from what each
    process holds, so it must hold the real weights."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
    key, old = "FSDP_CPU_RAM_EFFICIENT_LOADING", os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    if not trainable:
        os.environ[key] = "false"
    try:
        yield
    finally:
        if not trainable:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def model_init_kwargs(cfg: Any, lora: bool) -> dict[str, Any]:
    """What TRL's RLOO/GRPO pass to `from_pretrained` when they load the policy from its
    path: the same safety checks and dtype as `load_model`."""
    dtype = weights_dtype(cfg, trainable=True, lora=lora)
    kw: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "use_safetensors": True,
                          "trust_remote_code": False}
    if lora and cfg.load_in_4bit:
        kw["quantization_config"] = quantization(cfg)
        kw["device_map"] = {"": _local_device()}
    return kw


def _local_device() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def prepare_for_training(model: Any, cfg: Any, lora: bool) -> Any:
    """Gradient checkpointing (non-reentrant) when asked for; with LoRA the input
    embeddings' outputs require grads, so a checkpointed segment whose only trainable
    weights are adapters still passes gradients back. A 4-bit base gets peft's k-bit
    preparation (norms in fp32, inputs requiring grads)."""
    gc = bool(getattr(cfg, "gradient_checkpointing", False))
    if getattr(cfg, "load_in_4bit", False) and lora:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        if lora:
            model.enable_input_require_grads()
    return model


def lora_config(cfg: Any, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> Any:
    """The peft `LoraConfig` every trainer uses: rank `cfg.lora_r`, scale `cfg.lora_alpha`,
    adapters on all linear layers. Dropout is `cfg.lora_dropout`; a config without that field
    (RL) gets none, since a policy-gradient ratio compares two forward passes of the same
    weights and dropout would make them differ. The preference model passes `SEQ_CLS` and
    `modules_to_save=["score"]`: its score head is new, so it is trained in full and saved."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=getattr(cfg, "lora_dropout", 0.0), target_modules="all-linear",
                      modules_to_save=modules_to_save)


def trainer_precision(cfg: Any) -> dict[str, bool]:
    """The Trainer's mixed-precision flags for `cfg.dtype` (fp32 weights, lower-precision
    compute); neither for fp32, so a CPU run under "auto" is unchanged."""
    import torch

    dtype = resolve_dtype(cfg.dtype)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def autocast(cfg: Any, device: Any) -> Any:
    """PPO's compute precision: autocast to `cfg.dtype` on the run's device, or nothing for
    fp32."""
    import torch

    dtype = resolve_dtype(cfg.dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def report_args(cfg: Any) -> dict[str, Any]:
    """The Trainer's `report_to` for `cfg.report_to`."""
    return {"report_to": [] if cfg.report_to == "none" else [cfg.report_to]}


@contextlib.contextmanager
def tensorboard_dir(out: Path | None) -> Iterator[None]:
    """While a Trainer is built, point its TensorBoard callback at OUT/tensorboard (it reads
    the folder from the environment when it is made)."""
    key = "TENSORBOARD_LOGGING_DIR"
    old = os.environ.get(key)
    if out is not None:
        os.environ[key] = str(Path(out) / TENSORBOARD)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


class StepMirror:
    """PPO's per-step log mirrored to TensorBoard or W&B (the Trainers do this themselves):
    every number of a log.jsonl line becomes a scalar at its step."""

    def __init__(self, report_to: str, out: Path, config: dict[str, Any] | None = None):
        self.tool = report_to
        self.writer: Any = None
        self.run: Any = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(out) / TENSORBOARD))
        elif report_to == "wandb":
            import wandb

            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cai"),
                                  dir=str(out), config=config or {}, reinit=True)

    def log(self, entry: dict[str, Any]) -> None:
        step = int(entry.get("step", 0))
        scalars = {k: float(v) for k, v in entry.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        if self.run is not None:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()


__all__ = ["HardwareConfig", "DTYPES", "REPORT_TO", "TENSORBOARD", "resolve_dtype",
           "check_run_options", "precision_record", "weights_dtype", "quantization", "load_model",
           "model_init_kwargs", "prepare_for_training", "trainer_precision", "autocast",
           "report_args", "tensorboard_dir", "StepMirror", "sharded_loading"]
