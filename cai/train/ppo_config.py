"""What our PPO trainer (`cai.train.ppo.PPOTrainer`) reads: its own config, not the
three-algorithm `RLConfig` of `cai train rl`, which builds one from its fields.

Kept apart from the trainer so a config can be checked without loading torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cai.core.errors import CaiError


@dataclass
class PPOConfig:
    """The settings of one PPO run (rollout, KL leash, update, checkpoints)."""

    batch_size: int = 8
    """Responses sampled and scored per step (one rollout)."""
    minibatch_size: int = 4
    """Responses per gradient step within a rollout; at most batch_size."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    max_new_tokens: int = 64
    """Tokens per sampled response."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; log-probs are taken at the same temperature."""
    beta: float = 0.05
    """KL coefficient β: −β·k1 (log π − log π_ref) is added to the reward of every response
    token; the initial β when adaptive."""
    adaptive_kl: bool = False
    """Adapt β so the per-response KL approaches target_kl."""
    target_kl: float = 6.0
    """Target per-response KL (nats) of the adaptive controller."""
    cliprange: float = 0.2
    """Clip ε of the policy ratio."""
    cliprange_value: float = 0.2
    """How far a value prediction may move from its rollout value per update."""
    gamma: float = 1.0
    """Discount γ over response tokens."""
    lam: float = 0.95
    """GAE λ (bias–variance trade-off of the advantages)."""
    whiten_rewards: bool = False
    """Standardise each batch's rewards before adding the KL penalty."""
    learning_rate: float = 5e-5
    """AdamW learning rate of the trainable weights and the value head."""
    seed: int = 0
    """Run seed: prompt order, sampling and minibatch order derive from it and the step."""
    bf16: bool = False
    """bf16 autocast on a GPU that supports it (ignored on CPU)."""
    save_every: int = 25
    """Checkpoint every N steps (0: only at the end); a rerun continues from the last."""

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (1 <= self.minibatch_size <= self.batch_size, "minibatch_size",
             "must be between 1 and batch_size (PPO)"),
            (self.ppo_epochs >= 1, "ppo_epochs", "must be at least 1"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
            (self.temperature > 0, "temperature", "must be > 0 (RL samples; log-probs use it)"),
            (self.beta >= 0 and math.isfinite(self.beta), "beta", "must be a finite number ≥ 0"),
            (self.target_kl > 0, "target_kl", "must be > 0"),
            (self.cliprange > 0, "cliprange", "must be > 0"),
            (self.cliprange_value > 0, "cliprange_value", "must be > 0"),
            (0 <= self.gamma <= 1, "gamma", "must be in [0, 1]"),
            (0 <= self.lam <= 1, "lam", "must be in [0, 1]"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.save_every >= 0, "save_every", "must be ≥ 0"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise CaiError(msg, field=name)

    @classmethod
    def from_fields(cls, cfg: Any) -> PPOConfig:
        """The PPO settings held by a wider config (`RLConfig`), field by field."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


__all__ = ["PPOConfig"]
