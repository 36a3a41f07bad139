"""Helpers the benchmarks share: the matmul peak, unique-token counting, synthetic pairs."""

from __future__ import annotations

import random
import time

WORDS = ("the of to and a in is it you that he was for on are with as his they be at one "
         "have this from or had by hot word but what some we can out other were all there "
         "when up use your how said an each she which do their time if will way about many "
         "then them write would like so these her long make thing see him two has look more "
         "day could go come did number sound no most people my over know water than call "
         "first who may down side been now find any new work part take get place made live "
         "where after back little only round man year came show every good me give our under").split()


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 FLOP/s of an n×n matmul on this machine (2·n³ per product)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def unique_tokens(seqs: list[list[int]]) -> int:
    """Nodes of the token trie of all sequences: every shared prefix counted once."""
    total, prev = 0, []
    for s in sorted(seqs):
        lcp = 0
        while lcp < min(len(s), len(prev)) and s[lcp] == prev[lcp]:
            lcp += 1
        total += len(s) - lcp
        prev = s
    return total


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def synthetic_pairs(n: int, seed: int = 0):
    """n (prompt, response_a, response_b) pairs: ~25-word prompts, ~45–70-word responses."""
    from cai.core.data import PairItem

    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = _sentence(rng, 18, 30)
        a = " ".join(_sentence(rng, 9, 14) for _ in range(5))
        b = " ".join(_sentence(rng, 9, 14) for _ in range(5))
        pairs.append(PairItem(f"s{i}", prompt, a, b))
    return pairs


def judge_requests(pairs, constitution, k: int, seed: int = 0):
    """The label stage's exact judge requests for these pairs: K principles × 2 orders."""
    from cai.judge import JudgeConfig, _plan

    return [q.request for q in _plan(pairs, constitution, JudgeConfig(principles=k), seed)]


def scoring_rows(methods: dict, encode, ks: list[int], n_pairs: int, constitution, params: int,
                 emb_params: int, peak: float, log=None) -> list[dict]:
    """Time each scoring method on the same judge prompts for each K, side by side.

    `methods` maps a name to fn(pairs, k) -> [n, 2] log-probs; the first is the baseline
    ("naive"). Reports comparisons/s, the speedup over the baseline, the ideal speedup
    (naive tokens ÷ unique tokens), the largest log-prob difference from the baseline, and
    the fraction of the matmul peak reached counting unique tokens (2·params per token).
    """
    import numpy as np

    rows = []
    for k in ks:
        n = n_pairs if k <= 4 else max(4, n_pairs // 8)
        pairs = synthetic_pairs(n, seed=k)
        reqs = judge_requests(pairs, constitution, k)
        seqs = [encode(r) for r in reqs]
        naive_tokens, uniq = sum(len(s) for s in seqs), unique_tokens(seqs)
        row = {"K": k, "pairs": n, "comparisons": len(reqs), "naive_tokens": naive_tokens,
               "unique_tokens": uniq, "ideal_speedup": round(naive_tokens / uniq, 3)}
        base_name, base_lp = None, None
        for name, fn in methods.items():
            if fn is None:
                continue
            fn(pairs[:1], k)  # warm-up (vLLM compiles and allocates on its first request)
            t = time.perf_counter()
            lp = np.asarray(fn(pairs, k))
            secs = time.perf_counter() - t
            row[f"{name}_s"] = round(secs, 2)
            row[f"{name}_comparisons_per_s"] = round(len(reqs) / secs, 3)
            if base_name is None:
                base_name, base_lp, base_s = name, lp, secs
                row[f"{name}_flops_fraction"] = round(2 * params * naive_tokens / secs / peak, 3)
            else:
                row[f"{name}_speedup"] = round(base_s / secs, 3)
                row[f"{name}_speedup_over_ideal"] = round(base_s / secs / row["ideal_speedup"], 3)
                row[f"{name}_flops_fraction"] = round(2 * params * uniq / secs / peak, 3)
                row[f"{name}_flops_fraction_nonembedding"] = round(
                    2 * (params - emb_params) * uniq / secs / peak, 3)
                row[f"{name}_max_abs_diff"] = float(np.abs(lp - base_lp).max())
        rows.append(row)
        if log:
            log(row)
    return rows


RESULTS = __import__("pathlib").Path(__file__).resolve().parent / "results"


def record_results(name: str, peak: float, summary: dict) -> None:
    """Write results/<name>.json, unless this run's matmul peak is below 80 % of the median
    peak of this bench's earlier recorded runs: a loaded machine would make the figures
    look worse than the code is, so the run is refused (exit 3) and says so."""
    import json
    import statistics
    import sys

    history_file = RESULTS / "peaks.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else {}
    earlier = history.get(name, [])
    gflops = round(peak / 1e9, 1)
    if earlier and gflops < 0.8 * statistics.median(earlier):
        print(f"not recorded: measured matmul peak {gflops} GFLOP/s is below 80 % of this "
              f"bench's earlier median {statistics.median(earlier)} GFLOP/s; the machine is "
              "busy, rerun it when idle", file=sys.stderr)
        sys.exit(3)
    history[name] = (earlier + [gflops])[-20:]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    history_file.write_text(json.dumps(history, indent=2) + "\n")
