"""Seeds: one stable 64-bit seed from any parts, the same in every process and every run.

Every random choice of the method (which principle a pair is judged by, which response
stands first, each sampled token stream, PPO's prompt order and minibatches) draws from
a seed derived from a base seed and what the choice is about, so a resumed or a
distributed run makes the same choices. It sits here, below everything that samples, so
the backends and the trainers need no part of the constitution module to get one.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from any printable parts (Python's hash() is salted per run)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


__all__ = ["derive_seed"]
