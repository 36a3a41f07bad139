"""The judge's configuration and records: how a pair is judged (`JudgeConfig`), one
question's answer (`Judgement`) and a pair's label (`LabelRecord`).

Kept apart from the judging code (`cai.judge`, which re-exports all of it) so that the
judging modes living in their own modules (`cai.panel`) can share these types.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cai.constitution import Constitution
from cai.core.errors import CaiError
from cai.core.records import OptionalFields, Record
from cai.templates import LAYOUTS

LABEL = "label"
"""The kind of a judge's records (a label's id hashes it; so do the evaluations' ones)."""
MODES = ("logprob", "cot", "score", "verdict")
ORDERS = ("both", "one")
COT_CLAMP = (0.4, 0.6)


@dataclass
class JudgeConfig:
    """How the feedback model judges a pair: one nested `judge` in every config that judges
    (labelling, both judge evals, the policy evaluation). Everything here but `keep_prompts`
    changes a label, so it goes into a label's id and provenance; the constitution and the
    seed are the run's and are handed to the judge beside it."""

    principles: int = 4
    """K: distinct principles sampled per pair."""
    orders: str = "both"
    """"both" asks each question with the responses in both orders; "one" in one order,
    drawn per pair."""
    mode: str = "logprob"
    """"logprob", "cot" (reason, then score; p clamped to [0.4, 0.6]) or "score" (1–10)."""
    layout: str = "options-first"
    """Judge prompt layout: "options-first" (shares work across principles) or
    "principle-first" (the original layout)."""
    tie_threshold: float = 0.05
    """A pair with |p − ½| below this is flagged as a tie."""
    low_mass_threshold: float = 0.5
    """A judgement whose probability mass on the answer tokens is below this is flagged."""
    cot_max_new_tokens: int = 128
    """Token budget of the judge's reasoning in "cot" mode."""
    votes: int = 1
    """Verdict mode: written answers sampled per question; p is the share choosing (A)."""
    vote_temperature: float = 1.0
    """Verdict mode: sampling temperature of the answers (above 0 when votes > 1)."""
    reason_first: bool = False
    """Verdict mode: the judge compares the replies in writing before it chooses."""
    vote_max_tokens: int = 16
    """Verdict mode: token budget of each written answer (raise it with reasoning)."""
    models: list[str] = field(default_factory=list, metadata={"cli": False})
    """A panel: two or more feedback model specs judging every pair, p their (weighted)
    mean (in place of the stage's feedback model; `--feedback-model` repeated)."""
    panel_weights: list[float] = field(default_factory=list)
    """Weights of the panel's judges, one per model, in order (default: equal)."""
    keep_prompts: bool = False
    """Store the exact text scored and the token strings, to recompute any label."""

    def __post_init__(self) -> None:
        finite = all(math.isfinite(x) for x in (self.tie_threshold, self.low_mass_threshold))
        checks = [(finite, "tie_threshold", "thresholds must be finite numbers"),
                  (self.mode in MODES, "mode", f"must be one of {MODES}"),
                  (self.orders in ORDERS, "orders", f"must be one of {ORDERS}"),
                  (self.layout in LAYOUTS, "layout", f"must be one of {LAYOUTS}"),
                  (self.principles >= 1, "principles", "must be at least 1"),
                  (0 <= self.tie_threshold < 0.5, "tie_threshold", "must be in [0, 0.5)"),
                  (0 <= self.low_mass_threshold <= 1, "low_mass_threshold", "must be in [0, 1]"),
                  (self.cot_max_new_tokens >= 1, "cot_max_new_tokens", "must be at least 1")]
        for ok, name, msg in checks:
            if not ok:
                raise CaiError(msg, field=name)
        self._check_verdict_and_panel()

    def _check_verdict_and_panel(self) -> None:
        t = self.vote_temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and 0 <= t <= 100):
            raise CaiError("must be from 0 to 100", field="vote_temperature")
        if self.votes < 1 or (self.votes > 1 and t == 0):
            raise CaiError("must be at least 1, and with more than one vote the temperature must "
                           "be above 0 (greedy votes all agree)", field="votes")
        if self.vote_max_tokens < 1:
            raise CaiError("must be at least 1", field="vote_max_tokens")
        if isinstance(self.models, str):
            self.models = [self.models]
        if isinstance(self.panel_weights, str):  # "--panel-weights 2,1"
            try:
                self.panel_weights = [float(x) for x in self.panel_weights.split(",") if x.strip()]
            except ValueError:
                raise CaiError("expected numbers separated by commas", field="panel_weights") from None
        if not (isinstance(self.models, list) and all(isinstance(m, str) and m for m in self.models)):
            raise CaiError("must be a list of model specs", field="models")
        w = self.panel_weights
        if w and (len(w) != len(self.models) or not all(
                isinstance(x, int | float) and math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0):
            raise CaiError(f"needs one finite weight >= 0 per judge ({len(self.models)}), not all 0",
                           field="panel_weights")
        if len(self.models) == 1 or len(set(self.models)) != len(self.models):
            raise CaiError("a panel needs two or more different judges", field="models")

    def method(self) -> dict[str, Any]:
        """The fields that decide a label (ids and provenance carry these)."""
        out = {"mode": self.mode, "principles": self.principles, "orders": self.orders,
               "layout": self.layout, "tie_threshold": self.tie_threshold,
               "low_mass_threshold": self.low_mass_threshold}
        if self.mode == "cot":  # the key ids have always hashed
            out["max_new_tokens"] = self.cot_max_new_tokens
        if self.mode == "verdict":
            out.update(votes=self.votes, temperature=self.vote_temperature,
                       reasoning=self.reason_first, max_new_tokens=self.vote_max_tokens)
        return out

    def capped(self, n: int) -> JudgeConfig:
        """This judge asking at most `n` principles (a principle set smaller than K)."""
        return dataclasses.replace(self, principles=min(self.principles, n))

    def check_principles(self, c: Constitution) -> None:
        """Refuse a K larger than the constitution's comparison principles, before any work."""
        if self.principles > len(c.rl_principles):
            raise CaiError(f"asks for {self.principles} distinct principles but {c.path} has "
                           f"{len(c.rl_principles)}", field="judge.principles")


_Optional = OptionalFields


class Judgement(_Optional):
    """One question put to the judge: a principle in one order."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("judge", "votes", "answers")

    principle: str
    order: str
    """"ab" (response_a shown as (A)) or "ba"."""
    logprob_a: float
    """Full-vocabulary log-prob of the letter "A" as the next token."""
    logprob_b: float
    mass: float
    """p("A") + p("B"): how much the judge answers the question at all."""
    p_first: float
    """softmax over the two letters: probability that option (A) is better."""
    truncated: bool = False
    """A letter was missing from a server's top log-probs: its value is an upper bound."""
    reasoning: str | None = None
    prompt_text: str | None = None
    """With --keep-prompts: the exact text scored."""
    prompt_ids: list[int] | None = None
    """With --keep-prompts, when the text holds control-token strings from the data: the
    exact token ids scored (`tokenizer(prompt_text)` would parse those strings)."""
    judge: str | None = None
    """In a panel: the judge (model identity) that answered."""
    votes: list[str] | None = None
    """Verdict mode: each sampled answer read as "A", "B", "unparsed" or "refused" (the
    log-probs above are then the logs of the shares of "A" and "B")."""
    answers: list[str] | None = None
    """Verdict mode: the judge's written answers, one per vote."""


class LabelRecord(Record, _Optional):
    """A soft AI preference label for one pair."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("panel", "context")

    pair_id: str
    prompt: str
    response_a: str
    response_b: str
    p_a: float
    """Probability that response_a is better (before picking chosen/rejected)."""
    chosen: str
    rejected: str
    p_chosen: float
    judgements: list[Judgement]
    scores: dict[str, float] | None = None
    """Score mode: expected 1–10 rating of each response ("a", "b")."""
    rating_mass: float | None = None
    """Score mode: mean probability the judge put on the rating digits."""
    rating_prompts: list[str] | None = None
    """Score mode with --keep-prompts: the exact texts rated."""
    flags: list[str]
    choice_tokens: list[str] | None = None
    """With --keep-prompts: the token strings whose log-probs were read."""
    policy: str | None = None
    panel: dict[str, float] | None = None
    """A panel's label: each judge's p(a ≻ b), by model identity."""
    context: list[dict[str, str]] | None = None
    """The conversation's earlier turns before `prompt` (absent for a one-turn prompt)."""


__all__ = ["LABEL", "MODES", "ORDERS", "COT_CLAMP", "JudgeConfig", "Judgement", "LabelRecord"]
