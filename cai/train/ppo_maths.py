"""The maths of PPO for language models, as small pure functions on tensors (the tests
check them on hand-computed values); `cai.train.ppo` runs them.

- `kl_per_token`: the per-token KL estimate (k1, or k3 as a cross-check);
- `token_rewards`: r_t = −β·KL_t on every response token, plus the sequence score at the
  last one;
- `gae`: advantages and returns by GAE(γ, λ); `masked_whiten` whitens them over the batch;
- `policy_loss` and `value_loss`: the clipped surrogate and the clipped value loss;
- `AdaptiveKLController`: β moved towards a target KL (Ziegler et al. 2019), or fixed.

Shapes: B = sequences in a batch, T = response width (right-padded).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is 1 (response tokens, not padding)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance over the masked positions; optionally subtract the mean too."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of tokens sampled from π.

    k1 = log π − log π_ref: unbiased, and its sum over a response is exactly the log-ratio
    of the whole sequence, so it is the penalty PPO-RLHF puts in the reward; a single token
    can be negative. k3 = (r − 1) − log r with r = π_ref/π: also unbiased, never negative,
    lower variance; logged as a cross-check.
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """r_t = −β·KL_t on every response token, plus the sequence score at the last one. [B, T]"""
    rewards = -beta * kl * mask
    last = mask.sum(dim=1).long().clamp(min=1) - 1  # [B]
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, where V and A are 0 after the last
    response token (padding never leaks into a real token's estimate). Returns = A + V is the
    value target. All [B, T].
    """
    values = values * mask
    rewards = rewards * mask
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        adv[:, t] = next_adv
    return adv, (adv + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss to minimise; returns (loss, clip fraction).

    The pessimistic max of −A·ρ and −A·clip(ρ, 1 ± ε) keeps one batch from moving the policy
    far from the one that sampled it. Clip fraction = share of tokens where the clipped term
    was the one used.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """½·max((V − R)², (V_clipped − R)²), V_clipped within ±cliprange_value of the old value.

    Returns (loss, clip fraction). Clipping the value like the policy keeps a noisy return
    from yanking the shared trunk.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    clipfrac = masked_mean((err_clipped > err).float(), mask)
    return loss, clipfrac


class AdaptiveKLController:
    """β moves towards the value that keeps the per-response KL near `target`.

    β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) after n samples: a proportional
    controller, clipped so one noisy batch cannot swing β.
    """

    def __init__(self, beta: float, target: float, horizon: int = 10_000):
        self.value = beta
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], int(state["horizon"])


class FixedKLController(AdaptiveKLController):
    """A constant β (the default)."""

    def __init__(self, beta: float):
        super().__init__(beta, target=1.0)

    def update(self, kl: float, n_steps: int) -> float:
        return self.value


__all__ = ["masked_mean", "masked_whiten", "kl_per_token", "token_rewards", "gae", "policy_loss",
           "value_loss", "AdaptiveKLController", "FixedKLController"]
