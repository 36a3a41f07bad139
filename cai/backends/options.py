"""A backend's options: the `?key=value` pairs of its model spec, read into the backend's own
options dataclass with the same coercion and checks as every config file, one clear error
for each bad value; and the `chat` option every model backend shares.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from cai.core.errors import CaiError
from cai.core.models import ResolvedSpec, resolve_spec

OptionsT = TypeVar("OptionsT")

CHAT_MODES = ("auto", "0", "1")
"""The `chat` option of every model backend: "auto" (or "1") uses the tokenizer's chat
template when it has one; "0" forces plain text."""


def check_chat(backend: str, chat: str) -> None:
    """One clear error for a `chat` option that is none of `CHAT_MODES`."""
    if chat not in CHAT_MODES:
        raise CaiError(f"{backend} option chat: use auto, 0 or 1", field="model")


def bind_spec(spec: str | ResolvedSpec, cls: type[OptionsT],
              options: OptionsT | None = None) -> tuple[ResolvedSpec, OptionsT]:
    """What a backend takes from its spec: the spec resolved (once: a resolved spec passes
    through) and its options, `options` when given, else read from the spec's `?key=value`."""
    resolved = resolve_spec(spec)
    return resolved, options or parse_options(cls, resolved.options, resolved.backend)


def parse_options(cls: type[OptionsT], options: dict[str, str], backend: str) -> OptionsT:
    """Build a backend's options dataclass from spec `?key=value` pairs, one clear error each.

    Values are checked with the same coercion as every config file (`cai.core.config.coerce`).
    """
    from cai.core.config import coerce
    from cai.core.usage import PRICE_OPTIONS, parse_price

    parse_price(options)  # a price is every backend's option, read by `load_resolved`
    options = {k: v for k, v in options.items() if k not in PRICE_OPTIONS}
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise CaiError(f"unknown {backend} option {unknown[0]!r}; known: {', '.join(sorted(known))}",
                       field="model")
    kwargs: dict[str, Any] = {}
    for k, v in options.items():
        try:
            kwargs[k] = coerce(cls, k, v)
        except CaiError as err:
            raise CaiError(f"{backend} option {k}: {err.message}", field="model") from None
    try:
        opts = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CaiError(f"{backend} options: {exc}", field="model") from None
    check = getattr(opts, "check", None)
    if check is not None:
        check()
    return opts
