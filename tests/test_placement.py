"""Where PPO's frozen reference and reward model go under each accelerate config.

The FSDP path runs for real in tests/test_accelerate.py (2 CPU processes, shard and
offload); DeepSpeed is not installed here, so the ZeRO-3 decision and the inference config
it derives are checked as the pure functions they are."""

from __future__ import annotations

import copy

import pytest

from cai.train.placement import (
    Parallelism,
    fill_micro_batch,
    local_fraction,
    parallelism_of,
    place_frozen,
    plan,
    zero3_inference_config,
)

FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "false"}
FSDP_OFFLOAD = {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}


def _zero(stage: int, offload_param: str = "none") -> dict:
    """A DeepSpeed config as accelerate builds it from zero2.yaml / zero3.yaml."""
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
            "zero_optimization": {"stage": stage, "offload_param": {"device": offload_param},
                                  "offload_optimizer": {"device": "cpu"},
                                  "stage3_gather_16bit_weights_on_model_save": True,
                                  "reduce_bucket_size": "auto"}}


@pytest.mark.parametrize("processes, env, ds, expected", [
    (1, {}, None, "whole"),                        # no accelerate launch
    (1, FSDP, None, "whole"),                      # one process: nothing to split over
    (2, {}, None, "whole"),                        # DDP (cpu2.yaml, ddp.yaml)
    (2, {"ACCELERATE_USE_FSDP": "false"}, None, "whole"),
    (2, FSDP, None, "shard"),                      # fsdp.yaml
    (2, FSDP_OFFLOAD, None, "offload"),            # fsdp.yaml with fsdp_offload_params: true
    (2, {}, _zero(2), "whole"),                    # zero2.yaml keeps whole weights
    (2, {}, _zero(2, "cpu"), "whole"),             # ZeRO-2 never offloads parameters
    (2, {}, _zero(3), "shard"),                    # zero3.yaml
    (2, {}, _zero(3, "cpu"), "offload"),           # zero3.yaml with offload_param_device: cpu
    (2, {}, _zero(3, "nvme"), "offload"),
    (8, {}, _zero(3, "none"), "shard"),
])
def test_plan_follows_the_accelerate_config(processes, env, ds, expected) -> None:
    p = parallelism_of(processes, env, ds)
    assert plan(p) == expected
    if expected != "whole":
        assert p.processes == processes
        assert p.sharding == ("zero3" if ds else "fsdp")
        assert p.offload is (expected == "offload")


def test_zero3_inference_config_drops_training_parts_and_autos() -> None:
    train = _zero(3, "cpu")
    before = copy.deepcopy(train)
    cfg = zero3_inference_config(train, hidden_size=4096, micro_batch=2)
    assert train == before  # the training config is untouched

    def autos(d: dict) -> list[str]:
        return [k for k, v in d.items() if v == "auto" or (isinstance(v, dict) and autos(v))]

    assert autos(cfg) == []
    assert "optimizer" not in cfg and "train_batch_size" not in cfg
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"] == {"device": "cpu"}
    assert "offload_optimizer" not in zero
    assert zero["reduce_bucket_size"] == 4096 ** 2
    assert zero["stage3_param_persistence_threshold"] == 40960
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["bf16"] == {"enabled": True}
    # Without a hidden size the bucket sizes are left to DeepSpeed's defaults.
    assert "reduce_bucket_size" not in zero3_inference_config(_zero(3), None)["zero_optimization"]


def test_fill_micro_batch_only_where_auto() -> None:
    auto, unset, fixed = {"train_micro_batch_size_per_gpu": "auto"}, {}, {
        "train_micro_batch_size_per_gpu": 4}
    for d in (auto, unset, fixed):
        fill_micro_batch(d, 2)
    assert auto["train_micro_batch_size_per_gpu"] == 2
    assert unset["train_micro_batch_size_per_gpu"] == 2
    assert fixed["train_micro_batch_size_per_gpu"] == 4


def test_one_process_keeps_frozen_models_whole_and_quiet(tiny_model, capsys) -> None:
    """Without accelerate the reference and a PM reward stay whole on the device, frozen, and
    nothing is printed; a Python reward holds no model and is not touched."""
    import torch
    from transformers import AutoModelForCausalLM

    from cai.train.rewards import PMReward, PythonReward

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    pm = PMReward(_pm_folder(tiny_model), device="cpu")
    placed, done = place_frozen(ref, pm, None, torch.device("cpu"))
    assert done == {"reference": "whole", "reward": "whole"}
    assert placed is ref and not any(t.requires_grad for t in placed.parameters())
    assert local_fraction(placed) == 1.0 and local_fraction(pm.model) == 1.0
    reward = PythonReward("python:tests/test_placement.py:length_reward")
    _, done = place_frozen(ref, reward, None, torch.device("cpu"))
    assert done == {"reference": "whole"}
    assert "frozen models" not in capsys.readouterr().err
    assert plan(Parallelism()) == "whole"


def length_reward(prompt: str, response: str) -> float:
    return float(len(response))


def _pm_folder(tiny_model):
    """A one-logit sequence classifier saved from the tiny model (cached beside it)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tiny_model.parent / "tiny-pm"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=1)
        m.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(out))
    return out
