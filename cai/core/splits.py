"""Held-out splits by a seeded hash: prompts for the pipeline, prompts of preference pairs
for the PM and DPO.

A split decided by hashing (seed, key) is the same whatever order the items come in, and
the same in every stage that asks; so the pipeline can give SL, labelling and RL one part
of a prompt set and the evaluation the other, and a preference model's held-out pairs can
be chosen by prompt so that no prompt (nor a response to it) sits on both sides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def text_key(text: str) -> str:
    """A short stable key of a text (the same text always gives the same key)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def rank(key: str, seed: int | str) -> str:
    """The seeded hash that orders keys for a split."""
    return hashlib.sha256(f"cai-split\x1f{seed}\x1f{key}".encode()).hexdigest()


def held_out(keys: Iterable[str], fraction: float, seed: int | str, min_train: int = 1) -> set[str]:
    """The keys held out: round(fraction × distinct keys) of them, those with the smallest
    seeded hash, leaving at least `min_train` keys for training (fraction 0: none)."""
    distinct = sorted(set(keys))
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    n = min(int(round(len(distinct) * fraction)), max(len(distinct) - min_train, 0))
    return set(sorted(distinct, key=lambda k: rank(k, seed))[:n])


__all__ = ["text_key", "rank", "held_out"]
