"""Every TRL-based trainer runs under `accelerate launch` with a shipped config (one CPU
process here; the same command with configs/accelerate/ddp|fsdp|zero2|zero3.yaml on GPUs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def _prefs(path: Path) -> Path:
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"A kind answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"A rude answer {i}!"}],
             "p_chosen": 0.8} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("stage, extra", [
    ("sft", ["--data", "{sft}"]),
    ("pm", ["--preferences", "{prefs}", "--eval-fraction", "0.34"]),
    ("dpo", ["--preferences", "{prefs}", "--eval-fraction", "0.34"]),
])
def test_trainer_under_accelerate_launch(tmp_path, tiny_model, stage, extra) -> None:
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                    {"role": "assistant", "content": "hello there"}]})
                           + "\n" for i in range(4)))
    prefs = _prefs(tmp_path / "prefs.jsonl")
    out = tmp_path / stage
    args = [ACCELERATE, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu.yaml"),
            "-m", "cai.cli", "train", stage, "--model", str(tiny_model), "--out", str(out),
            "--max-steps", "2", "--batch-size", "2",
            *[a.format(sft=sft, prefs=prefs) for a in extra]]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == stage and (out / "model.safetensors").exists()


# --------------------------------------------------------------------------- PPO, 2 processes


@pytest.fixture(scope="module")
def pm_and_prompts(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random one-logit preference model with the policy's tokenizer, and 8 prompts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("ppo-dp")
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(cfg).save_pretrained(str(root / "pm"))
    tok.save_pretrained(str(root / "pm"))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question number {i}: why {i}?"}) + "\n"
                               for i in range(8)))
    return root / "pm", prompts


def _ppo_args(model: Path, pm: Path, prompts: Path, out: Path, steps: int) -> list[str]:
    return ["train", "rl", "--algo", "ppo", "--model", str(model), "--reward", f"pm:{pm}",
            "--prompts", str(prompts), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "2",
            "--max-new-tokens", "8", "--learning-rate", "1e-3", "--lora-r", "4",
            "--lora-alpha", "8", "--save-every", "1"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _log(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]


def _launch(config: str, *extra: str) -> list[str]:
    return [ACCELERATE, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / config),
            *extra, "-m", "cai.cli"]


@pytest.fixture(scope="module")
def one_process_run(tiny_model, pm_and_prompts, tmp_path_factory) -> Path:
    """Three PPO steps in one plain process: what every multi-process run must reproduce."""
    tiny_pm, prompts_file = pm_and_prompts
    one = tmp_path_factory.mktemp("ppo-one") / "run"
    r = subprocess.run([sys.executable, "-m", "cai.cli",
                        *_ppo_args(tiny_model, tiny_pm, prompts_file, one, 3)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return one


def _assert_same_run(two: Path, one: Path, start: Path) -> None:
    """The same samples, statistics (within float round-off) and trained weights."""
    assert [x["step"] for x in _log(two)] == [1, 2, 3]
    for a, b in zip(_log(two), _log(one), strict=True):
        assert a["response_length"] == b["response_length"]  # the same samples
        for key in ("reward_mean", "kl", "entropy", "policy_loss", "value_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-4, rel=1e-3), key
    w2, w1 = _weights(two), _weights(one)
    assert w2.keys() == w1.keys()
    moved = max((w1[k] - _weights(start)[k]).abs().max().item() for k in w1)
    diff = max((w2[k] - w1[k]).abs().max().item() for k in w1)
    assert moved > 1e-3  # training changed the weights...
    assert diff < 1e-5 + moved * 1e-2, (diff, moved)  # ...and both runs changed them alike


@pytest.mark.slow
def test_ppo_accelerate_two_processes_match_one(tmp_path, tiny_model, pm_and_prompts,
                                                one_process_run) -> None:
    """`accelerate launch` with 2 processes (torchrun, gloo on the CPU), stopped after step 2
    and resumed to step 3, gives the samples, stats and weights of one process run straight."""
    tiny_pm, prompts_file = pm_and_prompts
    two = tmp_path / "two"
    for steps in (2, 3):
        r = subprocess.run(_launch("cpu2.yaml") + _ppo_args(tiny_model, tiny_pm, prompts_file,
                                                            two, steps),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "PPO frozen models over 2 processes: reference whole, reward whole" in r.stderr
    _assert_same_run(two, one_process_run, tiny_model)
    m = json.loads((two / "manifest.json").read_text())
    assert m["counts"]["steps"] == 3 and m["config"]["batch_size"] == 4
    assert m["rollout"]["engine"] == "hf" and "vllm" not in m["rollout"]


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["false", "true"])
def test_ppo_accelerate_fsdp_frozen_models_sharded_match_one(tmp_path, tiny_model, pm_and_prompts,
                                                             one_process_run, offload) -> None:
    """Under an FSDP config (2 CPU processes) the frozen reference and preference model are
    split between the processes (and offloaded when the launch line says so), and the run
    still matches one process. Accelerate trains the policy as plain data parallel here:
    it shards only on accelerators."""
    tiny_pm, prompts_file = pm_and_prompts
    two = tmp_path / "two"
    r = subprocess.run(_launch("cpu2-fsdp.yaml", "--fsdp_offload_params", offload)
                       + _ppo_args(tiny_model, tiny_pm, prompts_file, two, 3),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    where = "offload" if offload == "true" else "shard"
    line = next(x for x in r.stderr.splitlines() if "PPO frozen models" in x)
    for name in ("reference", "reward"):  # each process holds half of each frozen model
        assert f"{name} {where} (torch fully_shard; 50% of its parameters on this process)" in line
    _assert_same_run(two, one_process_run, tiny_model)


@pytest.mark.slow
def test_ppo_accelerate_fsdp_rank0_loading_matches_one(tmp_path, tiny_model, pm_and_prompts,
                                                       one_process_run) -> None:
    """With `fsdp_cpu_ram_efficient_loading` only process 0 reads the policy's weights (the
    other holds placeholders until accelerate's prepare broadcasts them), and the run still
    matches one process: nothing of the placeholders reaches training."""
    tiny_pm, prompts_file = pm_and_prompts
    two = tmp_path / "two"
    r = subprocess.run(_launch("cpu2-fsdp.yaml", "--fsdp_cpu_ram_efficient_loading", "true")
                       + _ppo_args(tiny_model, tiny_pm, prompts_file, two, 3),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(two, one_process_run, tiny_model)


@pytest.mark.slow
def test_ppo_accelerate_vllm_rollouts_two_processes_match_one(tmp_path, embedded_path,
                                                              pm_and_prompts) -> None:
    """One colocated vLLM engine per process (vLLM's external launcher in accelerate's
    process group), each sampling its share: the same samples and stats as one process."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(embedded_path))
    torch.manual_seed(0)
    model = tmp_path / "model"  # head size 32: vLLM's CPU attention has no size-8 kernel
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True)).save_pretrained(str(model))
    tok.save_pretrained(str(model))
    pm, prompts = pm_and_prompts
    extra = ["--rollout-engine", "vllm", "--ppo-epochs", "1"]
    two, one = tmp_path / "two", tmp_path / "one"
    r = subprocess.run([*_launch("cpu2.yaml"), *_ppo_args(model, pm, prompts, two, 2), *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "cai.cli", *_ppo_args(model, pm, prompts, one, 2),
                        *extra], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [[json.loads(x) for x in (f / "log.jsonl").read_text().splitlines()] for f in (two, one)]
    assert [x["step"] for x in rows[0]] == [1, 2]
    for a, b in zip(*rows, strict=True):
        assert a["rollout_logp_abs_diff"] < 1e-3  # each engine follows the policy
        for key in ("reward_mean", "kl", "entropy", "response_length", "policy_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-4, rel=1e-3), key
    assert rows[0][1]["kl"] != 0  # step 2 sampled from an updated policy
    rollout = json.loads((two / "manifest.json").read_text())["rollout"]
    assert rollout["engine"] == "vllm" and rollout["vllm"] and rollout["seed"] == 0
