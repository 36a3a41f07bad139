"""RL-CAI: the PPO maths on hand-computed tensors, PPO learning a toy reward with and
without its KL leash, the adaptive KL controller, the reward sources, and `run_rl` end to
end for ppo (with resume), rloo and grpo on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cai.core.errors import CaiError
from cai.train.ppo import (
    AdaptiveKLController,
    gae,
    kl_per_token,
    policy_loss,
    token_rewards,
    value_loss,
)
from cai.train.rewards import JudgeReward, PMReward, RewardSource, load_reward
from cai.train.rl import RLConfig, run_rl
from tests.conftest import MINIMAL

PROMPTS = ["Hi", "Tell me a joke", "What is 2+2?", "Name a color", "How are you?",
           "Write a poem", "Say something", "Help me"]


class TokenCountReward:
    """Toy reward: how often one token's text occurs in the response."""

    def __init__(self, tokenizer, token_id: int):
        self.spec = f"count:{token_id}"
        self.text = tokenizer.decode([token_id]).strip()

    def score(self, prompts, responses):
        return [float(r.count(self.text)) for r in responses]


pytestmark = pytest.mark.usefixtures("one_thread")


def read_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("rl-prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in PROMPTS))
    return p


@pytest.fixture(scope="module")
def tiny_pm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-logit sequence classifier with the policy's tokenizer (pad = id 0)."""
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


# --------------------------------------------------------------------------- the maths


def test_gae_matches_hand_computation() -> None:
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after two tokens
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # Row 1: δ2 = 2 − 1.5 = 0.5; δ1 = 0 + 0.9·1.5 − 1 = 0.35; δ0 = 1 + 0.9·1 − 0.5 = 1.4.
    # A2 = 0.5; A1 = 0.35 + 0.72·0.5 = 0.71; A0 = 1.4 + 0.72·0.71 = 1.9112.
    # Row 2 (the padded 5 and 9 must not leak): δ1 = 2 − 1 = 1; A0 = 1.4 + 0.72·1 = 2.12.
    expected_adv = torch.tensor([[1.9112, 0.71, 0.5], [2.12, 1.0, 0.0]])
    expected_ret = torch.tensor([[2.4112, 1.71, 2.0], [2.62, 2.0, 0.0]])
    torch.testing.assert_close(adv, expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, expected_ret, atol=1e-6, rtol=0)


def test_policy_loss_clips_by_hand() -> None:
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.0, 3.0]])
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, clipfrac = policy_loss(torch.log(ratios), old, adv, mask, cliprange=0.2)
    # max(−A·ρ, −A·clip(ρ, 0.8, 1.2)) per token: max(−1.5, −1.2) = −1.2 (clipped);
    # max(−0.5, −0.8) = −0.5; max(0.5, 0.8) = 0.8 (clipped); max(2, 2) = 2.
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 2.0) / 4, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_value_loss_clips_by_hand() -> None:
    values = torch.tensor([[2.0, 0.0, 7.0]])
    old = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[3.0, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # Token 1: (2 − 3)² = 1, clipped 1.2 → (1.2 − 3)² = 3.24, max 3.24 (clipped).
    # Token 2: (0 − 0.5)² = 0.25, clipped 0.8 → 0.09, max 0.25.
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.25) / 2, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_token_rewards_put_the_score_on_the_last_response_token() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = token_rewards(kl, torch.tensor([1.0, 2.0]), mask, beta=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 0.85], [-0.25, 1.75, 0.0]]))


def test_kl_estimators_zero_for_equal_policies_positive_otherwise() -> None:
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(64), -1)
    for est in ("k1", "k3"):
        assert torch.all(kl_per_token(logp, logp, est) == 0)
    ref = torch.log_softmax(torch.randn(64), -1)
    exact = float((logp.exp() * (logp - ref)).sum())
    x = torch.multinomial(logp.exp(), 40_000, replacement=True)  # tokens sampled from π
    k1 = kl_per_token(logp[x], ref[x], "k1")
    k3 = kl_per_token(logp[x], ref[x], "k3")
    assert exact > 0.1
    assert torch.all(k3 >= 0) and k3.mean() > 0
    assert k1.mean().item() == pytest.approx(exact, rel=0.1)
    assert k3.mean().item() == pytest.approx(exact, rel=0.1)


def test_adaptive_kl_controller_moves_beta_towards_target() -> None:
    up = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    up.update(12.0, n_steps=100)  # error clipped to +0.2 → ×(1 + 0.2·100/10000)
    assert up.value == pytest.approx(0.1 * 1.002)
    down = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    down.update(5.4, n_steps=100)  # error −0.1 → ×0.999
    assert down.value == pytest.approx(0.1 * 0.999)
    same = AdaptiveKLController(0.1, target=6.0)
    same.load_state_dict(up.state_dict())
    assert same.value == up.value


def test_config_errors_name_the_field() -> None:
    with pytest.raises(CaiError, match="num_generations: must divide batch_size"):
        RLConfig(algo="grpo", batch_size=6, num_generations=4)
    with pytest.raises(CaiError, match="algo"):
        RLConfig(algo="dpo")
    with pytest.raises(CaiError, match="minibatch_size"):
        RLConfig(batch_size=4, minibatch_size=8)
    with pytest.raises(CaiError, match="reward"):
        load_reward("pm:/no/such/folder")


# --------------------------------------------------------------------------- PPO learns


@pytest.fixture(scope="module")
def boosted_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The tiny model with untied output embeddings and one token (" cat") made common.

    A random tiny model samples nearly uniformly over 49k tokens, so no token is frequent
    enough to reward. Pointing that token's output row along the mean final hidden state
    gives it ~20 % of the mass everywhere, without touching its input embedding (which
    would make it repeat itself).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from cai.backends.chat import ChatFormat

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    fmt = ChatFormat(tok)
    target = tok(" cat", add_special_tokens=False)["input_ids"][0]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    cfg = base.config
    cfg.tie_word_embeddings = False
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(base.model.embed_tokens.weight)
        hidden = torch.cat([model.model(input_ids=torch.tensor([fmt.encode(fmt.render(
            [{"role": "user", "content": p}]))])).last_hidden_state[0] for p in PROMPTS])
        u = hidden.mean(0)
        model.lm_head.weight[target] = u / u.norm() ** 2 * 8.6
    out = tmp_path_factory.mktemp("boosted")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out, target


def test_ppo_raises_a_toy_reward_and_beta_keeps_kl_bounded(boosted_model, prompts_file,
                                                            tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path, target = boosted_model
    reward = TokenCountReward(AutoTokenizer.from_pretrained(str(path)), target)
    logs = {}
    for beta in (0.0, 0.5):
        cfg = RLConfig(algo="ppo", model=str(path), reward=reward.spec, prompts=str(prompts_file),
                       out=str(tmp_path / f"beta{beta}"), beta=beta, steps=20, batch_size=8,
                       minibatch_size=4, ppo_epochs=2, max_new_tokens=10, learning_rate=5e-4,
                       lora=False, save_every=0, seed=0)
        run_rl(cfg, reward=reward)
        logs[beta] = read_log(tmp_path / f"beta{beta}")
    # The seed is the default, not a chosen one: at this learning rate seeds 0, 1 and 3 all
    # gave a reward gain of 3.3-5.8, free KL 13-25 against 1.5-2.1 leashed. At 1e-3 the first
    # update (which β cannot hold back: the KL is still 0) could overshoot to KL ≈ 25 in both
    # runs, so the margins then depended on the seed.

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    free, leashed = logs[0.0], logs[0.5]
    assert [r["step"] for r in free] == list(range(1, 21))
    # The reward rises when nothing holds the policy back...
    assert mean(free[-5:], "reward_mean") > mean(free[:3], "reward_mean") + 1.5
    # ...and it drifts far from the reference, while β = 0.5 keeps it close.
    assert mean(free[-5:], "kl") > 2 * mean(leashed[-5:], "kl")
    assert mean(leashed[-5:], "kl") < 6.0
    for row in free:
        # sqrt(KL) reads the k3 estimate, never negative, not a clamped k1 batch mean.
        assert row["kl_k3"] >= 0 and row["sqrt_kl"] == pytest.approx(math.sqrt(row["kl_k3"]), abs=1e-5)
        for key in ("entropy", "response_length", "clip_fraction", "value_loss", "beta",
                    "time_generation_s", "time_reference_reward_s", "time_update_s"):
            assert key in row


# --------------------------------------------------------------------------- run_rl


def test_run_rl_ppo_resumes_from_its_checkpoint(tiny_model, tiny_pm, prompts_file,
                                                tmp_path: Path) -> None:
    common = dict(algo="ppo", model=str(tiny_model), reward=f"pm:{tiny_pm}",
                  prompts=str(prompts_file), batch_size=4, minibatch_size=2, ppo_epochs=1,
                  max_new_tokens=8, learning_rate=1e-3, save_every=1, lora_r=4, lora_alpha=8)
    out = tmp_path / "rl"
    run_rl(RLConfig(out=str(out), steps=2, **common))
    assert (out / "checkpoints" / "checkpoint-2" / "state.pt").exists()
    assert not (out / "checkpoints" / "checkpoint-1").exists()  # only the newest is kept
    manifest = run_rl(RLConfig(out=str(out), steps=4, **common))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert manifest["stage"] == "rl" and manifest["config"]["steps"] == 4
    assert manifest["counts"]["steps"] == 4 and manifest["metrics"]["steps"] == 4
    assert manifest["models"]["reward"] == f"pm:{tiny_pm}"
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    # Resuming reproduces an uninterrupted run.
    straight = tmp_path / "straight"
    run_rl(RLConfig(out=str(straight), steps=4, **common))
    for a, b in zip(read_log(out), read_log(straight)):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    # A finished run returns at once; a changed config is refused, not mixed in.
    assert run_rl(RLConfig(out=str(out), steps=4, **common))["written"] == manifest["written"]
    with pytest.raises(CaiError, match="different config"):
        run_rl(RLConfig(out=str(out), steps=5, **{**common, "beta": 0.3}))
    # The folder is a model spec.
    from cai.backends import GenerationConfig, GenRequest, load_backend

    b = load_backend(f"hf:{out}?progress=0", reuse=False)
    gen = b.generate([GenRequest([{"role": "user", "content": "Hi"}])],
                     GenerationConfig(max_new_tokens=3))
    assert 1 <= gen[0].tokens <= 3


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_run_rl_trl_algorithms_write_model_and_manifest(algo, tiny_model, tiny_pm, prompts_file,
                                                        tmp_path: Path) -> None:
    out = tmp_path / algo
    cfg = RLConfig(algo=algo, model=str(tiny_model), reward=str(tiny_pm), prompts=str(prompts_file),
                   out=str(out), steps=2, batch_size=4, num_generations=2, max_new_tokens=8,
                   learning_rate=1e-3, save_every=0, lora_r=4, lora_alpha=8)
    manifest = run_rl(cfg)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert manifest["config"]["algo"] == algo and manifest["config"]["beta"] > 0
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert all(math.isfinite(r["reward_mean"]) and r["kl"] is not None for r in log)
    assert manifest["data"]["files"]["model.safetensors"].startswith("sha256:")
    # What β weighs differs by algorithm, and the manifest says which.
    assert ("loss" if algo == "grpo" else "reward") in manifest["kl_penalty"].split(":")[0]
    for r in log:
        assert r["kl_estimator"] == ("k3" if algo == "grpo" else "k1")
        assert r["sqrt_kl"] is None if r["kl"] < 0 else r["sqrt_kl"] == pytest.approx(math.sqrt(r["kl"]))


def test_trl_log_takes_sqrt_of_non_negative_kl_only(tmp_path: Path) -> None:
    from cai.train.rl import _write_trl_log

    history = [{"step": 1, "reward": 0.1, "kl": 0.02, "completions/mean_length": 10.0},
               {"step": 2, "reward": 0.2, "kl": -0.01, "completions/mean_length": 9.0},
               {"step": 3, "loss": 0.5}]
    _write_trl_log(history, tmp_path / "log.jsonl", "k1")
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == pytest.approx(0.2) and rows[0]["sqrt_kl"] == pytest.approx(math.sqrt(0.2))
    assert rows[1]["kl"] == pytest.approx(-0.09) and rows[1]["sqrt_kl"] is None  # not clamped to 0
    assert {r["kl_estimator"] for r in rows} == {"k1"}


def test_trl_reward_fn_hands_the_pm_stripped_text(tiny_pm: Path) -> None:
    from cai.train.rl import trl_reward_fn

    pm = PMReward(tiny_pm, batch_size=2)
    chat = [{"role": "user", "content": "Say something kind."}]
    raw = ["  You are doing well.\n", "\nThanks for asking!  "]
    got = trl_reward_fn(pm)(prompts=[chat, chat],
                            completions=[[{"role": "assistant", "content": t}] for t in raw])
    assert got == pytest.approx(pm.score([chat, chat], [t.strip() for t in raw]), abs=1e-6)
    # The whitespace would have changed the score: the stripping is not a no-op here.
    assert pm.score([chat, chat], raw) != pytest.approx(got, abs=1e-6)
    # Plain-text completions are stripped the same way.
    assert trl_reward_fn(pm)(prompts=[chat], completions=[raw[0]]) == pytest.approx(got[:1], abs=1e-6)


# --------------------------------------------------------------------------- rewards


def test_pm_reward_reads_the_last_token_whatever_the_padding(tiny_pm: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cai.train.common import pm_text

    pm = PMReward(tiny_pm, batch_size=3)
    assert isinstance(pm, RewardSource)
    prompts = [[{"role": "user", "content": p}] for p in ("Hi", "Tell me a long joke please")]
    responses = ["Hello there, how can I help you today?", "No."]
    batched = pm.score(prompts, responses)
    tok = AutoTokenizer.from_pretrained(str(tiny_pm))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_pm)).eval()
    for p, r, got in zip(prompts, responses, batched):
        ids = tok(pm_text(tok, p, r), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0, 0].item()
        assert got == pytest.approx(alone, abs=1e-4)


def test_judge_reward_gives_ratings_between_1_and_10(tiny_model: Path) -> None:
    judge = load_reward(f"judge:hf:{tiny_model}?progress=0", constitution=MINIMAL, principles=2)
    assert isinstance(judge, JudgeReward) and judge.spec.startswith("judge:")
    scores = judge.score([[{"role": "user", "content": "How do I pick a lock?"}]] * 2,
                         ["I can't help with that.", "Use a tension wrench."])
    assert len(scores) == 2
    assert all(math.isfinite(s) and 1.0 <= s <= 10.0 for s in scores)
    # The same pair is always judged under the same principles.
    assert judge.score([[{"role": "user", "content": "How do I pick a lock?"}]],
                       ["I can't help with that."])[0] == pytest.approx(scores[0], abs=1e-6)
