"""The one backend protocol every stage talks to.

Every stage of the method is either generation (respond, critique, revise, sample a policy)
or multiple-choice scoring (which of "(A)" / "(B)" does the judge pick). A backend does
those two things in batch; stages never import an implementation.

A request is a chat (a list of `{"role", "content"}` messages) plus an optional
`answer_prefix` that opens the assistant turn ("The answer is: (" for the judge). A chat
model gets its chat template with the assistant turn opened by the prefix; a base model
gets plain text (`render_plain`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from cai.core.errors import CaiError

Message = dict[str, str]
Chat = list[Message]


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling parameters; stored in every record that generation produced."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens per response."""
    temperature: float = 0.7
    """0 means greedy decoding."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    seed: int = 0
    """Base seed; each request's seed is derived from it and the request."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenRequest:
    """One generation: a chat, an optional assistant-turn prefix, and its own seed."""

    chat: Chat
    answer_prefix: str = ""
    seed: int = 0


@dataclass(frozen=True)
class JudgeQuestion:
    """The parts a judge chat was built from, kept beside it for judges that are functions
    (`python:` specs): they read these instead of the rendered text. Models ignore it."""

    prompt: str
    """The human's request."""
    first: str
    """The response shown as option (A)."""
    second: str
    """The response shown as option (B)."""
    principle: str
    """The principle's question text."""
    item: str = ""
    """Which pair, principle and order this is; a function judge's errors name it."""


@dataclass(frozen=True)
class ScoreRequest:
    """One multiple-choice scoring: the judge chat and the text that opens its answer."""

    chat: Chat
    answer_prefix: str = ""
    question: JudgeQuestion | None = None
    """The comparison behind `chat`, when it is one (set by the label planner)."""


@dataclass
class Generation:
    """A generated text and why it stopped ("stop" at end of turn, "length" when cut off)."""

    text: str
    finish_reason: str = "stop"
    tokens: int = 0


@dataclass
class ScoreResult:
    """Full-vocabulary next-token log-probs of each choice, per request: shape [n, k]."""

    logprobs: np.ndarray
    choice_tokens: list[str] = field(default_factory=list)
    """The token strings that were scored, in choice order (for recomputation)."""
    truncated: np.ndarray | None = None
    """[n, k] booleans: the choice was missing from a server's top log-probs, so its value
    is only an upper bound (OpenAI-compatible servers); None when every value is exact."""

    @property
    def mass(self) -> np.ndarray:
        """Probability the judge puts on the choices at all; low = off-format judge."""
        return np.exp(self.logprobs).sum(axis=1)


@runtime_checkable
class Backend(Protocol):
    """What a stage needs from a model: batched generation and exact choice log-probs."""

    spec: str
    """The model spec this backend was built from, speed options included."""
    identity: str
    """The model's identity: the spec without speed options (batch size, concurrency,
    device, progress). Record ids and provenance use this, so raising a batch size never
    reruns finished work."""

    def generate(self, requests: list[GenRequest], config: GenerationConfig) -> list[Generation]:
        """Generate one response per request, batched; same seeds give the same outputs."""
        ...

    def choice_logprobs(self, requests: list[ScoreRequest],
                        choices: tuple[str, ...] = ("A", "B")) -> ScoreResult:
        """Next-token log-softmax over the full vocabulary at each choice's token, fp32."""
        ...

    def render(self, chat: Chat, answer_prefix: str = "") -> str:
        """The exact text the model sees for this chat (kept with `--keep-prompts`)."""
        ...

    def context_length(self) -> int | None:
        """The longest prompt + generation the model takes, in tokens; None when unknown
        (an OpenAI-compatible server without a local tokenizer): then nothing is checked."""
        ...

    def count_tokens(self, chat: Chat, answer_prefix: str = "") -> int | None:
        """How many tokens the model reads for this chat; None when unknown."""
        ...


# --------------------------------------------------------------------------- context

OVERLONG_MODES = ("skip", "truncate")


@dataclass
class Overlong:
    """What a stage did with inputs too long for the model's context; the manifest counts it."""

    mode: str = "skip"
    """"skip" leaves such an input out; "truncate" cuts its text until it fits."""
    skipped: int = 0
    truncated: int = 0
    limit: int | None = None
    """The model's context length, once known."""

    def __post_init__(self) -> None:
        if self.mode not in OVERLONG_MODES:
            raise CaiError(f"must be one of {OVERLONG_MODES}", field="overlong")

    def counts(self, prefix: str = "overlong") -> dict[str, int]:
        """`{prefix}_skipped` and `{prefix}_truncated`, each only when it is not zero."""
        out = {f"{prefix}_skipped": self.skipped, f"{prefix}_truncated": self.truncated}
        return {k: v for k, v in out.items() if v}

    def warn(self, what: str) -> None:
        """One line on stderr when anything was skipped or cut: never a silent change."""
        import sys

        if self.skipped:
            print(f"[cai] warning: skipped {self.skipped} {what} too long for the model's context "
                  f"of {self.limit} tokens (overlong=skip; `--overlong truncate` cuts them "
                  "instead)", file=sys.stderr)
        if self.truncated:
            print(f"[cai] warning: truncated {self.truncated} {what} to fit the model's context "
                  f"of {self.limit} tokens (overlong=truncate; their records carry the cut text)",
                  file=sys.stderr)


def context_of(backend: Any) -> tuple[int | None, Callable[[Chat, str], int | None] | None]:
    """(context length, token counter) of a backend, or (None, None) when it cannot say."""
    get, count = getattr(backend, "context_length", None), getattr(backend, "count_tokens", None)
    limit = get() if callable(get) else None
    return (limit, count) if limit is not None and callable(count) else (None, None)


def fit_texts(texts: tuple[str, ...], needed: Callable[[tuple[str, ...]], int], limit: int,
              state: Overlong, base: int | None = None) -> tuple[str, ...] | None:
    """Texts whose request(s) fit in `limit` tokens: as given when they fit; else None (skip)
    or, in truncate mode, each text cut to one common character cap — the longest texts are
    cut first — chosen as large as still fits. Counts what it did in `state`.

    `base`, when given, is what the requests need with every text empty; texts that clearly
    fit (no tokenizer makes more than 3 tokens of a byte, plus a few at each seam) are then
    passed without tokenizing them, so a resumed run over many short inputs stays cheap. The
    backends' own length check still guards every request.
    """
    if base is not None and base + sum(3 * len(t.encode("utf-8", "replace")) + 8
                                       for t in texts) <= limit:
        return texts
    if needed(texts) <= limit:
        return texts
    if state.mode == "truncate":
        def cut(n: int) -> tuple[str, ...]:
            return tuple(t[:n] for t in texts)

        lo, hi = 1, max(len(t) for t in texts) - 1
        if hi >= lo and needed(cut(lo)) <= limit:
            while lo < hi:  # the largest cap that fits
                mid = (lo + hi + 1) // 2
                if needed(cut(mid)) <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            state.truncated += 1
            return cut(lo)
    state.skipped += 1
    return None


T = TypeVar("T")


@dataclass
class Fit(Generic[T]):
    """What `fit_to_context` kept of a list of inputs."""

    kept: list[T]
    """The inputs that fit, in their order; a cut input in its cut form."""
    cut: list[T]
    """The kept inputs that were cut to fit (also in `kept`)."""


def fit_to_context(items: Sequence[T], limit: int, state: Overlong, *,
                   texts: Callable[[T], tuple[str, ...]],
                   needed: Callable[[T, tuple[str, ...]], int], base: int,
                   shrink: Callable[[T, tuple[str, ...]], T]) -> Fit[T]:
    """The inputs whose request(s) fit in `limit` tokens, each through `fit_texts`: an input
    that fits is kept as it is; one that does not is left out, or in truncate mode replaced by
    `shrink(item, cut_texts)`. `texts(item)` are the texts that may be cut, `needed(item,
    texts)` the tokens its requests need with those texts, `base` what they need with every
    text empty and no earlier turns (the shortcut for an input without `context`: earlier turns
    are kept whole and always counted). Sets `state.limit` and counts what it did in `state`."""
    state.limit = limit
    kept: list[T] = []
    cut: list[T] = []
    for item in items:
        given = texts(item)
        fitted = fit_texts(given, functools.partial(needed, item), limit, state,
                           None if getattr(item, "context", None) else base)
        if fitted is None:
            continue
        if fitted == given:
            kept.append(item)
        else:
            kept.append(shrink(item, fitted))
            cut.append(kept[-1])
    return Fit(kept, cut)


def render_plain(chat: Chat, answer_prefix: str = "") -> str:
    """Plain-text rendering for base models that have no chat template."""
    names = {"system": "System", "user": "Human", "assistant": "Assistant"}
    parts = [f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in chat]
    return "\n\n".join(parts) + "\n\nAssistant: " + answer_prefix


def trim_at_stop(text: str, stops: tuple[str, ...] = ("\nHuman:", "\nUser:")) -> tuple[str, bool]:
    """Cut a base model's continuation where it starts writing the next user turn."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)

