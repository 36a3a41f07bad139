"""PPO for language models with a per-token KL penalty to a frozen reference, in one file.

TRL 1.x no longer ships PPO, and the method of the paper (RL from AI feedback with a
preference model) is PPO, so here it is, small enough to read top to bottom:

1. roll out: sample a response to each prompt from the policy (seeded per step);
2. score: the policy's log-probs and values, the reference's log-probs, the reward of each
   whole response; per-token reward r_t = −β·KL_t, plus the sequence reward at the last
   response token;
3. advantages by GAE(γ, λ), whitened over the batch;
4. a few epochs of minibatch updates of the clipped policy loss plus the clipped value loss;
5. optionally adapt β towards a target KL (Ziegler et al. 2019).

The maths lives in small pure functions in `cai.train.ppo_maths` (`kl_per_token`, `gae`,
`policy_loss`, `value_loss`, `AdaptiveKLController`) that the tests check on hand-computed
tensors. The trainer takes its own `PPOConfig` (`cai.train.ppo_config`). Every
random choice (prompt order, sampling, minibatch order) is a pure function of the seed and
the step, so a run resumed from a checkpoint continues exactly as an uninterrupted one.

Shapes: B = sequences in a batch, P = prompt width (left-padded), T = response width
(right-padded), V = vocabulary, H = hidden size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cai.core.errors import CaiError
from cai.core.seeds import derive_seed
from cai.train.common import (
    CHECKPOINTS,
    LOG,
    STATE,
    TRAINER_STATE,
    Chat,
    append_step,
    read_steps,
    resume_point,
    rewrite_steps,
    write_checkpoint,
)
from cai.train.loading import StepMirror, autocast
from cai.train.monitors import monitor_stats
from cai.train.ppo_config import PPOConfig
from cai.train.ppo_maths import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

if TYPE_CHECKING:
    from cai.train.rewards import RewardSource

VF_COEF = 0.1
"""Weight of the value loss against the policy loss (they share the LM's trunk)."""
MAX_GRAD_NORM = 1.0

# --------------------------------------------------------------------------- the model


class ValueHead(nn.Module):
    """V(s_t): a linear map of the LM's last hidden state (after the final norm). Zero-init
    so the first advantages are the rewards themselves, not random noise."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T]
        return self.linear(hidden.float()).squeeze(-1)


def response_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     n_response: int, temperature: float, value_head: ValueHead | None = None,
                     with_entropy: bool = False) -> dict[str, torch.Tensor]:
    """Log-probs of the response tokens (and values, entropy) from one forward.

    input_ids = [prompt (left-padded, P) | response (right-padded, T)], [B, P+T]. The logits
    at positions P−1 … P+T−2 predict the response; only those are computed
    (`logits_to_keep`), which matters with a 50k–150k vocabulary. Logits are divided by the
    sampling temperature so the log-probs are those of the distribution sampled from.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=n_response + 1, output_hidden_states=value_head is not None,
                use_cache=False)
    logits = out.logits[:, :-1].float() / temperature  # [B, T, V]
    targets = input_ids[:, -n_response:]  # [B, T]
    logsm = torch.log_softmax(logits, dim=-1)
    res = {"logp": logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)}  # [B, T]
    if value_head is not None:
        hidden = out.hidden_states[-1][:, -n_response - 1:-1]  # [B, T, H]
        res["values"] = value_head(hidden)
    if with_entropy:
        res["entropy"] = -(logsm.exp() * logsm).sum(-1)  # [B, T]
    return res


# --------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One step's experience, all tensors [B, T] unless noted."""

    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    mask: torch.Tensor  # response tokens (up to and including the stop token)
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict[str, float]


def shards_weights(accelerator: Any) -> bool:
    """True when the accelerate config shards the parameters (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator is None:
        return False
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return kind == "DEEPSPEED" and getattr(plugin, "zero_stage", 0) == 3


class PolicyAndValue(nn.Module):
    """The trainable parts as one module, so DDP / FSDP / ZeRO wrap (and sync) them together.
    Its forward is `response_forward` with the value head."""

    def __init__(self, policy: nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int,
                temperature: float) -> dict[str, torch.Tensor]:
        return response_forward(self.policy, input_ids, attention_mask, n_response, temperature,
                                self.value_head)


class PPOTrainer:
    """Owns the policy, value head, frozen reference, reward, optimizer and KL controller.

    `policy` may be a peft model (LoRA); `reference` is a separate frozen copy of the model
    the run started from (the SL-CAI folder). `cfg` is a `PPOConfig` (`cai train rl` builds it
    from its `RLConfig`). `engine` samples the
    rollouts (`cai.train.rollout`; default: the policy itself through transformers).

    With an `accelerator` of N processes (`accelerate launch`), each process samples and
    scores its N-th of every batch; the scored rollouts are gathered so every process holds
    the whole batch (advantages are whitened over it), and each minibatch is split across
    the processes with its loss weighted so that the averaged gradient equals one process's
    gradient on the whole minibatch. Samples are seeded per request, so the run matches a
    one-process run within float round-off.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, tokenizer: Any,
                 reward: RewardSource, prompts: list[Chat], cfg: PPOConfig, out: str | Path,
                 engine: Any = None, accelerator: Any = None):
        from cai.backends.chat import ChatFormat
        from cai.train.placement import deepspeed_micro_batch, place_frozen
        from cai.train.rollout import HFRollout

        self.cfg = cfg
        self.out = Path(out)
        self.policy = policy
        self.reference = reference.eval().requires_grad_(False)
        self.reward = reward
        self.prompts = prompts
        self.fmt = ChatFormat(tokenizer)
        self.tok = tokenizer
        self.accelerator = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.is_main = self.rank == 0
        self._check_split()
        # Sharded runs load the policy on the CPU (or partitioned); accelerate places it.
        self.device = (accelerator.device if shards_weights(accelerator)
                       else next(policy.parameters()).device)
        # Whole on this device, or sharded / offloaded as the accelerate config says.
        self.reference, self.placement = place_frozen(reference, reward, accelerator, self.device)
        self.prompt_ids = [self.fmt.encode(self.fmt.render(p)) for p in prompts]
        hidden = policy.get_input_embeddings().weight.shape[1]
        self.value_head = ValueHead(hidden).to(self.device)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params + list(self.value_head.parameters()),
                                           lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
        self.model: nn.Module = PolicyAndValue(policy, self.value_head)
        if accelerator is not None:
            deepspeed_micro_batch(accelerator, cfg.minibatch_size // self.world)
            self.model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        self.kl_ctl = (AdaptiveKLController(cfg.beta, cfg.target_kl) if cfg.adaptive_kl
                       else FixedKLController(cfg.beta))
        self.step = 0
        self.autocast = autocast(cfg, self.device)  # fp32: none
        if cfg.gradient_checkpointing:  # checkpointing acts in train mode only: no dropout there
            from trl.trainer.utils import disable_dropout_in_model

            disable_dropout_in_model(policy)
        self.engine = engine if engine is not None else HFRollout(
            policy, tokenizer.pad_token_id, self.fmt.stop_ids, self.autocast,
            synced=shards_weights(accelerator))

    def _check_split(self) -> None:
        """Across N processes every batch and minibatch must split into N equal shares."""
        cfg, n = self.cfg, self.world
        if n == 1:
            return
        for name in ("batch_size", "minibatch_size"):
            if getattr(cfg, name) % n:
                raise CaiError(f"must be a multiple of the {n} processes", field=name)
        if cfg.batch_size % cfg.minibatch_size:
            raise CaiError(f"must divide batch_size ({cfg.batch_size}) when running on "
                           f"{n} processes", field="minibatch_size")

    # ---------------------------------------------------------------- across processes

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's rows, in process order (the batch order)."""
        return x if self.world == 1 else self.accelerator.gather(x.contiguous())

    def _gather_list(self, x: list) -> list:
        if self.world == 1:
            return x
        from accelerate.utils import gather_object

        return gather_object(x)

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.world == 1 else self.accelerator.reduce(x.contiguous(), "sum")

    # ---------------------------------------------------------------- one step

    def batch_prompts(self, step: int) -> list[int]:
        """Prompt indices of a step: epochs of seeded permutations, cut into batches."""
        n, b = len(self.prompts), self.cfg.batch_size
        out = []
        for k in range((step - 1) * b, step * b):
            epoch, pos = divmod(k, n)
            order = list(range(n))
            random.Random(derive_seed(self.cfg.seed, "prompts", epoch)).shuffle(order)
            out.append(order[pos])
        return out

    def request_seeds(self, step: int) -> list[int]:
        """One sampling seed per response of a step, by its place in the global batch, so
        the process (or batch) that samples it does not matter."""
        return [derive_seed(self.cfg.seed, "rollout", step, j) % 2**63
                for j in range(self.cfg.batch_size)]

    def _pack(self, prompts: list[list[int]], responses: list[list[int]]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[prompt (left-padded) | response (right-padded)] ids and attention mask, and the
        response mask (real tokens up to and including the stop token)."""
        pad = self.tok.pad_token_id
        width = max(len(p) for p in prompts)
        t_len = max(1, max(len(r) for r in responses))
        ids = [[pad] * (width - len(p)) + p + r + [pad] * (t_len - len(r))
               for p, r in zip(prompts, responses)]
        amask = [[0] * (width - len(p)) + [1] * (len(p) + len(r)) + [0] * (t_len - len(r))
                 for p, r in zip(prompts, responses)]
        mask = [[1.0] * len(r) + [0.0] * (t_len - len(r)) for r in responses]
        dev = self.device
        return (torch.tensor(ids, device=dev), torch.tensor(amask, device=dev),
                torch.tensor(mask, device=dev))

    def _text(self, tokens: list[int]) -> str:
        body = [t for t in tokens if t not in self.fmt.stop_ids]
        return self.tok.decode(body, skip_special_tokens=True).strip()

    def rollout(self, step: int) -> Rollout:
        """Sample (this process's share), score with policy, reference and reward, gather
        the batch; rewards → GAE advantages."""
        cfg = self.cfg
        t0 = time.perf_counter()
        idx = self.batch_prompts(step)
        share = len(idx) // self.world
        lo, hi = self.rank * share, (self.rank + 1) * share
        self.policy.eval()
        got = self.engine.sample([self.prompt_ids[i] for i in idx[lo:hi]],
                                 self.request_seeds(step)[lo:hi], cfg.max_new_tokens,
                                 cfg.temperature)
        responses = self._gather_list(got.tokens)
        input_ids, attention_mask, mask = self._pack([self.prompt_ids[i] for i in idx], responses)
        t_len = mask.shape[1]
        t1 = time.perf_counter()

        mine = slice(lo, hi)
        with torch.no_grad(), self.autocast:
            pol = response_forward(self.policy, input_ids[mine], attention_mask[mine], t_len,
                                   cfg.temperature, self.value_head, with_entropy=True)
            ref = response_forward(self.reference, input_ids[mine], attention_mask[mine], t_len,
                                   cfg.temperature)
        raw = torch.tensor(self.reward.score([self.prompts[i] for i in idx[lo:hi]],
                                             [self._text(r) for r in got.tokens]),
                           dtype=torch.float32, device=self.device)  # [B / N]
        engine_diff = None
        if got.logprobs is not None:
            # How far the engine's sampling log-probs are from the trainer's: ~1e-5 when
            # the engine holds the policy's weights, large after a missed sync.
            elp = torch.tensor([lp + [0.0] * (t_len - len(lp)) for lp in got.logprobs],
                               device=self.device)
            m = mask[mine]
            engine_diff = self._sum(torch.stack([((elp - pol["logp"].float()).abs() * m).sum(),
                                                 m.sum()]))
        logp, values, entropy, ref_logp, raw = (self._gather(x) for x in (
            pol["logp"], pol["values"], pol["entropy"], ref["logp"], raw))
        scores = raw
        if cfg.whiten_rewards:
            # β then weighs KL against reward standard deviations, whatever the PM's scale.
            scores = (raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8)
        kl = kl_per_token(logp, ref_logp, "k1") * mask
        kl3 = kl_per_token(logp, ref_logp, "k3") * mask
        beta = self.kl_ctl.value
        rewards = token_rewards(kl, scores, mask, beta)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, mask)
        t2 = time.perf_counter()
        seq_kl = kl.sum(1).mean().item()
        # k1's batch mean can dip below 0 (noise); k3 never does, so sqrt(KL) reads k3.
        seq_k3 = kl3.sum(1).mean().item()
        stats = {
            "reward": raw.mean().item(),  # the name cai.report and cai.evaluate read
            "reward_mean": raw.mean().item(),
            "reward_std": raw.std(unbiased=False).item(),
            "kl": seq_kl,
            "sqrt_kl": math.sqrt(max(seq_k3, 0.0)),
            "kl_k3": seq_k3,
            "entropy": masked_mean(entropy, mask).item(),
            "response_length": mask.sum(1).mean().item(),
            "beta": beta,
            "time_generation_s": t1 - t0,
            "time_reference_reward_s": t2 - t1,
        }
        if engine_diff is not None:
            stats["rollout_logp_abs_diff"] = (engine_diff[0] / engine_diff[1].clamp(min=1)).item()
        # Watched, never in the update (monitors.py); summed over every process's share.
        stats.update(monitor_stats(self.reward, (lambda t: self._sum(t.to(self.device)).cpu())
                                   if self.world > 1 else None))
        return Rollout(input_ids, attention_mask, mask, logp, values * mask, adv, returns, stats)

    def update(self, r: Rollout, step: int) -> dict[str, float]:
        """`ppo_epochs` passes of shuffled minibatch updates over one rollout."""
        cfg = self.cfg
        n, t_len = r.input_ids.shape[0], r.mask.shape[1]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "minibatch", step) % 2**63)
        keys = ("clip_fraction", "value_clip_fraction", "policy_loss", "value_loss")
        acc: dict[str, list[float]] = {k: [] for k in keys}
        trainable = self.params + list(self.value_head.parameters())
        # The policy stays in eval mode: dropout would make the new log-probs disagree with the
        # rollout's even before any update. Gradient checkpointing acts only in train mode,
        # so with it the policy trains with its dropout switched off instead.
        if cfg.gradient_checkpointing:
            self.policy.train()
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            for s in range(0, n, cfg.minibatch_size):
                whole = perm[s:s + cfg.minibatch_size]
                k = len(whole) // self.world
                mb = torch.tensor(whole[self.rank * k:(self.rank + 1) * k], device=self.device)
                with self.autocast:
                    new = self.model(r.input_ids[mb], r.attention_mask[mb], t_len, cfg.temperature)
                m = r.mask[mb]
                pl, cf = policy_loss(new["logp"], r.logp[mb], r.advantages[mb], m, cfg.cliprange)
                vl, vcf = value_loss(new["values"], r.values[mb], r.returns[mb], m, cfg.cliprange_value)
                # This process's masked means, weighted by its share of the minibatch's tokens
                # (times N, as DDP averages): the averaged gradient is that of the whole
                # minibatch's masked mean. Exactly 1 on one process.
                weight = m.sum() * self.world / r.mask[whole].sum().clamp(min=1)
                loss = (pl + VF_COEF * vl) * weight
                self.optimizer.zero_grad(set_to_none=True)
                if self.accelerator is not None:
                    self.accelerator.backward(loss)
                    self.accelerator.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                self.optimizer.step()
                vals = torch.stack([cf, vcf, pl, vl]).detach()
                if self.world > 1:
                    vals = self._sum(vals * m.sum()) / r.mask[whole].sum().clamp(min=1)
                for key, v in zip(keys, vals.tolist()):
                    acc[key].append(v)
        return {k: sum(v) / len(v) for k, v in acc.items()}

    def train_step(self, step: int) -> dict[str, Any]:
        r = self.rollout(step)
        t = time.perf_counter()
        upd = self.update(r, step)
        t_sync = time.perf_counter()
        self.engine.sync(self.policy)  # the next rollout samples from the updated policy
        stats = {"step": step, **r.stats, **upd, "time_update_s": t_sync - t,
                 "time_sync_s": time.perf_counter() - t_sync}
        total = (stats["time_generation_s"] + stats["time_reference_reward_s"]
                 + stats["time_update_s"] + stats["time_sync_s"])
        stats["samples_per_s"] = self.cfg.batch_size / total
        self.kl_ctl.update(stats["kl"], self.cfg.batch_size)
        self.step = step
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()}

    # ---------------------------------------------------------------- the loop

    @property
    def log_path(self) -> Path:
        return self.out / LOG

    def train(self, steps: int) -> list[dict[str, Any]]:
        """Run (or continue) to `steps`, logging every step and checkpointing on schedule."""
        start = self.load_checkpoint()
        if self.is_main:  # the steps after the checkpoint are about to be redone
            rewrite_steps(self.log_path, read_steps(self.log_path, upto=start))
        if start:
            self.engine.sync(self.policy)  # the engine starts from the checkpoint's weights
        history = []
        mirror = (StepMirror(self.cfg.report_to, self.out, dataclasses.asdict(self.cfg))
                  if self.is_main and self.cfg.report_to != "none" else None)
        for step in range(start + 1, steps + 1):
            stats = self.train_step(step)
            history.append(stats)
            every = self.cfg.save_every
            # Every process holds the same weights and stats; one writes them.
            if self.is_main:
                append_step(self.log_path, stats)
                if mirror is not None:
                    mirror.log(stats)
                if step == steps or (every > 0 and step % every == 0):
                    self.save_checkpoint()
        if mirror is not None:
            mirror.close()
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return history

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> None:
        """Trainable weights (LoRA or full), value head, optimizer, KL β, step, RNG, as
        `checkpoints/checkpoint-N/state.pt`, written whole or not at all (the shared
        checkpoint convention of every trainer)."""
        state = {
            "step": self.step,
            "trainable": {n: p.detach().cpu() for n, p in self.policy.named_parameters()
                          if p.requires_grad},
            "value_head": self.value_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

        def write(folder: Path) -> None:
            folder.mkdir(parents=True)
            torch.save(state, folder / STATE)
            (folder / TRAINER_STATE).write_text(json.dumps({"global_step": self.step}),
                                                encoding="utf-8")

        write_checkpoint(self.out / CHECKPOINTS, self.step, write)

    def load_checkpoint(self) -> int:
        """Restore the newest complete checkpoint if there is one (or the one file an older
        version kept in `checkpoint/`); returns the step it was taken after."""
        found = resume_point(self.out)
        path = Path(found) / STATE if found else self.out / "checkpoint" / STATE
        if not path.exists():
            return 0
        state = torch.load(path, map_location=self.device, weights_only=True)
        missing = set(state["trainable"]) - {n for n, _ in self.policy.named_parameters()}
        if missing:
            raise CaiError(f"holds a checkpoint of another model (weights {', '.join(sorted(missing)[:3])}"
                           " are not in this one); rerun with --force to start over, or use "
                           "another --out", str(path))
        self.policy.load_state_dict(state["trainable"], strict=False)
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])
        return self.step


__all__ = ["kl_per_token", "gae", "policy_loss", "value_loss", "token_rewards", "masked_mean",
           "masked_whiten", "AdaptiveKLController", "FixedKLController", "ValueHead",
           "response_forward", "PPOTrainer", "PPOConfig", "PolicyAndValue", "Rollout",
           "shards_weights"]
