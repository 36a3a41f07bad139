"""Programmatic judges and rewards: a Python function where a model would go.

Specs: `python:MODULE:FUNCTION` (a module importable from `sys.path`) or
`python:path/to/file.py:FUNCTION` (a file, loaded by path). A *judge* is called as
`fn(prompt, response_a, response_b, principle)` — `principle` is the principle's question
text — and returns the probability that `response_a` is the better answer. A *reward*
(`cai.train.rewards.PythonReward`) is called as `fn(prompt, response)` and returns a float.

Why a judge is a backend and not a separate label path: every stage that takes a feedback
model reaches it through `load_backend(spec)` and reads a label from the log-probs of "A"
and "B". `PythonJudge` answers `choice_logprobs` with log p for "A" and log(1 − p) for "B",
so the softmax over the two letters gives back p, the mass on the letters is 1, and the rest
— K sampled principles, both orders, the mean over principles, the flags, record ids and
manifests, Ray actors that rebuild the judge from its spec — is the code an LM judge runs.
Swapping a pair's responses swaps the questions asked, so the label becomes exactly 1 − p.
The judge reads the pair's parts from the request's `question` (set by the label planner),
never by parsing the rendered chat.

Identity: the spec plus the first 12 hex digits of the sha256 of the function's source file
(`python:judges.py:safe@0123456789ab`): editing the function changes every record id it
made, so a rerun labels afresh instead of reusing labels the old function gave.
"""

from __future__ import annotations

import math

import numpy as np

from cai.backends.base import (
    Chat,
    Generation,
    GenerationConfig,
    GenRequest,
    JudgeQuestion,
    ScoreRequest,
    ScoreResult,
    render_plain,
)
from cai.core.errors import CaiError
from cai.core.models import ResolvedSpec
from cai.core.pyfunc import (
    PythonFunction,
    as_float,
    call,
    is_python_spec,
    load_function,
    python_identity,
    source_file,
    split_spec,
)

LOG_ZERO = -1000.0
"""The log-prob written for a probability of exactly 0: finite, so records stay valid
JSON, and exp() of it is 0.0, so the label reads back exactly 0 or 1."""


class PythonJudge:
    """A judge function behind the `Backend` protocol (see the module docstring)."""

    def __init__(self, spec: str | ResolvedSpec):
        raw = spec if isinstance(spec, str) else spec.raw
        self.function = load_function(raw, "feedback_model")
        self.spec = self.function.spec
        self.identity = self.function.identity

    def probability(self, q: JudgeQuestion) -> float:
        """P(option A is better) from the function, checked to be a number in [0, 1]."""
        item = q.item or "a pair"
        p = as_float(call(self.function, (q.prompt, q.first, q.second, q.principle), item,
                          "feedback_model"), self.function, item, "feedback_model")
        if not 0.0 <= p <= 1.0:  # NaN fails this too
            raise CaiError(f"{self.spec} returned {p!r} on {item}; a judge returns the "
                           "probability that A is better, in [0, 1]", field="feedback_model")
        return p

    def choice_logprobs(self, requests: list[ScoreRequest],
                        choices: tuple[str, ...] = ("A", "B")) -> ScoreResult:
        """log p for "A" and log(1 − p) for "B": the label code's softmax gives back p."""
        if tuple(choices) != ("A", "B"):
            raise CaiError(f"{self.spec} is a python judge: it says which of (A) and (B) is "
                           "better, so it works in mode logprob only (for ratings as a reward, "
                           "give --reward python:...:FUNCTION of (prompt, response))", field="mode")
        out = np.zeros((len(requests), 2))
        for n, r in enumerate(requests):
            if r.question is None:
                raise CaiError(f"{self.spec} is a python judge: it can only compare two "
                               "responses", field="feedback_model")
            p = self.probability(r.question)
            out[n] = (_log(p), _log(1.0 - p))
        return ScoreResult(out, list(choices))

    def generate(self, requests: list[GenRequest], config: GenerationConfig) -> list[Generation]:
        raise CaiError(f"{self.spec} is a python judge: it compares responses but writes no "
                       "text (not a policy, and not usable in mode cot)", field="model")

    def render(self, chat: Chat, answer_prefix: str = "") -> str:
        """The question as plain text (what `--keep-prompts` stores for a function judge)."""
        return render_plain(chat, answer_prefix)

    def context_length(self) -> int | None:
        return None

    def count_tokens(self, chat: Chat, answer_prefix: str = "") -> int | None:
        return None


def _log(p: float) -> float:
    return math.log(p) if p > 0 else LOG_ZERO


__all__ = ["PythonJudge", "PythonFunction", "load_function", "python_identity",
           "is_python_spec", "split_spec", "source_file", "call", "as_float", "LOG_ZERO"]
