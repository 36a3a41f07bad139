"""Backends behind one protocol (`Backend`); `load_backend(spec)` picks one from a model spec.

The spec is resolved once here (`cai.core.models.resolve_spec`) and the backend is built from
the resolved spec, so no backend parses it again. The package's face also holds what every
stage uses beside a backend: the request and result types, and the policy for inputs too
long for a model (`Overlong`, `fit_texts`).
"""

from __future__ import annotations

from typing import Any

from cai.backends.base import (
    OVERLONG_MODES,
    Backend,
    Chat,
    Generation,
    GenerationConfig,
    GenRequest,
    JudgeQuestion,
    Overlong,
    ScoreRequest,
    ScoreResult,
    context_of,
    fit_texts,
)
from cai.core import usage
from cai.core.errors import CaiError
from cai.core.models import ModelSpec, ResolvedSpec, resolve_spec

__all__ = ["Backend", "Chat", "Generation", "GenerationConfig", "GenRequest", "JudgeQuestion",
           "ScoreRequest", "ScoreResult", "OVERLONG_MODES", "Overlong", "context_of", "fit_texts",
           "ReplicaTask", "backend_class", "load_backend", "load_resolved", "release",
           "cached_specs"]

_CACHE: dict[str, Backend] = {}
CACHE_SIZE = 1
"""Backends kept loaded at once. A stage that moves from the policy to the judge releases
the policy first, so policy, reference, judge and reward model never pile up in memory."""


def load_backend(spec: str | ModelSpec, reuse: bool = True) -> Backend:
    """Build (or reuse) the backend a model spec names.

    Reuse matters: a pipeline that uses one model as policy and judge loads it once. The
    cache holds `CACHE_SIZE` models; loading another evicts the oldest.
    """
    return load_resolved(resolve_spec(spec), reuse)


def load_resolved(resolved: ResolvedSpec, reuse: bool = True) -> Backend:
    """`load_backend` for a spec already resolved: a stage that resolved its models up
    front hands them on, and the spec is not looked at again."""
    key = resolved.raw
    if reuse and key in _CACHE:
        return _CACHE[key]
    if reuse:
        while len(_CACHE) >= CACHE_SIZE:
            release(next(iter(_CACHE)))
    backend: Backend = backend_class(resolved.backend)(resolved)
    usage.set_price(backend.identity, usage.parse_price(resolved.options))
    if reuse:
        _CACHE[key] = backend
    return backend


def backend_class(kind: str) -> type:
    """The class that runs one kind of backend, built from a resolved spec. Each is imported
    only when asked for, so `import cai.backends` loads neither torch nor vLLM."""
    if kind == "hf":
        from cai.backends.hf import HFBackend

        return HFBackend
    if kind == "vllm":
        from cai.backends.vllm import VLLMBackend

        return VLLMBackend
    if kind == "openai":
        from cai.backends.openai import OpenAIBackend

        return OpenAIBackend
    if kind == "python":
        from cai.backends.pyfunc import PythonJudge

        return PythonJudge
    raise CaiError(f"unknown backend {kind!r}", field="model")  # a spec parses to known kinds only


def release(spec: str | None = None) -> None:
    """Drop a cached backend (or all of them) and free its memory."""
    import gc

    for key in [spec] if spec is not None else list(_CACHE):
        _CACHE.pop(key, None)
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def cached_specs() -> list[str]:
    return list(_CACHE)



class ReplicaTask:
    """Base of the chunk tasks that hold a model: `backend` is left out when the task is
    pickled, so each Ray actor loads its own replica (of `model_spec()`) on its first
    chunk, while a local run keeps the one it was given or loads it once."""

    backend: Any

    def model_spec(self) -> str:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "backend": None}

    def replica(self) -> Any:
        if self.backend is None:
            self.backend = load_backend(self.model_spec())
        return self.backend
