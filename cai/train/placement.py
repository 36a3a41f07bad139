"""Where PPO's frozen models live when it runs on several processes.

PPO holds two models it never trains: the reference (the KL anchor) and, for a `pm:`
reward, the preference model. Under DDP each process keeps a whole copy of both. Under the
sharded configs that would defeat the point: a 70B policy is sharded to fit, then two more
70B models land whole on every GPU. So the frozen models follow the accelerate config:

- FSDP (`fsdp.yaml`): sharded with torch's `fully_shard`, one unit per decoder layer so a
  forward gathers one layer at a time; with `fsdp_offload_params: true` the shards live in
  CPU memory and each layer is copied in for its forward. No optimizer, no gradients.
- DeepSpeed ZeRO-3 (`zero3.yaml`): wrapped in an inference-only DeepSpeed engine whose
  config is the training one minus the optimizer parts, still stage 3, with the same
  `offload_param` device (TRL and OpenRLHF treat their reference models the same way).
- DDP, ZeRO-0/1/2 or one process: whole on the process's device, as before.

Sharded models need every process to run the same number of forwards; PPO's rollout gives
each process an equal share and scores it in the same number of batches, so they do.

The choice is a pure function (`plan`) of what the config says (`read_parallelism`), so it
is tested without a GPU. Accelerate turns an FSDP config into plain CPU data parallelism
when there is no GPU (`use_cpu`); torch's `fully_shard` runs over gloo on the CPU all the
same, so the FSDP frozen-model path is read from the launcher's environment and runs here.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

Placement = Literal["whole", "shard", "offload"]
"""whole: a full copy on each process; shard: split across the processes; offload: split
and kept in CPU memory between forwards."""


@dataclass(frozen=True)
class Parallelism:
    """What an accelerate config says about sharding, as far as frozen models care."""

    processes: int = 1
    """Processes in the run (1 without `accelerate launch`)."""
    sharding: Literal["none", "fsdp", "zero3"] = "none"
    """Which parameter-sharding scheme the config asks for."""
    offload: bool = False
    """The config keeps sharded parameters in CPU memory (`fsdp_offload_params: true`, or
    ZeRO-3 `offload_param_device: cpu|nvme`)."""
    deepspeed_config: dict[str, Any] = field(default_factory=dict)
    """The training DeepSpeed config (ZeRO-3 only): the frozen models' engine config
    derives from it."""


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def read_parallelism(accelerator: Any, env: Mapping[str, str] | None = None) -> Parallelism:
    """The sharding the running accelerate config asks for (see `parallelism_of`)."""
    if accelerator is None:
        return Parallelism()
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    ds = plugin.deepspeed_config if kind == "DEEPSPEED" and plugin is not None else None
    return parallelism_of(accelerator.num_processes, os.environ if env is None else env, ds)


def parallelism_of(processes: int, env: Mapping[str, str],
                   deepspeed_config: Mapping[str, Any] | None = None) -> Parallelism:
    """The sharding asked for by a run of `processes` processes.

    FSDP is read from the variables `accelerate launch` exports from the config
    (ACCELERATE_USE_FSDP, FSDP_OFFLOAD_PARAMS): accelerate's own state says "multi-CPU" for
    an FSDP config on a machine without a GPU, but the frozen models can be sharded there
    too. ZeRO-3 is read from `deepspeed_config`, the config of accelerate's DeepSpeed state
    (None when there is none: accelerate makes one only where DeepSpeed runs)."""
    if processes <= 1:
        return Parallelism()
    if _true(env.get("ACCELERATE_USE_FSDP")):
        return Parallelism(processes, "fsdp", _true(env.get("FSDP_OFFLOAD_PARAMS")))
    zero = (deepspeed_config or {}).get("zero_optimization", {})
    if str(zero.get("stage")) == "3":
        device = str(zero.get("offload_param", {}).get("device", "none")).lower()
        return Parallelism(processes, "zero3", device in ("cpu", "nvme"), dict(deepspeed_config))
    return Parallelism(processes)


def plan(p: Parallelism) -> Placement:
    """Where a frozen model goes under `p`: split when the config splits the policy,
    offloaded when it offloads the policy's parameters, else whole."""
    if p.processes <= 1 or p.sharding == "none":
        return "whole"
    return "offload" if p.offload else "shard"


def zero3_inference_config(train: Mapping[str, Any], hidden_size: int | None,
                           micro_batch: int = 1) -> dict[str, Any]:
    """An inference-only DeepSpeed config for a frozen model, from the training one.

    Dropped: the optimizer, scheduler and optimizer offload (there is nothing to optimize;
    DeepSpeed would build them otherwise) and every "auto" left over (accelerate fills those
    only for the model it prepares). Kept: stage 3, `offload_param`, precision. Bucket sizes
    follow the hidden size, so small layers are not re-gathered piecemeal."""
    cfg = _drop_auto(copy.deepcopy(dict(train)))
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    if hidden_size:
        zero.update(reduce_bucket_size=hidden_size * hidden_size,
                    stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
                    stage3_param_persistence_threshold=10 * hidden_size)
    return cfg


def _drop_auto(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}


def deepspeed_micro_batch(accelerator: Any, micro_batch: int) -> None:
    """Give DeepSpeed PPO's per-process minibatch where the config says "auto": accelerate
    reads it from a dataloader, and PPO hands it none."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is not None:
        fill_micro_batch(plugin.deepspeed_config, micro_batch)


def fill_micro_batch(ds_config: dict[str, Any], micro_batch: int) -> None:
    """Set `train_micro_batch_size_per_gpu` where it is missing or "auto"; keep a number."""
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch


# --------------------------------------------------------------------------- applying it


def _layer_classes(model: nn.Module) -> set[str]:
    """The classes transformers never splits across devices: its decoder layers."""
    return set(getattr(model, "_no_split_modules", None) or ())


def _fully_shard(model: nn.Module, offload: bool) -> nn.Module:
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    layers = _layer_classes(model)
    for module in model.modules():  # inner units first, then the root takes the rest
        if module is not model and type(module).__name__ in layers:
            fully_shard(module, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    return model


def _zero3(model: nn.Module, p: Parallelism) -> nn.Module:
    import deepspeed

    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    engine, *_ = deepspeed.initialize(model=model,
                                      config=zero3_inference_config(p.deepspeed_config, hidden))
    engine.eval()  # the engine's eval() returns None, not the engine
    return engine


def place(model: nn.Module, where: Placement, p: Parallelism, device: Any) -> nn.Module:
    """Put one frozen model where `plan` said; returns what to call in its place."""
    model = model.eval().requires_grad_(False)
    if where == "whole":
        return model.to(device)
    if p.sharding == "fsdp":
        return _fully_shard(model, offload=where == "offload")
    return _zero3(model, p)


def local_fraction(model: nn.Module) -> float:
    """The share of a model's parameters this process holds (1.0 when whole)."""
    total = here = 0
    for t in model.parameters():
        if hasattr(t, "ds_numel"):  # a ZeRO-3 partition: the full size and this process's
            total, here = total + t.ds_numel, here + t.ds_tensor.numel()
        else:  # an FSDP DTensor (its local shard), or a whole tensor
            total += t.numel()
            here += t.to_local().numel() if hasattr(t, "to_local") else t.numel()
    return here / max(total, 1)


def place_frozen(reference: nn.Module, reward: Any, accelerator: Any, device: Any
                 ) -> tuple[nn.Module, dict[str, str]]:
    """Place the reference and (a preference model's) reward model as the accelerate config
    says; returns the placed reference and what was done to each, which process 0 prints
    when there are several processes. Other rewards (a judge, a Python function) hold no
    torch model here and are left as they are."""
    p = read_parallelism(accelerator)
    where = plan(p)
    done = {}
    reference = place(reference, where, p, device)
    done["reference"] = where
    if isinstance(getattr(reward, "model", None), nn.Module):
        reward.model = place(reward.model, where, p, device)
        done["reward"] = where
    if p.processes > 1 and accelerator.is_main_process:
        how = {"fsdp": "torch fully_shard", "zero3": "DeepSpeed ZeRO-3"}.get(p.sharding, "")
        parts = [f"{name} {w}" + (f" ({how}; {local_fraction(m):.0%} of its parameters on "
                                  "this process)" if w != "whole" else "")
                 for (name, w), m in zip(done.items(), (reference, getattr(reward, "model", None)))]
        print(f"[cai] PPO frozen models over {p.processes} processes: " + ", ".join(parts),
              file=sys.stderr)
    return reference, done


__all__ = ["Parallelism", "Placement", "read_parallelism", "parallelism_of", "plan", "zero3_inference_config",
           "deepspeed_micro_batch", "fill_micro_batch", "place", "place_frozen", "local_fraction"]
