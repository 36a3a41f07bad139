"""What our PPO trainer (`cai.train.ppo.PPOTrainer`) reads: its own config, not the
three-algorithm `RLConfig` of `cai train rl`.

`RLConfig` extends it (each field declared once, here) with the algorithm choice, the
policy, reward and prompts, LoRA and the rollout engine; RLOO and GRPO read the fields
shared with PPO (batch size, β, clip, sampling, learning rate, seed, checkpoints), the
ones marked "PPO:" are PPO's alone. `cai train rl` hands the trainer a plain `PPOConfig`
(`PPOConfig.from_fields`). Kept apart from the trainer so a config is checked without
loading torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cai.core.errors import CaiError
from cai.train.loading import HardwareConfig


@dataclass
class PPOConfig(HardwareConfig):
    """The settings of one PPO run: rollout, KL leash, update and checkpoints."""

    beta: float = 0.05
    """KL coefficient β to the reference; what it weighs depends on the algorithm (see
    `cai.train.rl.KL_PENALTY`): PPO and RLOO take β·KL (k1, log π − log π_ref) out of the
    reward (PPO per token, RLOO summed per response); GRPO adds β·k3 per token to the loss
    instead, so the same β is a different strength there. Compare β only within one
    algorithm. PPO: the initial β when adaptive."""
    adaptive_kl: bool = False
    """PPO: adapt β so the per-response KL approaches target_kl."""
    target_kl: float = 6.0
    """PPO: target per-response KL (nats) of the adaptive controller."""
    batch_size: int = 8
    """Responses sampled per step (GRPO/RLOO: prompts × num_generations)."""
    minibatch_size: int = 4
    """PPO: responses per gradient step within a rollout."""
    ppo_epochs: int = 4
    """PPO: passes over each rollout."""
    cliprange: float = 0.2
    """Clip ε of the policy ratio (PPO, and epsilon of RLOO/GRPO)."""
    cliprange_value: float = 0.2
    """PPO: how far a value prediction may move from its rollout value per update."""
    gamma: float = 1.0
    """PPO: discount γ over response tokens."""
    lam: float = 0.95
    """PPO: GAE λ (bias–variance trade-off of the advantages)."""
    whiten_rewards: bool = False
    """PPO: standardise each batch's rewards before adding the KL penalty."""
    max_new_tokens: int = 64
    """Tokens per sampled response."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs are taken at the same temperature)."""
    learning_rate: float = 5e-5
    """AdamW learning rate (LoRA tolerates ~1e-4; full fine-tuning wants ~1e-6–1e-5)."""
    seed: int = 0
    """Run seed: prompt order, sampling and minibatch order derive from it and the step."""
    save_every: int = 25
    """Checkpoint every N steps (0: only at the end); a rerun continues from the last."""

    def __post_init__(self) -> None:
        self.check_ppo(ppo=True)

    def check_ppo(self, ppo: bool) -> None:
        """Range checks naming the field: those RLOO/GRPO read too, and (`ppo`) PPO's own;
        RLOO and GRPO never read the PPO-only fields, so their defaults (minibatch_size 4)
        must not refuse a small RLOO/GRPO batch."""
        self.check_hardware()
        checks = [
            (self.beta >= 0 and math.isfinite(self.beta), "beta", "must be a finite number ≥ 0"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.cliprange > 0, "cliprange", "must be > 0"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
            (self.temperature > 0, "temperature", "must be > 0 (RL samples; log-probs use it)"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.save_every >= 0, "save_every", "must be ≥ 0"),
        ]
        if ppo:
            checks += [
                (self.target_kl > 0, "target_kl", "must be > 0"),
                (1 <= self.minibatch_size <= self.batch_size, "minibatch_size",
                 "must be between 1 and batch_size (PPO)"),
                (self.ppo_epochs >= 1, "ppo_epochs", "must be at least 1"),
                (self.cliprange_value > 0, "cliprange_value", "must be > 0"),
                (0 <= self.gamma <= 1, "gamma", "must be in [0, 1]"),
                (0 <= self.lam <= 1, "lam", "must be in [0, 1]"),
            ]
        for ok, name, msg in checks:
            if not ok:
                raise CaiError(msg, field=name)

    @classmethod
    def from_fields(cls, cfg: Any) -> PPOConfig:
        """A plain PPOConfig of the PPO settings in a wider config (an `RLConfig`)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


__all__ = ["PPOConfig"]
