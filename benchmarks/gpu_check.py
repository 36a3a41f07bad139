"""GPU acceptance run: the code paths only a GPU exercises, in one script of ≤ 8 minutes.

    python benchmarks/gpu_check.py [--out FILE] [--only peak,pipeline,scores,ppo,train]
    python benchmarks/gpu_check.py --only known-answer     (about ten minutes more)

Sections, each timed and recorded even when another fails (the JSON is rewritten after
every section, so a run cut short keeps what it measured):
- peak: the GPU's dense bf16 matmul peak (8192² matmuls), the yardstick of `train`;
- pipeline: `cai pipeline run configs/tiny.yaml` with bf16 training (sft, pm, rl, dpo) on
  the embedded model — every stage on the GPU;
- scores: A/B choice log-probs of the same judge prompts from transformers and from vLLM,
  in fp32 and in bf16: max |Δ logp| per dtype;
- ppo: PPO samples/s and the step's time split on a ~1B random Llama, rollouts by
  transformers and by vLLM (weights synced after every update), with vLLM's sampling
  log-prob gap;
- train: one PM and one DPO training step (full weights, bf16) on the same model as a
  fraction of the bf16 peak (6·N FLOPs per token for a forward + backward, 2·N more for
  DPO's reference forward);
- memory: every trainer (sft, pm, dpo, rl with ppo, rloo and grpo) in bf16 with gradient
  checkpointing, full weights, on the embedded model: peak GPU memory beside
  `cai plan memory`'s estimate for the same config;
- known-answer (only when named in --only: it takes about ten minutes by itself): the full
  known-answer run, configs/known-answer-gpu.yaml, checked against its targets
  (benchmarks/gpu_known_answer.py; it also writes results/known_answer_gpu.json);
and the peak GPU memory of each section. Writes benchmarks/results/gpu_check.json (or
--out). Without a CUDA GPU it says so in one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SECTIONS = ("peak", "pipeline", "scores", "ppo", "train", "memory", "known-answer")
DEFAULT_SECTIONS = ("peak", "pipeline", "scores", "ppo", "train", "memory")


def bf16_peak(torch) -> dict:
    """Dense bf16 matmul throughput, best of a few timed rounds."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 20 * 2 * n**3 / (time.perf_counter() - t))
    return {"bf16_tflops": round(best / 1e12, 1)}


def run_pipeline(tmp: Path) -> dict:
    """The tiny pipeline, every stage, bf16 training, in a subprocess (its own CUDA state)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    for stage in ("sft", "pm", "rl", "dpo"):
        cfg.setdefault(stage, {})["dtype"] = "bfloat16"
    path = tmp / "tiny-bf16.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cai.cli", "pipeline", "run", str(path), "--out",
                        str(tmp / "pipeline")], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    row = {"returncode": r.returncode, "seconds": round(time.perf_counter() - t, 1),
           "stages": sorted(p.parent.name for p in (tmp / "pipeline").glob("*/manifest.json"))}
    if r.returncode:
        row["stderr_tail"] = r.stderr[-1500:]
    return row


def judge_requests(n: int):
    from common import synthetic_pairs

    from cai.backends.base import ScoreRequest

    out = []
    for p in synthetic_pairs(n, seed=3):
        chat = [{"role": "user", "content": f"{p.prompt}\n\n(A) {p.response_a}\n\n(B) "
                 f"{p.response_b}\n\nWhich answer is more helpful and harmless? Answer A or B."}]
        out.append(ScoreRequest(chat, "The better answer is ("))
    return out


def compare_scores(torch) -> dict:
    """Max |Δ logp| between transformers and vLLM on the same prompts, per dtype."""
    import numpy as np

    from cai.backends import load_backend

    reqs = judge_requests(32)
    row = {}
    for dtype in ("float32", "bfloat16"):
        hf = load_backend(f"hf:embedded:smollm2-135m?dtype={dtype}&progress=0", reuse=False)
        a = hf.choice_logprobs(reqs).logprobs
        del hf
        gc.collect()
        torch.cuda.empty_cache()
        vl = load_backend(f"vllm:embedded:smollm2-135m?dtype={dtype}&gpu_memory_utilization=0.3",
                          reuse=False)
        b = vl.choice_logprobs(reqs).logprobs
        del vl
        gc.collect()
        torch.cuda.empty_cache()
        row[dtype] = {"max_abs_delta_logp": float(np.nanmax(np.abs(a - b))),
                      "mean_abs_delta_logp": float(np.nanmean(np.abs(a - b)))}
    return row


def random_models(tmp: Path, torch, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """A random Llama (saved in bf16) and a small random one-logit PM, both with the
    embedded model's tokenizer; returns their folders and the policy's parameter count."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    from cai.core.models import local_path

    tok = AutoTokenizer.from_pretrained(str(local_path("embedded:smollm2-135m")))
    torch.manual_seed(0)
    heads = hidden // 64
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 4), max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    policy, pm = tmp / "policy", tmp / "pm"
    model.save_pretrained(str(policy))
    tok.save_pretrained(str(policy))
    del model
    pm_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(pm_cfg).save_pretrained(str(pm))
    tok.save_pretrained(str(pm))
    gc.collect()
    torch.cuda.empty_cache()
    return policy, pm, n_params


def ppo_throughput(tmp: Path, policy: Path, pm: Path, torch) -> dict:
    """PPO with hf and vLLM rollouts: samples/s after a warm-up step, and the split."""
    from common import synthetic_pairs

    from cai.train.rl import RLConfig, run_rl

    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n"
                               for p in synthetic_pairs(64, seed=0)))
    rows = {}
    for engine in ("hf", "vllm"):
        torch.cuda.reset_peak_memory_stats()
        cfg = RLConfig(algo="ppo", model=str(policy), reward=f"pm:{pm}", prompts=str(prompts),
                       out=str(tmp / f"ppo-{engine}"), steps=4, batch_size=16, minibatch_size=8,
                       ppo_epochs=1, max_new_tokens=128, learning_rate=1e-5, lora=True, dtype="bfloat16",
                       save_every=0, rollout_engine=engine, vllm_gpu_memory_utilization=0.3)
        t = time.perf_counter()
        run_rl(cfg)
        wall = time.perf_counter() - t
        log = [json.loads(x) for x in (Path(cfg.out) / "log.jsonl").read_text().splitlines()][1:]
        split = {k: statistics.mean(r.get(f"time_{k}_s", 0.0) for r in log)
                 for k in ("generation", "reference_reward", "update", "sync")}
        step = sum(split.values())
        rows[engine] = {"samples_per_s": round(cfg.batch_size / step, 3),
                        "split_s": {k: round(v, 3) for k, v in split.items()},
                        "response_length": statistics.mean(r["response_length"] for r in log),
                        "run_wall_s": round(wall, 1),
                        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if engine == "vllm":
            rows[engine]["rollout_logp_abs_diff_max"] = max(r["rollout_logp_abs_diff"] for r in log)
        gc.collect()
        torch.cuda.empty_cache()
    rows["ppo_vllm_over_hf"] = round(rows["vllm"]["samples_per_s"] / rows["hf"]["samples_per_s"], 3)
    return rows


class StepTimer:
    """A TrainerCallback recording each optimizer step's wall time (GPU synchronised)."""

    def __init__(self, torch):
        from transformers import TrainerCallback

        timer = self
        self.times: list[float] = []

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                torch.cuda.synchronize()
                timer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                timer.times.append(time.perf_counter() - timer._t)

        self.callback = _CB()


def train_fraction(tmp: Path, policy: Path, n_params: int, peak_tflops: float, torch) -> dict:
    """PM and DPO step time on the ~1B model, as a fraction of the bf16 peak."""
    from common import synthetic_pairs

    from cai.train import dpo, pm

    rows = [{"id": p.id, "prompt": [{"role": "user", "content": p.prompt}],
             "chosen": [{"role": "assistant", "content": p.response_a}],
             "rejected": [{"role": "assistant", "content": p.response_b}],
             "p_chosen": 0.7, "weight": 1.0, "source": "labels", "tie_flag": False}
            for p in synthetic_pairs(64, seed=1)]
    tok = pm.load_tokenizer(policy)
    tokens_per_pair = statistics.mean(
        len(pm.encode_pm(tok, r["prompt"], r["chosen"][-1]["content"]))
        + len(pm.encode_pm(tok, r["prompt"], r["rejected"][-1]["content"])) for r in rows)
    out = {"params": n_params, "tokens_per_pair": round(tokens_per_pair, 1)}
    batch, steps = 8, 8
    for name, flops_per_token in (("pm", 6), ("dpo", 8)):
        torch.cuda.reset_peak_memory_stats()
        timer = StepTimer(torch)
        common = dict(model=str(policy), max_steps=steps, batch_size=batch, lora=False,
                      dtype="bfloat16", eval_fraction=0.0, seed=0)
        if name == "pm":
            pm.train_pm(rows, pm.PMConfig(out=str(tmp / "pm-out"), **common),
                        callbacks=[timer.callback])
        else:
            dpo.train_dpo(rows, dpo.DPOTrainConfig(out=str(tmp / "dpo-out"), **common),
                          callbacks=[timer.callback])
        step_s = statistics.median(timer.times[2:] or timer.times)  # after warm-up
        flops = flops_per_token * n_params * tokens_per_pair * batch
        out[name] = {"step_s": round(step_s, 4), "tflops": round(flops / step_s / 1e12, 1),
                     "fraction_of_peak": round(flops / step_s / 1e12 / peak_tflops, 3),
                     "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        gc.collect()
        torch.cuda.empty_cache()
    return out


def trainers_memory(tmp: Path, torch, model: str = "embedded:smollm2-135m") -> dict:
    """Each trainer for a few steps (bf16, checkpointing, full weights, embedded model):
    peak allocated GPU memory against the plan's per-process total."""
    from common import synthetic_pairs

    from cai.train.dpo import DPOTrainConfig, run_dpo
    from cai.train.memory_plan import Setting, plan_memory
    from cai.train.pm import PMConfig, run_pm
    from cai.train.rl import RLConfig, run_rl
    from cai.train.sft import SFTConfig, run_sft

    pairs = synthetic_pairs(64, seed=2)
    data = tmp / "mem-data"
    data.mkdir(exist_ok=True)
    (data / "sft.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.response_a}]})
        + "\n" for p in pairs))
    (data / "prefs.jsonl").write_text("".join(json.dumps({
        "id": p.id, "prompt": [{"role": "user", "content": p.prompt}],
        "chosen": [{"role": "assistant", "content": p.response_a}],
        "rejected": [{"role": "assistant", "content": p.response_b}], "p_chosen": 0.7})
        + "\n" for p in pairs))
    (data / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p.prompt}) + "\n"
                                                for p in pairs))
    common = dict(model=model, lora=False, dtype="bfloat16",
                  gradient_checkpointing=True)
    pref = dict(preferences=str(data / "prefs.jsonl"), max_steps=3, batch_size=4, max_length=256,
                eval_fraction=0.0, **common)
    runs = [("sft", SFTConfig(data=str(data / "sft.jsonl"), out=str(tmp / "m-sft"), max_steps=3,
                              batch_size=4, max_length=256, **common), run_sft, None),
            ("pm", PMConfig(out=str(tmp / "m-pm"), **pref), run_pm, None),
            ("dpo", DPOTrainConfig(out=str(tmp / "m-dpo"), **pref), run_dpo, None)]
    rl = dict(reward=f"pm:{tmp / 'm-pm'}", prompts=str(data / "prompts.jsonl"), steps=2,
              batch_size=4, max_new_tokens=32, save_every=0, **common)
    for algo in ("ppo", "rloo", "grpo"):
        extra = {"minibatch_size": 4, "ppo_epochs": 1} if algo == "ppo" else {"num_generations": 2}
        runs.append((f"rl-{algo}", RLConfig(algo=algo, out=str(tmp / f"m-rl-{algo}"), **rl,
                                            **extra), run_rl, Setting(seq_len=96)))
    out = {}
    for name, cfg, fn, setting in runs:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row: dict = {}
        try:
            fn(cfg)
            row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        except Exception as exc:  # one trainer failing must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        plan = plan_memory(name.split("-")[0], cfg, setting)
        row["plan_gb"] = round(plan["total_bytes"] / 2**30, 3)
        row["plan_parts_gb"] = {k: round(v / 2**30, 3) for k, v in plan["bytes"].items()}
        if "peak_gb" in row:
            row["plan_over_peak"] = round(row["plan_gb"] / max(row["peak_gb"], 1e-9), 3)
        out[name] = row
    out["ok_trainers"] = sum("error" not in v for v in out.values() if isinstance(v, dict))
    return out
def known_answer_section(tmp: Path) -> dict:
    """The full known-answer run and its targets (benchmarks/gpu_known_answer.py); the
    section is not ok when a target is missed."""
    from gpu_known_answer import ROOT as KA_ROOT
    from gpu_known_answer import run_known_answer_gpu

    row = run_known_answer_gpu(tmp / "known-answer-gpu")
    (KA_ROOT / "benchmarks" / "results" / "known_answer_gpu.json").write_text(
        json.dumps({"bench": "known_answer_gpu", **row}, indent=2) + "\n")
    missed = [k for k, ok in row["checks"].items() if not ok]
    return {**row, "ok": not missed, "missed": missed}  # a missed target fails the section


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help="comma-separated sections")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is present (torch.cuda.is_available() is False); this "
              "script checks the GPU code paths and runs only on a machine with a GPU",
              file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(f"gpu_check: --only: unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    import vllm

    res: dict = {"bench": "gpu_check", "device": torch.cuda.get_device_name(0),
                 "torch": torch.__version__, "vllm": vllm.__version__, "sections": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    state: dict = {}

    def section(name: str, fn) -> None:
        if name not in only:
            return
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            row = {"ok": True, **fn()}
        except Exception as exc:  # one failing section must not lose the others
            row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                   "traceback": traceback.format_exc()[-2000:]}
        row["seconds"] = round(time.perf_counter() - t, 1)
        row.setdefault("peak_memory_gb", round(torch.cuda.max_memory_allocated() / 2**30, 2))
        res["sections"][name] = row
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps({name: {k: v for k, v in row.items() if k != "traceback"}}),
              file=sys.stderr, flush=True)

    section("peak", lambda: bf16_peak(torch))
    peak = res["sections"].get("peak", {}).get("bf16_tflops") or 989.0
    section("pipeline", lambda: run_pipeline(tmp))
    section("scores", lambda: compare_scores(torch))

    def models() -> tuple[Path, Path, int]:
        if "models" not in state:
            state["models"] = random_models(tmp, torch, hidden=2048, layers=20)
        return state["models"]

    section("ppo", lambda: ppo_throughput(tmp, *models()[:2], torch))
    section("train", lambda: train_fraction(tmp, models()[0], models()[2], peak, torch))
    section("memory", lambda: trainers_memory(tmp, torch))
    section("known-answer", lambda: known_answer_section(tmp))
    summary = {"bench": "gpu_check", "device": res["device"],
               "ok": {k: v["ok"] for k, v in res["sections"].items()}}
    print(json.dumps(summary))
    return 0 if all(summary["ok"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
