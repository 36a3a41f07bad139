"""Labelling throughput: a naive one-call-per-prompt loop vs the label stage (hf, and vLLM).

    python benchmarks/bench_label.py [--pairs 64] [--ks 1,4,16] [--quick] [--no-vllm]

On the embedded model, 64 pairs × K principles × 2 orders (fewer pairs at K = 16), the same
judge prompts for every method: comparisons/s, the speedup over the naive loop, the ideal
speedup (naive tokens ÷ unique tokens) and the fraction of the fp32 matmul peak measured in
the same run. Writes benchmarks/results/label.json and prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import judge_requests, matmul_peak_flops, record_results, scoring_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--ks", default="1,4,16")
    ap.add_argument("--quick", action="store_true", help="8 pairs, K = 1 and 4, no vLLM")
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",") if not (args.quick and int(k) > 4)]
    n_pairs = 8 if args.quick else args.pairs

    import numpy as np
    import torch

    from cai.backends.hf import HFBackend, HFOptions
    from cai.constitution import load
    from cai.judge import JudgeConfig, judge_pairs

    torch.set_num_threads(os.cpu_count() or 1)
    c = load(ROOT / "constitutions" / "harmless.yaml")
    spec = "embedded:smollm2-135m"
    hf = HFBackend(spec, options=HFOptions(progress=False))
    naive = HFBackend(spec, model=hf.model, tokenizer=hf.tok,
                      options=HFOptions(progress=False, batch_size=1, min_shared_tokens=10**9,
                                      scoring="trie", prefix_cache_mb=0))
    vllm = None
    if not (args.quick or args.no_vllm):
        try:
            from cai.backends.vllm import VLLMBackend

            vllm = VLLMBackend("vllm:" + spec)
        except Exception as exc:  # noqa: BLE001 - report what could not run, measure the rest
            print(f"vllm unavailable: {exc}", file=sys.stderr)

    def stage(backend):
        def run(pairs, k):
            recs = judge_pairs(pairs, c, backend, JudgeConfig(principles=k), 0)
            return [[j.logprob_a, j.logprob_b] for r in recs for j in r.judgements]
        return run

    def naive_loop(pairs, k):  # one backend call per judge prompt, no sharing, no batching
        return np.concatenate([naive.choice_logprobs([r]).logprobs
                               for r in judge_requests(pairs, c, k)])

    params = sum(p.numel() for p in hf.model.parameters())
    emb = hf.model.get_input_embeddings().weight.numel()
    peak = matmul_peak_flops()
    rows = scoring_rows({"naive": naive_loop, "stage_hf": stage(hf),
                         "stage_vllm": stage(vllm) if vllm else None},
                        lambda r: hf.encode(hf.render(r.chat, r.answer_prefix)), ks, n_pairs, c,
                        params, emb, peak, log=lambda row: print(json.dumps(row), file=sys.stderr))
    peak_end = matmul_peak_flops()
    summary = {"bench": "label", "model": spec, "threads": torch.get_num_threads(),
               "matmul_peak_gflops": round(peak / 1e9, 1),
               "matmul_peak_gflops_end": round(peak_end / 1e9, 1), "params": params,
               "pack_tokens": hf.options.pack_tokens, "results": rows}
    record_results("label", min(peak, peak_end), summary)
    line = {"bench": "label", "peak_gflops": summary["matmul_peak_gflops"]}
    for r in rows:
        line[f"K{r['K']}"] = {k: r.get(k) for k in (
            "ideal_speedup", "stage_hf_speedup", "stage_hf_speedup_over_ideal",
            "stage_hf_flops_fraction", "stage_vllm_speedup", "stage_hf_comparisons_per_s")}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
