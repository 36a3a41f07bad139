"""The memory and logging options every trainer shares (`cai.train.loading`): the dtype
models are held in, gradient checkpointing, the 4-bit refusal on a CPU, and TensorBoard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cai.core.errors import CaiError
from cai.train.loading import (
    HardwareConfig,
    check_run_options,
    load_model,
    prepare_for_training,
    resolve_dtype,
    trainer_precision,
)
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_pm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-logit sequence classifier with the policy's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      num_labels=1, pad_token_id=0)
    out = tmp_path_factory.mktemp("tiny-pm")
    LlamaForSequenceClassification(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sft-data") / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say the number {i}."},
                          {"role": "assistant", "content": f"The number is {i}, gladly."}]}
            for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


# --------------------------------------------------------------------------- dtype


def test_dtype_frozen_models_held_in_bf16_trained_weights_fp32(tiny_model: Path, tiny_pm: Path
                                                              ) -> None:
    from cai.train.pm import load_reward_model

    bf16, fp32 = HardwareConfig(dtype="bfloat16"), HardwareConfig(dtype="float32")
    assert _dtypes(load_model(tiny_model, bf16, trainable=False)) == {torch.bfloat16}
    assert _dtypes(load_model(tiny_model, bf16, trainable=True, lora=True)) == {torch.bfloat16}
    assert _dtypes(load_model(tiny_model, bf16, trainable=True)) == {torch.float32}  # masters
    assert _dtypes(load_model(tiny_model, fp32, trainable=False)) == {torch.float32}
    assert _dtypes(load_reward_model(tiny_pm, "bfloat16")[0]) == {torch.bfloat16}
    assert _dtypes(load_reward_model(tiny_pm)[0]) == {torch.float32}
    # "auto" on this CPU is fp32, and no mixed precision: CPU runs are what they were.
    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available()
                                     and torch.cuda.is_bf16_supported() else torch.float32)
    assert trainer_precision(bf16) == {"bf16": True, "fp16": False}
    assert trainer_precision(fp32) == {"bf16": False, "fp16": False}
    with pytest.raises(CaiError, match="dtype"):
        HardwareConfig(dtype="fp8").check_hardware()


def test_dtype_ppo_holds_reference_and_reward_in_bf16(tiny_model: Path, tiny_pm: Path,
                                                      tmp_path: Path) -> None:
    """PPO in bf16 with full weights: the policy (and value head) keep fp32 weights, the
    reference and the preference model are bf16, and a step runs under CPU autocast."""
    from transformers import AutoTokenizer

    from cai.train.ppo import PPOTrainer
    from cai.train.ppo_config import PPOConfig
    from cai.train.rewards import PMReward

    cfg = PPOConfig(dtype="bfloat16", batch_size=2, minibatch_size=2, ppo_epochs=1,
                    max_new_tokens=4, save_every=0)
    policy = load_model(tiny_model, cfg, trainable=True)
    reference = load_model(tiny_model, cfg, trainable=False)
    reward = PMReward(tiny_pm, dtype=cfg.dtype)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    trainer = PPOTrainer(policy, reference, tok, reward, [[{"role": "user", "content": "Hi"}]],
                         cfg, tmp_path)
    assert _dtypes(trainer.reference) == {torch.bfloat16}
    assert _dtypes(reward.model) == {torch.bfloat16}
    assert _dtypes(trainer.policy) == {torch.float32}
    assert _dtypes(trainer.value_head) == {torch.float32}
    stats = trainer.train(1)[0]
    assert all(torch.isfinite(torch.tensor(stats[k])) for k in ("policy_loss", "value_loss", "kl"))


def test_dtype_bf16_sft_loss_falls_on_cpu(tiny_model: Path, sft_file: Path, tmp_path: Path
                                          ) -> None:
    """Full fine-tuning in bf16 on the CPU (fp32 weights, bf16 autocast) learns, and the
    saved weights are the fp32 masters; the recorded config names the dtype."""
    from safetensors.torch import load_file

    from cai.train.sft import SFTConfig, run_sft

    out = tmp_path / "sft"
    m = run_sft(SFTConfig(data=str(sft_file), model=str(tiny_model), out=str(out), lora=False,
                          learning_rate=3e-3, max_steps=12, batch_size=4, dtype="bfloat16"))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-3:]) / 3
    assert last < first * 0.9, (first, last)
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    assert m["config"]["dtype"] == "bfloat16"
    assert m["precision"]["resolved"] == "bfloat16" and m["precision"]["trained_weights"] == "float32"
    # The dtype is part of the run's config: another one is refused on the same folder.
    with pytest.raises(CaiError, match="dtype"):
        run_sft(SFTConfig(data=str(sft_file), model=str(tiny_model), out=str(out), lora=False,
                          learning_rate=3e-3, max_steps=13, batch_size=4, dtype="float32"))


# --------------------------------------------------------------------------- checkpointing


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of the LM loss on `ids`, and how many times decoder layer 0's MLP ran
    (module hooks do not fire in a checkpoint's recompute, so its forward is wrapped)."""
    calls = []
    mlp = model.get_decoder().layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    del mlp.forward
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model: Path, lora: bool) -> None:
    """With and without checkpointing the gradients agree to float round-off (full weights
    and LoRA adapters), and with it each layer really runs twice (recomputed)."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    got = {}
    for gc in (False, True):
        cfg = HardwareConfig(dtype="float32", gradient_checkpointing=gc)
        model = prepare_for_training(load_model(tiny_model, cfg, trainable=True, lora=lora), cfg,
                                     lora)
        assert model.is_gradient_checkpointing is gc
        if lora:
            torch.manual_seed(0)
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
            with torch.no_grad():  # B starts at zero; give A a gradient too
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        got[gc] = _grads(model, ids)
    (plain, plain_calls), (ckpt, ckpt_calls) = got[False], got[True]
    assert (plain_calls, ckpt_calls) == (1, 2)
    assert plain.keys() == ckpt.keys() and plain
    if lora:
        assert all("lora_" in n for n in plain)
    for n in plain:
        assert plain[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_gradient_checkpointing_reaches_the_trainer_args() -> None:
    from trl import SFTConfig as TRLSFTConfig

    from cai.train.common import trainer_args
    from cai.train.sft import SFTConfig

    for gc in (False, True):
        args = trainer_args(TRLSFTConfig, SFTConfig(gradient_checkpointing=gc), None)
        assert args.gradient_checkpointing is gc
        assert args.bf16 is False and args.report_to in ([], ["none"], "none", None)


# --------------------------------------------------------------------------- 4-bit


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("stage", ["sft", "pm", "dpo", "rl"])
def test_load_in_4bit_on_cpu_is_one_line_exit_2(stage: str, tmp_path: Path) -> None:
    """Refused before anything is read or written: the data and model need not exist."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "cai.cli", "train", stage, "--load-in-4bit",
                        "--model", str(tmp_path / "no-model"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "load_in_4bit" in lines[0] and "CUDA" in lines[0], lines
    assert not out.exists()


def test_load_in_4bit_check_passes_when_off_and_needs_lora() -> None:
    check_run_options(HardwareConfig(load_in_4bit=False))  # nothing to refuse
    with pytest.raises(CaiError, match="load_in_4bit"):
        check_run_options(HardwareConfig(load_in_4bit=True), lora=False)


# --------------------------------------------------------------------------- report_to


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    found: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def test_report_to_tensorboard_sft_writes_the_logged_loss(tiny_model: Path, sft_file: Path,
                                                          tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from cai.train.sft import SFTConfig, run_sft

    for report in ("none", "tensorboard"):
        out = tmp_path / report
        run_sft(SFTConfig(data=str(sft_file), model=str(tiny_model), out=str(out), max_steps=3,
                          batch_size=2, report_to=report))
        if report == "none":
            assert not (out / "tensorboard").exists()
    log = {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}
    loss = dict(_scalars(out / "tensorboard")["train/loss"])
    assert sorted(loss) == sorted(log) == [1, 2, 3]
    for step, value in log.items():
        assert loss[step] == pytest.approx(value, rel=1e-4)


def test_report_to_tensorboard_ppo_mirrors_its_step_log(tiny_model: Path, tiny_pm: Path,
                                                        tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from cai.train.rl import RLConfig, run_rl

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(4)))
    out = tmp_path / "rl"
    run_rl(RLConfig(algo="ppo", model=str(tiny_model), reward=f"pm:{tiny_pm}", prompts=str(prompts),
                    out=str(out), steps=2, batch_size=2, minibatch_size=2, ppo_epochs=1,
                    max_new_tokens=4, save_every=0, lora_r=2, lora_alpha=4,
                    report_to="tensorboard"))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    scalars = _scalars(out / "tensorboard")
    for key in ("reward_mean", "kl", "policy_loss", "value_loss"):
        got = dict(scalars[f"train/{key}"])
        assert sorted(got) == [1, 2]
        for row in log:
            assert got[row["step"]] == pytest.approx(row[key], rel=1e-5, abs=1e-7), key


def test_report_to_wandb_without_wandb_is_one_clear_error() -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(CaiError, match="report_to") as err:
        check_run_options(HardwareConfig(report_to="wandb"))
    assert "wandb is not installed" in str(err.value)
    check_run_options(HardwareConfig(report_to="none"))
    with pytest.raises(CaiError, match="report_to"):
        HardwareConfig(report_to="mlflow").check_hardware()


# --------------------------------------------------------------------------- sharded loading

_LOAD_BOTH = """
import json, os, sys
import torch
from safetensors.torch import load_file
from cai.train.loading import HardwareConfig, load_model

path = sys.argv[1]
trained = load_model(path, HardwareConfig(), trainable=True)
frozen = load_model(path, HardwareConfig(), trainable=False)
ref = load_file(os.path.join(path, "model.safetensors"))

def read(model):
    sd = model.state_dict()
    return all(torch.equal(sd[k], v) for k, v in ref.items() if k in sd)

print("ROW " + json.dumps({"rank": int(os.environ["RANK"]), "trained": read(trained),
                           "frozen": read(frozen)}))
"""


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp-rank0-loading"])
def test_sharded_loading_two_processes(tiny_model: Path, tmp_path: Path, fsdp: bool) -> None:
    """Two CPU processes (torchrun, gloo): under FSDP with cpu-RAM-efficient loading only
    process 0 reads the trained model's weights (process 1 holds placeholders until
    accelerate's prepare broadcasts them); frozen models are read by both, since they are
    sharded afterwards from what each holds. Without FSDP both read everything."""
    import os

    script = tmp_path / "load_both.py"
    script.write_text(_LOAD_BOTH)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_FSDP": str(fsdp).lower(),
           "FSDP_CPU_RAM_EFFICIENT_LOADING": str(fsdp).lower(), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",  # a free port
                        "--nproc_per_node", "2",
                        str(script), str(tiny_model)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = sorted((json.loads(x.split("ROW ", 1)[1]) for x in r.stdout.splitlines()
                   if x.startswith("ROW ")), key=lambda x: x["rank"])
    assert [x["rank"] for x in rows] == [0, 1]
    assert all(x["frozen"] for x in rows)
    assert [x["trained"] for x in rows] == [True, not fsdp]


def test_gradient_checkpointing_ppo_lora_trains_the_same(tiny_model: Path, tiny_pm: Path,
                                                         tmp_path: Path) -> None:
    """PPO with LoRA: with checkpointing (policy in train mode, dropout off) the step's
    losses and the trained adapters match the run without it."""
    from safetensors.torch import load_file

    from cai.train.rl import RLConfig, run_rl

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(4)))
    logs, weights = {}, {}
    for gc in (False, True):
        out = tmp_path / f"rl-{gc}"
        run_rl(RLConfig(algo="ppo", model=str(tiny_model), reward=f"pm:{tiny_pm}",
                        prompts=str(prompts), out=str(out), steps=2, batch_size=2,
                        minibatch_size=1, ppo_epochs=2, max_new_tokens=4, save_every=0,
                        learning_rate=1e-2, lora_r=2, lora_alpha=4, gradient_checkpointing=gc))
        logs[gc] = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        weights[gc] = load_file(str(out / "model.safetensors"))
    start = load_file(str(tiny_model / "model.safetensors"))
    moved = max((weights[False][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4  # the runs trained
    for a, b in zip(logs[False], logs[True], strict=True):
        for key in ("policy_loss", "value_loss", "kl", "reward_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    for k in start:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- the plan


def test_plan_memory_follows_the_options(tiny_model: Path, tiny_pm: Path, tmp_path: Path) -> None:
    """The plan counts what the loader holds: fp32 masters + grads + AdamW for full weights,
    frozen models at the dtype's size, sharded parts divided by the processes, fewer
    activations with checkpointing; the CLI prints it, a bad stage is one line."""
    from cai.train.memory_plan import Setting, plan_memory
    from cai.train.rl import RLConfig

    def plan(setting=None, **kw):
        cfg = RLConfig(model=str(tiny_model), reward=f"pm:{tiny_pm}", **kw)
        return plan_memory("rl", cfg, setting)

    n = sum(p.numel() for p in load_model(tiny_model, HardwareConfig(), trainable=False).parameters())
    full = plan(lora=False, dtype="float32")
    assert full["params"] == n
    assert full["bytes"]["policy"] == 4 * n and full["bytes"]["optimizer"] == 8 * n
    assert full["bytes"]["reference"] == 4 * n and full["bytes"]["autocast_copies"] == 0
    bf16 = plan(lora=False, dtype="bfloat16")
    assert bf16["bytes"]["reference"] == 2 * n and bf16["bytes"]["policy"] == 4 * n
    assert bf16["bytes"]["reward"] * 2 == full["bytes"]["reward"]
    lora = plan(lora=True, dtype="bfloat16")
    assert lora["trained_params"] < n / 10 and lora["bytes"]["optimizer"] == 8 * lora["trained_params"]
    ckpt = plan(lora=False, dtype="float32", gradient_checkpointing=True)
    assert ckpt["bytes"]["activations"] < full["bytes"]["activations"]
    zero3 = plan(Setting(processes=4, sharding="zero3"), lora=False, dtype="float32")
    for part in ("policy", "gradients", "optimizer", "reference"):
        assert zero3["bytes"][part] == pytest.approx(full["bytes"][part] / 4, abs=1)
    ddp = plan(Setting(processes=4), lora=False, dtype="float32")
    assert ddp["bytes"]["policy"] == full["bytes"]["policy"]
    config = tmp_path / "rl.yaml"
    config.write_text(f"model: {tiny_model}\nreward: pm:{tiny_pm}\ndtype: bfloat16\n")
    r = subprocess.run([sys.executable, "-m", "cai.cli", "plan", "memory", str(config), "--stage",
                        "rl", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["bytes"]["reference"] == 2 * n
    r = subprocess.run([sys.executable, "-m", "cai.cli", "plan", "memory", str(config), "--stage",
                        "eval"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "stage" in r.stderr
