"""Labelling throughput: a naive one-call-per-prompt loop vs the label stage (hf, and vLLM).

    python benchmarks/bench_label.py [--pairs 64] [--quick]

On the embedded model: 64 pairs × K = 4 principles × 2 orders (and K = 1 and 16 for the
speedup curve). For each K it reports comparisons/s of each method, the speedup over the
naive loop, the ideal speedup (naive tokens ÷ unique tokens: a prefix shared by several
prompts counted once) and `flops_fraction` = 2·params·unique tokens/s over the fp32 matmul
peak measured in the same run. Writes benchmarks/results/label.json; prints a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import matmul_peak_flops, synthetic_pairs, unique_tokens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--ks", default="1,4,16")
    ap.add_argument("--quick", action="store_true", help="8 pairs, K = 1 and 4, no vLLM")
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    n_pairs = 8 if args.quick else args.pairs

    import torch

    from cai.backends.hf import HFBackend, HFOptions
    from cai.constitution import load
    from cai.feedback import LabelConfig, _plan, judge_pairs

    torch.set_num_threads(os.cpu_count() or 1)
    c = load(ROOT / "constitutions" / "harmless.yaml")
    spec = "embedded:smollm2-135m"
    stage_hf = HFBackend(spec, options=HFOptions(progress=False))
    naive_hf = HFBackend(spec, model=stage_hf.model, tokenizer=stage_hf.tok,
                         options=HFOptions(progress=False, batch_size=1, min_shared_tokens=10**9))
    params = sum(p.numel() for p in stage_hf.model.parameters())
    emb = stage_hf.model.get_input_embeddings().weight.numel()
    vllm = None
    if not (args.quick or args.no_vllm):
        try:
            from cai.backends.vllm import VLLMBackend

            vllm = VLLMBackend("vllm:" + spec)
        except Exception as exc:  # noqa: BLE001 - the benchmark reports what it could not run
            print(f"vllm unavailable: {exc}", file=sys.stderr)
    peak = matmul_peak_flops()
    results = []
    for k in ks:
        if args.quick and k > 4:
            continue
        n = n_pairs if k <= 4 else max(8, n_pairs // 8)
        pairs = synthetic_pairs(n, seed=k)
        cfg = LabelConfig(pairs="-", principles=k, orders="both", seed=0)
        reqs = [q.request for q in _plan(pairs, c, cfg)]
        seqs = [stage_hf.encode(stage_hf.render(r.chat, r.answer_prefix)) for r in reqs]
        naive_tokens, uniq = sum(len(s) for s in seqs), unique_tokens(seqs)
        row = {"K": k, "pairs": n, "comparisons": len(reqs), "naive_tokens": naive_tokens,
               "unique_tokens": uniq, "ideal_speedup": round(naive_tokens / uniq, 3)}
        # Naive: one backend call per judge prompt, no sharing, no batching.
        t = time.perf_counter()
        naive = [naive_hf.choice_logprobs([r]).logprobs[0] for r in reqs]
        row["naive_s"] = time.perf_counter() - t
        t = time.perf_counter()
        recs = judge_pairs(pairs, c, stage_hf, cfg)
        row["stage_hf_s"] = time.perf_counter() - t
        stage_lp = [x for r in recs for x in ((j.logprob_a, j.logprob_b) for j in r.judgements)]
        row["max_abs_diff_vs_naive"] = float(max(abs(a - b) for a, b in zip(
            [v for pair in stage_lp for v in pair], [float(v) for lp in naive for v in lp])))
        if vllm is not None:
            judge_pairs(pairs[:1], c, vllm, cfg)  # warm-up outside the timing
            t = time.perf_counter()
            judge_pairs(pairs, c, vllm, cfg)
            row["stage_vllm_s"] = time.perf_counter() - t
        for m in ("naive", "stage_hf", "stage_vllm"):
            if f"{m}_s" in row:
                row[f"{m}_comparisons_per_s"] = round(len(reqs) / row[f"{m}_s"], 3)
                row[f"{m}_s"] = round(row[f"{m}_s"], 2)
        row["speedup_hf"] = round(row["naive_s"] / row["stage_hf_s"], 3)
        row["speedup_hf_over_ideal"] = round(row["speedup_hf"] / row["ideal_speedup"], 3)
        if "stage_vllm_s" in row:
            row["speedup_vllm"] = round(row["naive_s"] / row["stage_vllm_s"], 3)
        row["flops_fraction_hf"] = round(2 * params * uniq / row["stage_hf_s"] / peak, 3)
        row["flops_fraction_hf_nonembedding"] = round(
            2 * (params - emb) * uniq / row["stage_hf_s"] / peak, 3)
        row["flops_fraction_naive"] = round(2 * params * naive_tokens / row["naive_s"] / peak, 3)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    summary = {"bench": "label", "model": spec, "threads": torch.get_num_threads(),
               "matmul_peak_gflops": round(peak / 1e9, 1), "params": params,
               "results": results}
    out = ROOT / "benchmarks" / "results" / "label.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    line = {"bench": "label", "peak_gflops": summary["matmul_peak_gflops"]}
    for r in results:
        line[f"K{r['K']}"] = {key: r.get(key) for key in (
            "speedup_hf", "ideal_speedup", "speedup_hf_over_ideal", "flops_fraction_hf",
            "stage_hf_comparisons_per_s", "naive_comparisons_per_s", "speedup_vllm")}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
