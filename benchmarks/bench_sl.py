"""SL stage throughput: the batched stage vs a one-prompt-at-a-time loop, same model, same run.

    python benchmarks/bench_sl.py [--prompts 8] [--rounds 2] [--max-new-tokens 32]

Writes benchmarks/results/sl.json and prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", default="embedded:smollm2-135m")
    args = ap.parse_args()

    import torch

    from cai.backends import load_backend
    from cai.sl import SLConfig, run_sl

    torch.set_num_threads(os.cpu_count() or 1)
    backend = load_backend(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sl-"))
    base = dict(prompts=str(ROOT / "prompts" / "red_team.jsonl"),
                constitution=str(ROOT / "constitutions" / "harmless.yaml"), rounds=args.rounds,
                max_new_tokens=args.max_new_tokens, few_shot=1, seed=0, limit=args.prompts)
    results = {}
    try:
        # Batched: all prompts move through each round together.
        t = time.perf_counter()
        run_sl(SLConfig(**base, out=str(tmp / "batched")), backend)
        results["batched"] = time.perf_counter() - t
        # Naive: the same stage, one prompt per backend call (chunk of one).
        t = time.perf_counter()
        run_sl(SLConfig(**base, out=str(tmp / "naive"), chunk_size=1), backend)
        results["naive"] = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.prompts
    summary = {
        "bench": "sl", "model": args.model, "prompts": n, "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
        "records_per_s_batched": round(n / results["batched"], 4),
        "records_per_s_naive": round(n / results["naive"], 4),
        "speedup": round(results["naive"] / results["batched"], 3),
        "seconds": {k: round(v, 2) for k, v in results.items()},
    }
    out = ROOT / "benchmarks" / "results" / "sl.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
