"""Ray engine vs local engine on the same cores and input: `cai label`, side by side in one run.

Both label the same synthetic pairs with the same judge. The local engine runs one process
with all cores' threads; the Ray engine runs `workers` actors with one thread each (a
cluster already started, as in real use; its start-up time is reported apart). Also
measures the judge tokens per pair, from which the README's sizing example is derived.
Writes benchmarks/results/ray.json and prints a JSON line last.

    python benchmarks/bench_ray.py [--pairs 48] [--workers 2] [--model SPEC] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--principles", type=int, default=4)
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="12 pairs, for a smoke run")
    args = ap.parse_args()
    n_pairs = 12 if args.quick else args.pairs

    import torch
    from common import synthetic_pairs, unique_tokens

    from cai.backends import load_backend
    from cai.constitution import load
    from cai.core.distributed import init_ray
    from cai.judge import JudgeConfig, _plan
    from cai.label import LabelConfig, run_label

    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    pairs_file = tmp / "pairs.jsonl"
    pairs = synthetic_pairs(n_pairs, seed=0)
    pairs_file.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "response_a": p.response_a,
                                              "response_b": p.response_b}) + "\n" for p in pairs))
    c = load("harmless")
    spec = args.model + ("&" if "?" in args.model else "?") + "progress=0"
    base = dict(pairs=str(pairs_file), constitution="harmless", feedback_model=spec,
                judge=JudgeConfig(principles=args.principles), chunk_size=4)

    # Tokens per pair: what a judge reads for one pair (K principles x 2 orders).
    hf = load_backend(spec)
    seqs = [hf.fmt.encode_chat(q.request.chat, q.request.answer_prefix)
            for q in _plan(pairs, c, JudgeConfig(principles=args.principles), 0)]
    tokens_total = sum(len(s) for s in seqs) / n_pairs
    tokens_unique = unique_tokens(seqs) / n_pairs

    torch.set_num_threads(args.workers)
    t = time.perf_counter()
    run_label(LabelConfig(**base, out=str(tmp / "local")))
    local_s = time.perf_counter() - t

    t = time.perf_counter()
    init_ray(num_cpus=args.workers)
    ray_start_s = time.perf_counter() - t
    os.environ["OMP_NUM_THREADS"] = "1"
    t = time.perf_counter()
    run_label(LabelConfig(**base, out=str(tmp / "ray"), engine="ray", workers=args.workers))
    ray_s = time.perf_counter() - t

    same = _same(tmp / "local" / "data.jsonl", tmp / "ray" / "data.jsonl")
    # Sizing: a 7B judge costs ~2 * 7e9 FLOPs per token read; an H100 at a realistic 40 % of
    # its 989 TFLOP/s dense bf16 peak. Prefix sharing (vLLM) means only unique tokens count.
    h100_flops = 0.4 * 989e12
    per_pair_flops = 2 * 7e9 * tokens_unique
    summary = {
        "bench": "ray", "model": args.model, "pairs": n_pairs, "principles": args.principles,
        "workers": args.workers, "local_s": round(local_s, 2), "ray_s": round(ray_s, 2),
        "ray_cluster_start_s": round(ray_start_s, 2),
        "local_pairs_per_s": round(n_pairs / local_s, 3), "ray_pairs_per_s": round(n_pairs / ray_s, 3),
        "ray_overhead": round(ray_s / local_s - 1, 3), "same_records": same,
        "judge_tokens_per_pair": round(tokens_total, 1),
        "judge_unique_tokens_per_pair": round(tokens_unique, 1),
        "sizing_7b_pairs_per_h100_hour": round(3600 * h100_flops / per_pair_flops),
    }
    out = ROOT / "benchmarks" / "results" / "ray.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary))


def _same(a: Path, b: Path) -> bool:
    ra = {r["id"]: r["p_a"] for r in map(json.loads, a.read_text().splitlines())}
    rb = {r["id"]: r["p_a"] for r in map(json.loads, b.read_text().splitlines())}
    return ra.keys() == rb.keys() and all(abs(ra[k] - rb[k]) < 1e-6 for k in ra)


if __name__ == "__main__":
    main()
