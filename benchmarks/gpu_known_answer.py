"""The full known-answer run on a GPU, checked against its targets.

    python benchmarks/gpu_known_answer.py [--out FILE] [--run FOLDER]

Runs configs/known-answer-gpu.yaml (sl → sft → label → pm ×2 → rl → dpo → eval), PPO on
the noisy gold and on its negation (configs/known-answer-direct.yaml, GPU-sized here), and
`cai eval known-answer`, then checks what two CPU cores cannot reach:
- pm_gold_accuracy ≥ 0.85 (the train PM against the exact gold on held-out answers);
- rl_minus_sl_gold.ci_low > 0 and dpo_minus_sl_gold.ci_low > 0;
- rl_direct_minus_sl_gold.ci_low > 0 and rl_direct_negated_minus_sl_gold.ci_high < 0;
- every reported overoptimization fit made through ≥ 5 points, and the best-of-n fit
  reported at all.
Writes benchmarks/results/known_answer_gpu.json (or --out): the checks, the figures and
each stage's seconds. `benchmarks/gpu_check.py` runs it as its `known-answer` section.
Exit code 0 when every check holds, 1 when one fails, 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "known-answer-gpu.yaml"
DIRECT = ROOT / "configs" / "known-answer-direct.yaml"
REWARD = "python:cai.evaluate.known_answer"
PM_TARGET = 0.85
MIN_POINTS = 5
# The direct PPO runs, sized for the GPU (the CPU sizes are in known-answer-direct.yaml).
DIRECT_GPU = ["--steps", "30", "--batch-size", "32", "--minibatch-size", "8",
              "--max-new-tokens", "48", "--dtype", "bfloat16"]
EVAL_GPU = ["--samples", "4", "--best-of", "32", "--max-new-tokens", "48", "--batch-size", "64"]


def _cai(*args: str, timeout: int) -> dict:
    """One `cai` command in a subprocess (its own CUDA state); its time and, on failure, the
    end of its stderr."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cai.cli", *args], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    row = {"returncode": r.returncode, "seconds": round(time.perf_counter() - t, 1)}
    if r.returncode:
        row["stderr_tail"] = r.stderr[-1500:]
    return row


def checks(result: dict) -> dict[str, bool]:
    """Each target of the full run, true when the json meets it."""

    def low(key: str) -> float | None:
        return (result.get(key) or {}).get("ci_low")

    def high(key: str) -> float | None:
        return (result.get(key) or {}).get("ci_high")

    fits = [f for curve in ("bon_fit", "rl_fit") for f in (result.get(curve) or {}).values()
            if f and f.get("reported")]
    acc = result.get("pm_gold_accuracy")
    return {
        "pm_gold_accuracy_ge_0.85": acc is not None and acc >= PM_TARGET,
        "rl_minus_sl_gold_ci_low_gt_0": (low("rl_minus_sl_gold") or 0.0) > 0,
        "dpo_minus_sl_gold_ci_low_gt_0": (low("dpo_minus_sl_gold") or 0.0) > 0,
        "rl_direct_minus_sl_gold_ci_low_gt_0": (low("rl_direct_minus_sl_gold") or 0.0) > 0,
        "rl_direct_negated_minus_sl_gold_ci_high_lt_0":
            (high("rl_direct_negated_minus_sl_gold") or 0.0) < 0,
        "bon_fit_reported": bool((result.get("bon_fit") or {}).get("bon", {}).get("reported")),
        "every_reported_fit_has_5_points": all(f["points"] >= MIN_POINTS for f in fits),
    }


def run_known_answer_gpu(run: Path, timeout: int = 1500) -> dict:
    """The whole run in `run`, then its checks and headline figures."""
    t0 = time.time()
    steps = {"pipeline": _cai("pipeline", "run", str(CONFIG), "--out", str(run),
                              timeout=timeout)}
    for folder, fn in (("rl-direct", "noisy_valence"),
                       ("rl-direct-negated", "negated_noisy_valence")):
        if steps["pipeline"]["returncode"] == 0:
            steps[folder] = _cai("train", "rl", "--config", str(DIRECT), "--model",
                                 str(run / "sft"), "--prompts",
                                 str(run / "prompts" / "red_team.train.jsonl"),
                                 "--reward", f"{REWARD}:{fn}", "--out", str(run / folder),
                                 *DIRECT_GPU, timeout=timeout)
    ka = run / "known-answer" / "known_answer.json"
    if all(s["returncode"] == 0 for s in steps.values()):
        steps["eval"] = _cai("eval", "known-answer", str(run), *EVAL_GPU, "--started",
                             str(t0), timeout=timeout)
    row: dict = {"steps": steps, "wall_s": round(time.time() - t0, 1)}
    if not ka.is_file():
        row["checks"] = {"run_finished": False}
        return row
    result = json.loads(ka.read_text(encoding="utf-8"))
    row["checks"] = checks(result)
    row["figures"] = {k: result.get(k) for k in (
        "pm_gold_accuracy", "pm_gold_accuracy_ci", "test_pm_gold_accuracy", "pm_gold_pairs",
        "rl_minus_sl_gold", "dpo_minus_sl_gold", "rl_direct_minus_sl_gold",
        "rl_direct_negated_minus_sl_gold", "base_rate", "bon_fit", "rl_fit")}
    row["stages_s"] = (result.get("machine") or {}).get("stages_s")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "known_answer_gpu.json"))
    ap.add_argument("--run", default=str(ROOT / "runs" / "known-answer-gpu"))
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_known_answer: no CUDA GPU is present; the full known-answer run is sized "
              "for one (the CPU evidence is `make known-answer`)", file=sys.stderr)
        return 2
    row = {"bench": "known_answer_gpu", "device": torch.cuda.get_device_name(0),
           **run_known_answer_gpu(Path(args.run))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps({"checks": row["checks"], "wall_s": row["wall_s"]}))
    return 0 if row["checks"] and all(row["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
