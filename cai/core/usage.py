"""Token accounting: prompt and completion tokens per model, for the manifests.

Every backend that runs a model adds what each call read and wrote here (an OpenAI-compatible
server's own `usage` figures; tokens counted locally by the hf and vLLM backends). A stage
takes a `mark()` when it starts and writes `since(mark)` into its manifest, so its counts
are its own even when one process runs several stages. A model spec may carry a price
(`?usd_per_mtok_in=…&usd_per_mtok_out=…`, US dollars per million tokens); it changes no
output, so it stays out of the model's identity, and the manifest then shows the cost.

Counts are kept in this process: chunks judged on Ray actors are not counted here.
"""

from __future__ import annotations

import threading
from typing import Any

from cai.core.errors import CaiError

PRICE_OPTIONS = ("usd_per_mtok_in", "usd_per_mtok_out")
"""Spec options that price a model's tokens (per million, in US dollars)."""

_LOCK = threading.Lock()
_COUNTS: dict[str, list[int]] = {}  # identity -> [prompt, completion, calls]
_PRICES: dict[str, tuple[float, float]] = {}


def add(model: str, prompt: int, completion: int = 0, calls: int = 1) -> None:
    """Count `calls` model calls that read `prompt` and wrote `completion` tokens."""
    with _LOCK:
        row = _COUNTS.setdefault(model, [0, 0, 0])
        row[0] += int(prompt)
        row[1] += int(completion)
        row[2] += int(calls)


def parse_price(options: dict[str, str]) -> tuple[float, float] | None:
    """The (input, output) price of a spec's options, or None when it names none; a bad
    value is one clear error."""
    given = {k: options[k] for k in PRICE_OPTIONS if k in options}
    if not given:
        return None
    out = []
    for k in PRICE_OPTIONS:
        try:
            v = float(given.get(k, "0"))
        except ValueError:
            raise CaiError(f"model option {k}: {given[k]!r} is not a number", field="model") from None
        if not v >= 0 or v == float("inf"):
            raise CaiError(f"model option {k}: must be a finite number >= 0", field="model")
        out.append(v)
    return out[0], out[1]


def set_price(model: str, price: tuple[float, float] | None) -> None:
    """Price a model's tokens (from its spec); None leaves it unpriced."""
    if price is not None:
        with _LOCK:
            _PRICES[model] = price


def mark() -> dict[str, tuple[int, int, int]]:
    """The counts now: hand it to `since` when the stage ends."""
    with _LOCK:
        return {k: (v[0], v[1], v[2]) for k, v in _COUNTS.items()}


def since(start: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, Any]]:
    """Tokens per model since `start` (models that read nothing are left out), with the
    cost in US dollars where the model has a price."""
    out: dict[str, dict[str, Any]] = {}
    for model, now in mark().items():
        before = start.get(model, (0, 0, 0))
        p, c, n = (now[i] - before[i] for i in range(3))
        if not n:
            continue
        row: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "calls": n}
        if model in _PRICES:
            pin, pout = _PRICES[model]
            row["usd"] = round((p * pin + c * pout) / 1e6, 6)
        out[model] = row
    return out


def total(tokens: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sum over models of a `since` result (for a report line)."""
    out: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0}
    for row in tokens.values():
        out["prompt_tokens"] += int(row.get("prompt_tokens", 0))
        out["completion_tokens"] += int(row.get("completion_tokens", 0))
        if "usd" in row:
            out["usd"] = round(out.get("usd", 0.0) + row["usd"], 6)
    return out


__all__ = ["PRICE_OPTIONS", "add", "mark", "since", "set_price", "parse_price", "total"]
