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
    from cai.data import PairItem

    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = _sentence(rng, 18, 30)
        a = " ".join(_sentence(rng, 9, 14) for _ in range(5))
        b = " ".join(_sentence(rng, 9, 14) for _ in range(5))
        pairs.append(PairItem(f"s{i}", prompt, a, b))
    return pairs
