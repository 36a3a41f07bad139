"""Backends side by side on the embedded model, in one run.

    python benchmarks/bench_backends.py [--quick] [--no-vllm]

(a) generation tokens/s on 64 prompts: a naive one-prompt loop (over the first 16), batched
    transformers at its default batch size and with all prompts in one batch, vs vLLM;
(b) choice scoring on judge prompts of 64 pairs × K principles × 2 orders (K = 1, 4, 16):
    a naive one-prompt-at-a-time transformers loop vs batched transformers with prefix reuse
    vs vLLM with prefix caching, with the speedup over naive and the ideal one
    (naive tokens ÷ unique tokens);
(c) flops_fraction: 2·params·unique tokens/s over the fp32 matmul peak measured here.
Writes benchmarks/results/backends.json and prints a one-line JSON summary last.
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

from common import judge_requests, matmul_peak_flops, record_results, scoring_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, no vLLM")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--gen-prompts", type=int, default=64)
    ap.add_argument("--naive-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--ks", default="1,4,16")
    args = ap.parse_args()
    n_gen = 4 if args.quick else args.gen_prompts
    n_pairs = 8 if args.quick else args.pairs
    ks = [int(k) for k in args.ks.split(",") if not (args.quick and int(k) > 4)]

    import numpy as np
    import torch

    from cai.backends import GenerationConfig, GenRequest
    from cai.backends.hf import HFBackend, HFOptions
    from cai.constitution import load
    from cai.core.data import load_prompts

    torch.set_num_threads(os.cpu_count() or 1)
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

    # (a) generation: greedy, so every method produces the same amount of work.
    prompts = load_prompts(ROOT / "prompts" / "helpful.jsonl", limit=n_gen)
    reqs = [GenRequest([{"role": "user", "content": p.prompt}], seed=i) for i, p in enumerate(prompts)]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    gen = {"prompts": len(reqs), "naive_prompts": min(args.naive_prompts, len(reqs)),
           "hf_batch_size": hf.options.batch_size}
    wide = HFBackend(spec, model=hf.model, tokenizer=hf.tok,
                     options=HFOptions(progress=False, batch_size=len(reqs)))
    for name, run in (("naive_hf", lambda: [naive.generate([r], cfg)[0]
                                            for r in reqs[:args.naive_prompts]]),
                      ("batched_hf", lambda: hf.generate(reqs, cfg)),
                      ("batched_hf_all", lambda: wide.generate(reqs, cfg)),
                      ("vllm", (lambda: vllm.generate(reqs, cfg)) if vllm else None)):
        if run is None:
            continue
        if name == "vllm":
            vllm.generate(reqs[:1], cfg)  # warm-up
        t = time.perf_counter()
        outs = run()
        secs = time.perf_counter() - t
        tokens = sum(g.tokens for g in outs)
        gen[name] = {"seconds": round(secs, 2), "tokens": tokens, "tokens_per_s": round(tokens / secs, 2)}
        print(json.dumps({"generation": name, **gen[name]}), file=sys.stderr)
    rate = {k: v["tokens_per_s"] for k, v in gen.items() if isinstance(v, dict)}
    if "vllm" in gen:
        gen["vllm_over_batched_hf"] = round(rate["vllm"] / rate["batched_hf"], 3)
        gen["vllm_over_batched_hf_all"] = round(rate["vllm"] / rate["batched_hf_all"], 3)
    gen["batched_over_naive_hf"] = round(rate["batched_hf"] / rate["naive_hf"], 3)

    # (b) + (c) scoring at the backend level on the label stage's judge prompts.
    c = load(ROOT / "constitutions" / "harmless.yaml")

    def backend_fn(backend):
        if backend is None:
            return None
        return lambda pairs, k: backend.choice_logprobs(judge_requests(pairs, c, k)).logprobs

    def naive_loop(pairs, k):
        return np.concatenate([naive.choice_logprobs([r]).logprobs for r in judge_requests(pairs, c, k)])

    params = sum(p.numel() for p in hf.model.parameters())
    emb = hf.model.get_input_embeddings().weight.numel()
    peak = matmul_peak_flops()
    methods = {"naive_hf": naive_loop, "hf_prefix": backend_fn(hf), "vllm_prefix": backend_fn(vllm)}
    rows = scoring_rows(methods,
                        lambda r: hf.encode(hf.render(r.chat, r.answer_prefix)), ks, n_pairs, c,
                        params, emb, peak, log=lambda row: print(json.dumps(row), file=sys.stderr))
    summary = {"bench": "backends", "model": spec, "threads": torch.get_num_threads(),
               "matmul_peak_gflops": round(peak / 1e9, 1), "params": params,
               "generation": gen, "scoring": rows}
    peak_end = matmul_peak_flops()
    summary["matmul_peak_gflops_end"] = round(peak_end / 1e9, 1)
    record_results("backends", min(peak, peak_end), summary)
    line = {"bench": "backends", "peak_gflops": summary["matmul_peak_gflops"],
            "gen_tokens_per_s": {k: v["tokens_per_s"] for k, v in gen.items() if isinstance(v, dict)},
            "vllm_over_batched_hf": gen.get("vllm_over_batched_hf"),
            "vllm_over_batched_hf_all": gen.get("vllm_over_batched_hf_all")}
    for r in rows:
        line[f"K{r['K']}"] = {k: r.get(k) for k in (
            "ideal_speedup", "hf_prefix_speedup", "hf_prefix_speedup_over_ideal",
            "hf_prefix_flops_fraction", "naive_hf_flops_fraction", "vllm_prefix_speedup")}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
