"""Training throughput: our PPO vs TRL's RLOO, and the soft-label PM trainer vs TRL's
RewardTrainer — side by side in one run, on the same prompts, reward and model.

    python benchmarks/bench_train.py [--steps 6] [--model SPEC] [--quick]

RL: both go through `cai train rl` (`run_rl`) with LoRA, 8 responses per step, the same
random preference model as reward. PPO also runs with its rollouts sampled by vLLM
(`--rollout-engine vllm`, weights synced after every update) beside transformers' generate;
`ppo_vllm_over_hf` is its samples/s over the hf run's (it runs last, after the PM part:
vLLM's CPU worker pins the process's threads). Reported per algorithm: samples/s and the split of a
step into generation, reward and the rest (policy/reference forwards and the update);
PPO also reports its own finer split from log.jsonl. PPO runs twice: with its defaults
(4 epochs × 2 minibatches = 8 gradient steps per rollout) and "matched" (1 epoch, one
minibatch = one gradient step per rollout, like RLOO here). The first step of each run is
a warm-up and is not counted.

PM (when `cai/train/pm.py` is present): pairs/s of `train_pm` (soft labels) against a
plain `RewardTrainer` fed the same token ids, same model, LoRA and arguments; the overhead
is that of the soft loss and its collator. Both timings cover load → tokenize → train →
merge.

Without --model the policy is a small random Llama (4 layers, hidden 256) with the
embedded model's tokenizer; --quick shrinks it (2 layers, hidden 64) and the run. Writes
benchmarks/results/train.json and prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import synthetic_pairs  # noqa: E402


class Timer:
    """Durations of each call of a wrapped function (one generate / reward call per step)."""

    def __init__(self):
        self.calls: list[float] = []

    def wrap(self, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.calls.append(time.perf_counter() - t)
        return timed


class TimedReward:
    """The benchmark's reward source, timed per call."""

    def __init__(self, inner, timer: Timer):
        self.spec = inner.spec
        self.score = timer.wrap(inner.score)


def random_models(tmp: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """A random causal LM (the 'SL-CAI model') and a random one-logit PM, both saved."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    from cai.core.models import local_path

    tok = AutoTokenizer.from_pretrained(str(local_path("embedded:smollm2-135m")))
    torch.manual_seed(0)
    heads = max(2, hidden // 64)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    policy, pm = tmp / "policy", tmp / "pm"
    LlamaForCausalLM(cfg).save_pretrained(str(policy))
    tok.save_pretrained(str(policy))
    pm_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(pm_cfg).save_pretrained(str(pm))
    tok.save_pretrained(str(pm))
    return policy, pm


def bench_rl(name: str, cfg, reward, gen: Timer) -> dict:
    """Run one configuration through run_rl; per-step times after the warm-up step."""
    from cai.train.rl import run_rl

    rtimer = Timer()
    gen.calls.clear()
    t = time.perf_counter()
    run_rl(cfg, reward=TimedReward(reward, rtimer))
    wall = time.perf_counter() - t
    log = [json.loads(x) for x in (Path(cfg.out) / "log.jsonl").read_text().splitlines()][1:]
    n = len(log)
    if cfg.algo == "ppo":
        step_s = sum(r["time_generation_s"] + r["time_reference_reward_s"] + r["time_update_s"]
                     + r.get("time_sync_s", 0.0) for r in log) / n
        # PPO times its own sampling (whichever engine); transformers' generate is not
        # called at all with vLLM rollouts.
        gen_s = sum(r["time_generation_s"] for r in log) / n
    else:
        step_s = sum(r["trl"]["step_time"] for r in log) / n
        gen_s = sum(gen.calls[1:]) / max(1, len(gen.calls) - 1)
    rew_s = sum(rtimer.calls[1:]) / max(1, len(rtimer.calls) - 1)
    row = {"name": name, "algo": cfg.algo, "measured_steps": n, "samples_per_step": cfg.batch_size,
           "step_s": round(step_s, 3), "samples_per_s": round(cfg.batch_size / step_s, 3),
           "generation_s": round(gen_s, 3), "reward_s": round(rew_s, 3),
           "other_s": round(step_s - gen_s - rew_s, 3),
           "generation_share": round(gen_s / step_s, 3), "run_wall_s": round(wall, 1)}
    if cfg.algo == "ppo":
        row["rollout_engine"] = cfg.rollout_engine
        row["ppo_split_s"] = {k: round(sum(r.get(f"time_{k}_s", 0.0) for r in log) / n, 3)
                              for k in ("generation", "reference_reward", "update", "sync")}
        if "rollout_logp_abs_diff" in log[0]:
            row["rollout_logp_abs_diff_max"] = max(r["rollout_logp_abs_diff"] for r in log)
        row["gradient_steps_per_step"] = cfg.ppo_epochs * -(-cfg.batch_size // cfg.minibatch_size)
    else:
        row["gradient_steps_per_step"] = 1
    print(json.dumps(row), file=sys.stderr)
    return row


def bench_pm(policy: Path, steps: int, pairs: int, tmp: Path, reps: int) -> dict | None:
    """Soft-label PM trainer vs TRL's plain RewardTrainer on the same token ids."""
    if importlib.util.find_spec("cai.train.pm") is None:
        return None
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    from cai.train import pm

    rows = [{"id": p.id, "prompt": [{"role": "user", "content": p.prompt}],
             "chosen": [{"role": "assistant", "content": p.response_a}],
             "rejected": [{"role": "assistant", "content": p.response_b}],
             "p_chosen": 0.7, "weight": 1.0, "source": "labels", "tie_flag": False}
            for p in synthetic_pairs(pairs, seed=1)]
    cfg = pm.PMConfig(model=str(policy), out=str(tmp / "pm-out"), max_steps=steps,
                      batch_size=4, lora=True, eval_fraction=0.0, seed=0)

    def soft() -> float:
        return pm.train_pm(rows, cfg).seconds

    def plain() -> float:
        t = time.perf_counter()
        tok = pm.load_tokenizer(policy)
        set_seed(cfg.seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        data = [{"chosen_ids": pm.encode_pm(tok, r["prompt"], r["chosen"][-1]["content"], cfg.max_length),
                 "rejected_ids": pm.encode_pm(tok, r["prompt"], r["rejected"][-1]["content"], cfg.max_length)}
                for r in rows]
        args = pm.trainer_args(RewardConfig, cfg, None, max_length=None, pad_to_multiple_of=None,
                               center_rewards_coefficient=None)
        lora = LoraConfig(task_type="SEQ_CLS", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=0.0, target_modules="all-linear", modules_to_save=["score"])
        trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(data),
                                processing_class=tok, peft_config=lora)
        trainer.train()
        trainer.model.merge_and_unload()
        return time.perf_counter() - t

    soft(), plain()  # warm-up: imports, kernels, file cache
    times: dict[str, list[float]] = {"soft": [], "plain": []}
    for _ in range(reps):  # alternated, best of `reps`: the machine is shared and noisy
        times["soft"].append(soft())
        times["plain"].append(plain())
    soft_s, plain_s = min(times["soft"]), min(times["plain"])
    n = steps * cfg.batch_size
    row = {"steps": steps, "pairs_per_step": cfg.batch_size, "pairs": pairs,
           "soft_s": round(soft_s, 2), "plain_s": round(plain_s, 2),
           "soft_pairs_per_s": round(n / soft_s, 3), "plain_pairs_per_s": round(n / plain_s, 3),
           "soft_overhead_pct": round((soft_s / plain_s - 1) * 100, 1),
           "runs_s": {k: [round(x, 2) for x in v] for k, v in times.items()}}
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="RL steps per run (the first is warm-up)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", default=None, help="policy model spec (default: a random small Llama)")
    ap.add_argument("--pm-steps", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 RL steps, 16 tokens, 4 PM steps")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.max_new_tokens, args.pm_steps = 3, 16, 4

    import torch
    import transformers

    from cai.core.models import local_path
    from cai.train.rewards import PMReward
    from cai.train.rl import RLConfig

    torch.set_num_threads(os.cpu_count() or 1)
    load_start = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        hidden, layers = (64, 2) if args.quick else (256, 4)
        policy, pm_path = random_models(tmp, hidden, layers)
        if args.model:
            policy = local_path(args.model)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n"
                                   for p in synthetic_pairs(32, seed=0)))
        reward = PMReward(pm_path, batch_size=8)
        # Every generate call (ours and TRL's, LoRA or not) ends in GenerationMixin.generate.
        gen = Timer()
        transformers.GenerationMixin.generate = gen.wrap(transformers.GenerationMixin.generate)
        base = dict(model=str(policy), reward=f"pm:{pm_path}", prompts=str(prompts),
                    steps=args.steps, batch_size=8, max_new_tokens=args.max_new_tokens,
                    learning_rate=1e-4, lora=True, save_every=0, seed=0)
        runs = [("ppo", RLConfig(algo="ppo", out=str(tmp / "ppo"), **base)),
                ("ppo_matched", RLConfig(algo="ppo", out=str(tmp / "ppo1"), ppo_epochs=1,
                                         minibatch_size=8, **base)),
                ("rloo", RLConfig(algo="rloo", out=str(tmp / "rloo"), num_generations=4, **base))]
        rl_rows = {name: bench_rl(name, cfg, reward, gen) for name, cfg in runs}
        pm_row = bench_pm(policy, args.pm_steps, 32, tmp, 1 if args.quick else 2)
        vllm_cfg = RLConfig(algo="ppo", out=str(tmp / "ppo-vllm"), rollout_engine="vllm", **base)
        rl_rows["ppo_vllm"] = bench_rl("ppo_vllm", vllm_cfg, reward, gen)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    model_desc = args.model or f"random-llama(layers={layers}, hidden={hidden}, vocab=49152)"
    summary = {"bench": "train", "model": model_desc, "threads": torch.get_num_threads(),
               "device": "cuda" if torch.cuda.is_available() else "cpu",
               "max_new_tokens": args.max_new_tokens,
               "loadavg_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
               "rl": rl_rows, "pm": pm_row,
               "ppo_vs_rloo_samples_per_s": round(rl_rows["ppo"]["samples_per_s"]
                                                  / rl_rows["rloo"]["samples_per_s"], 3),
               "ppo_matched_vs_rloo_samples_per_s": round(rl_rows["ppo_matched"]["samples_per_s"]
                                                          / rl_rows["rloo"]["samples_per_s"], 3),
               "ppo_vllm_over_hf": round(rl_rows["ppo_vllm"]["samples_per_s"]
                                         / rl_rows["ppo"]["samples_per_s"], 3),
               "ppo_vllm_over_hf_generation": round(rl_rows["ppo"]["generation_s"]
                                                    / rl_rows["ppo_vllm"]["generation_s"], 3)}
    out = ROOT / "benchmarks" / "results" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    line = {"bench": "train", "model": model_desc,
            **{f"{k}_samples_per_s": r["samples_per_s"] for k, r in rl_rows.items()},
            **{f"{k}_generation_share": r["generation_share"] for k, r in rl_rows.items()},
            "ppo_vs_rloo": summary["ppo_vs_rloo_samples_per_s"],
            "ppo_matched_vs_rloo": summary["ppo_matched_vs_rloo_samples_per_s"],
            "ppo_vllm_over_hf": summary["ppo_vllm_over_hf"]}
    if pm_row:
        line.update({"pm_soft_pairs_per_s": pm_row["soft_pairs_per_s"],
                     "pm_plain_pairs_per_s": pm_row["plain_pairs_per_s"],
                     "pm_soft_overhead_pct": pm_row["soft_overhead_pct"]})
    print(json.dumps(line))


if __name__ == "__main__":
    main()
