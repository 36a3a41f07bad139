"""Shared fixtures: a tiny random Llama with the embedded model's tokenizer, and paths."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ROOT / "constitutions" / "minimal.yaml"
HARMLESS = ROOT / "constitutions" / "harmless.yaml"


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread on a shared two-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from cai.core.models import local_path

    return local_path("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model(embedded_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer randomly initialised Llama that uses the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(embedded_path))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def vllm_llama(embedded_path: Path, out: Path, seed: int) -> Path:
    """A 2-layer random Llama with head size 32 (vLLM's CPU attention has no size-8 kernel),
    drawn from `seed`, saved with the embedded model's tokenizer in `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(embedded_path))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def vllm_tiny(embedded_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`vllm_llama` from seed 0, once per session."""
    return vllm_llama(embedded_path, tmp_path_factory.mktemp("vllm-tiny"), 0)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model: Path):
    from cai.backends.hf import HFBackend, HFOptions

    return HFBackend(f"hf:{tiny_model}", tiny_model, HFOptions(progress=False))
