"""Backends behind one protocol (`Backend`); `load_backend(spec)` picks one from a model spec."""

from __future__ import annotations

from cai.backends.base import (
    Backend,
    Chat,
    Generation,
    GenerationConfig,
    GenRequest,
    ScoreRequest,
    ScoreResult,
)
from cai.errors import CaiError

__all__ = ["Backend", "Chat", "Generation", "GenerationConfig", "GenRequest", "ScoreRequest",
           "ScoreResult", "load_backend"]

_CACHE: dict[str, Backend] = {}


def load_backend(spec: str, reuse: bool = True) -> Backend:
    """Build (or reuse) the backend a model spec names.

    Reuse matters: a pipeline that uses one model as policy and judge loads it once.
    """
    from cai.models import parse_spec

    if reuse and spec in _CACHE:
        return _CACHE[spec]
    parsed = parse_spec(spec)
    if parsed.backend == "hf":
        from cai.backends.hf import HFBackend

        backend: Backend = HFBackend(spec)
    elif parsed.backend == "vllm":
        from cai.backends.vllm import VLLMBackend

        backend = VLLMBackend(spec)
    elif parsed.backend == "openai":
        from cai.backends.openai import OpenAIBackend

        backend = OpenAIBackend(spec)
    else:  # parse_spec only returns known backends
        raise CaiError(f"unknown backend {parsed.backend!r}", field="model")
    if reuse:
        _CACHE[spec] = backend
    return backend
