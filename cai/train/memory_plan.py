"""`cai plan memory`: what one training process holds, worked out from the same rules the
loader (`cai.train.loading`) and the trainers follow, before anything is loaded.

A model's shape comes from its config.json alone: the model is built on the meta device
(no weights read), its parameters counted, and the linear layers LoRA would adapt listed.
Per process the plan then counts, in bytes:

- policy: trained weights in fp32 (full fine-tuning keeps fp32 masters), or a LoRA base
  in `dtype` (4-bit: NF4 linear weights at 4.127 bits a parameter with double
  quantisation, the rest upcast to fp32 by peft's k-bit preparation) plus fp32 adapters;
- gradients (fp32, one per trained weight) and AdamW state (two fp32 moments);
- autocast weight copies: mixed precision casts each fp32 weight to `dtype` once per
  forward and keeps the copy until the backward is done;
- value head (PPO), reference (PPO always; DPO and RLOO/GRPO without LoRA, where LoRA's
  reference is the base with the adapter off) and reward model (`pm:`), in `dtype`;
- the vLLM engine's share of the device (`vllm_gpu_memory_utilization`);
- activations, an estimate stated in `ACTIVATIONS`.

Under FSDP or ZeRO-3 every sharded tensor (weights, gradients, optimizer state, frozen
models) is divided by the number of processes; under DDP each process holds it whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.reward_spec import model_of, reward_kind

STAGES = ("sft", "pm", "dpo", "rl")
SHARDING = ("none", "fsdp", "zero3")
NF4_BYTES = 4.127 / 8
"""Bytes a 4-bit NF4 weight takes with double quantisation (one fp8 absmax per 64 weights,
their fp32 scale per 256 blocks)."""
ACTIVATIONS = (
    "activations per token and decoder layer, kept for the backward: the layer input and "
    "both norms' inputs and outputs (6 x hidden), q, k, v before and after RoPE "
    "(2 x (hidden + 2 x kv)), the attention output (2 x hidden), the MLP's gate, up, "
    "activation and product (4 x intermediate), at the compute dtype's size; with "
    "gradient checkpointing only each layer's input plus one layer recomputed at a time; "
    "plus the logits of the scored tokens in fp32 three times (logits, log-softmax, their "
    "gradient)")


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model, read from its config."""

    params: int
    """Parameters (tied ones once)."""
    linear: int
    """Parameters in the linear layers LoRA's "all-linear" targets (and 4-bit quantises)."""
    lora_per_rank: int
    """LoRA parameters per unit of rank: the sum of in + out features of those layers."""
    hidden: int
    layers: int
    intermediate: int
    kv: int
    """Key/value width (kv heads x head size)."""
    vocab: int


def model_folder(spec: str) -> Path:
    """The folder of a model or reward spec (a folder, `pm:`/`hf:` folder, or model spec)."""
    from cai.core.models import local_path

    spec = model_of(spec).removeprefix("hf:")
    p = Path(spec).expanduser()
    if (p / "config.json").is_file():
        return p
    return local_path(spec)


def shape_of(folder: str | Path, head: str = "causal") -> Shape:
    """The shape of the model whose config.json is in `folder`, built on the meta device."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CaiError(f"cannot read the model config: {str(exc).splitlines()[0][:200]}",
                       str(folder), "model") from None
    if head == "score":
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    out_names = {"lm_head", "score"}
    linear = per_rank = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in out_names:
            linear += m.weight.numel()
            per_rank += m.in_features + m.out_features
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    return Shape(params, linear, per_rank, text.hidden_size, text.num_hidden_layers,
                 getattr(text, "intermediate_size", 4 * text.hidden_size), kv, text.vocab_size)


def dtype_bytes(dtype: Any) -> int:
    return 4 if str(dtype).endswith("float32") else 2


@dataclass
class Setting:
    """How the run is laid out; what the trainer config does not say."""

    processes: int = 1
    sharding: str = "none"
    seq_len: int | None = None
    """Tokens per sequence (default: the config's max_length; RL: 512 + max_new_tokens)."""
    device_memory_gb: float = 80.0
    """Device memory (for the vLLM engine's share)."""


def activation_bytes(s: Shape, tokens: int, scored: int, compute: int, ckpt: bool) -> int:
    """`ACTIVATIONS` for `tokens` tokens through the trunk, `scored` of them through the
    output layer, at `compute` bytes a value."""
    per_layer = (6 * s.hidden + 2 * (s.hidden + 2 * s.kv) + 2 * s.hidden + 4 * s.intermediate)
    trunk = (s.layers * s.hidden + per_layer) if ckpt else s.layers * per_layer
    return tokens * trunk * compute + scored * s.vocab * 4 * 3


def plan_memory(stage: str, cfg: Any, setting: Setting | None = None) -> dict[str, Any]:
    """Bytes per process of each part of a `stage` run under `cfg` (a trainer config)."""
    from cai.train.loading import resolve_dtype

    st = setting or Setting()
    if stage not in STAGES:
        raise CaiError(f"must be one of {STAGES}", field="stage")
    if st.sharding not in SHARDING:
        raise CaiError(f"must be one of {SHARDING}", field="sharding")
    if st.processes < 1:
        raise CaiError("must be at least 1", field="processes")
    dtype = resolve_dtype(cfg.dtype)
    frozen_b = dtype_bytes(dtype)
    n = st.processes if st.sharding != "none" else 1
    lora, four = bool(cfg.lora), bool(cfg.load_in_4bit) and bool(cfg.lora)
    ckpt = bool(cfg.gradient_checkpointing)
    head = "score" if stage == "pm" else "causal"
    shape = shape_of(model_folder(cfg.model), head)
    rows: dict[str, float] = {}
    if lora:
        trained = cfg.lora_r * shape.lora_per_rank + (shape.hidden + 1 if stage == "pm" else 0)
        base = (shape.linear * NF4_BYTES + (shape.params - shape.linear) * 4 if four
                else shape.params * frozen_b)
        rows["policy"] = base / n + trained * 4 / n
        autocast_copies = 0.0
    else:
        trained = shape.params
        rows["policy"] = trained * 4 / n
        autocast_copies = trained * frozen_b / n if frozen_b < 4 else 0.0
    rows["gradients"] = trained * 4 / n
    rows["optimizer"] = trained * 8 / n
    rows["autocast_copies"] = autocast_copies
    algo = getattr(cfg, "algo", None)
    if stage == "rl" and algo == "ppo":
        rows["value_head"] = (shape.hidden + 1) * 16
    if (stage == "rl" and (algo == "ppo" or not lora)) or (stage == "dpo" and not lora):
        rows["reference"] = shape.params * frozen_b / n
    reward = getattr(cfg, "reward", "") or ""
    if stage == "rl" and reward_kind(reward) == "pm":
        rows["reward"] = shape_of(model_folder(reward), "score").params * frozen_b / n
    if stage == "rl" and getattr(cfg, "rollout_engine", "hf") == "vllm":
        rows["vllm_engine"] = cfg.vllm_gpu_memory_utilization * st.device_memory_gb * 2**30
    seq, seqs, scored = _tokens(stage, cfg, st)
    compute = frozen_b if dtype_bytes(dtype) < 4 else 4
    rows["activations"] = activation_bytes(shape, seqs * seq, scored, compute, ckpt)
    total = sum(rows.values())
    return {"stage": stage, "algo": algo, "dtype": str(dtype).removeprefix("torch."),
            "lora": lora, "load_in_4bit": four, "gradient_checkpointing": ckpt,
            "processes": st.processes, "sharding": st.sharding, "sequences": seqs,
            "seq_len": seq, "params": shape.params, "trained_params": trained,
            "bytes": {k: int(v) for k, v in rows.items()}, "total_bytes": int(total),
            "activation_estimate": ACTIVATIONS}


def _tokens(stage: str, cfg: Any, st: Setting) -> tuple[int, int, int]:
    """(tokens per sequence, sequences per forward on one process, tokens scored by the
    output layer)."""
    if stage == "rl":
        seq = st.seq_len or 512 + cfg.max_new_tokens
        if cfg.algo == "ppo":
            seqs = max(1, cfg.minibatch_size // st.processes)
            return seq, seqs, seqs * (cfg.max_new_tokens + 1)  # logits_to_keep
        return seq, cfg.batch_size, cfg.batch_size * seq
    seq = st.seq_len or cfg.max_length
    seqs = cfg.batch_size * (1 if stage == "sft" else 2)  # pm and dpo: chosen + rejected
    scored = 0 if stage == "pm" else seqs * seq  # the PM reads one score per sequence
    return seq, seqs, scored


def render(plan: dict[str, Any]) -> str:
    """The plan as lines of text (GiB per process)."""
    gib = 2**30
    head = (f"{plan['stage']}{' ' + plan['algo'] if plan['algo'] else ''}: {plan['dtype']}, "
            f"{'LoRA' if plan['lora'] else 'full'}{' 4-bit' if plan['load_in_4bit'] else ''}, "
            f"checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}, "
            f"{plan['processes']} process(es), sharding {plan['sharding']}; "
            f"{plan['params'] / 1e9:.3f} B parameters, {plan['trained_params'] / 1e6:.2f} M trained; "
            f"{plan['sequences']} x {plan['seq_len']} tokens per forward")
    lines = [head, "per process:"]
    for k, v in plan["bytes"].items():
        if v:
            lines.append(f"  {k:<16} {v / gib:9.2f} GiB")
    lines.append(f"  {'total':<16} {plan['total_bytes'] / gib:9.2f} GiB")
    lines.append(f"({plan['activation_estimate']})")
    return "\n".join(lines)


def plan_from_file(stage: str, path: str | Path, setting: Setting,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan a trainer config file (the YAML `cai train STAGE --config` reads)."""
    from cai.core.config import load_yaml_config
    from cai.core.stage import load_registry

    if stage not in STAGES:
        raise CaiError(f"must be one of {STAGES}", field="stage")
    cls = load_registry()[stage].config
    cfg = load_yaml_config(cls, path, overrides=overrides)
    return plan_memory(stage, cfg, setting)


def as_json(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=2)


__all__ = ["Shape", "Setting", "shape_of", "model_folder", "plan_memory", "plan_from_file",
           "render", "activation_bytes", "ACTIVATIONS", "STAGES", "SHARDING", "as_json"]
