"""Verdict judging: the judge writes its choice and the choice is read from the text.

For a judge that returns no log-probs (a hosted chat API, a reasoning model) the label's
probability is estimated by sampling: each question (a principle in one order) is answered
`votes` times at a temperature above zero, each answer is parsed to "A", "B", "unparsed"
(names neither option, or both) or "refused" (declines to judge), and the probability that
(A) is better is the share of "A" among the parsed votes. Orders and principles are then
combined exactly as in the log-prob mode (`cai.judge`).

Each vote's seed hashes the question's own text (prompt, first and second response, the
principle) and the vote's number, never the pair's order: the question asked in order
"ba" of a pair is the question asked in order "ab" of the swapped pair, gets the same
answers, and the swapped pair's label is exactly 1 − p.

The parser is pure code (`parse_verdict`) so it can be tested on hand-written answers.
"""

from __future__ import annotations

import re

from cai.backends import Backend, GenerationConfig, GenRequest
from cai.core.seeds import derive_seed

VOTES = ("A", "B", "unparsed", "refused")
"""What a parsed answer can be."""

_MARKDOWN = re.compile(r"[*_`#>]+")
_LETTER = r"([AB])"
# An option named in a way no plain sentence uses: "(A)", "[B]", "A)", "Option A",
# "Response (B)", "Reply A", "Assistant B", "Output A".
_OPTION = re.compile(
    r"\(\s*([ABab])\s*\)|\[\s*([AB])\s*\]|(?<![\w(\[])([AB])\)"
    r"|\b(?:option|response|reply|answer|assistant|output|choice|candidate)\s*\(?\s*([AB])\b",
    re.IGNORECASE)
_MARKER = re.compile(
    r"\b(?:final\s+)?(?:answer|verdict|choice|decision|preference|winner)\s*(?:is|:|=|-)"
    r"|\bI\s+(?:would\s+)?(?:choose|pick|prefer|select|go\s+with)\b"
    r"|\bthe\s+better\s+(?:one|reply|response|option|answer)\s+is\b",
    re.IGNORECASE)
_NO_CHOICE = re.compile(r"^\W*(?:neither|both|tie|equal|none|same|they\s+are)\b", re.IGNORECASE)
_REFUSAL = re.compile(
    r"\bI\s*(?:can(?:no|')?t|cannot|won'?t|will\s+not|am\s+(?:not\s+able|unable)|'m\s+"
    r"(?:not\s+able|unable)|must\s+decline|decline|refuse|am\s+not\s+comfortable|'m\s+not\s+"
    r"comfortable)\b|\bI(?:'m|\s+am)\s+sorry\b|\bas\s+an\s+AI\b|\bnot\s+able\s+to\s+"
    r"(?:judge|evaluate|compare|choose|help)\b",
    re.IGNORECASE)
_BETTER = re.compile(
    r"(?:\(\s*|\b(?:option|response|reply|assistant|output|candidate)\s*\(?\s*)([AB])\b\)?"
    r"\s*(?:is|seems|looks|was)\s+(?:clearly\s+|much\s+|slightly\s+|far\s+)?"
    r"(better|preferable|preferred|superior|safer|more\s+\w+|worse|inferior|less\s+\w+)",
    re.IGNORECASE)


def _options(text: str) -> list[str]:
    """Every option named in `text`, in order, as "A" or "B"."""
    return [next(g for g in m.groups() if g).upper() for m in _OPTION.finditer(text)]


def _after_marker(text: str) -> str | None:
    """What the judge commits to after its last answer marker ("Answer: (B)", "I choose
    A"): "A", "B", "unparsed" (it commits to neither or both), or None (no marker, or
    nothing readable after it)."""
    found = list(_MARKER.finditer(text))
    if not found:
        return None
    tail = text[found[-1].end():].strip()
    head = tail[:60]
    if _NO_CHOICE.match(head):
        return "unparsed"
    named = _options(head.split("\n", 1)[0])
    if not named:
        bare = re.match(r"^\W*" + _LETTER + r"\b", head)  # "Answer: B", "Answer - A."
        named = [bare.group(1)] if bare else []
    if not named:
        return None
    return named[0] if len(set(named)) == 1 or not re.search(r"\band\b|&", head) else "unparsed"


def parse_verdict(text: str) -> str:
    """Which option a written answer chooses: "A", "B", "unparsed" or "refused".

    Read in this order: a committed answer after the last marker ("Answer: (B)", "I would
    choose A", "**Final answer:** B"); else the options the text names — one option named
    (however often) is the choice; both named, the one said to be better (or not the one
    said to be worse). An answer with no choice that declines ("I'm sorry, I can't …") is
    "refused"; anything else, including "neither" and "both", is "unparsed". Markdown
    emphasis is ignored.
    """
    clean = _MARKDOWN.sub("", text or "").strip()
    if not clean:
        return "unparsed"
    bare = re.fullmatch(r"\W*" + _LETTER + r"\W*", clean)
    if bare:
        return bare.group(1)
    committed = _after_marker(clean)
    if committed is not None:
        return committed
    named = set(_options(clean))
    if len(named) == 1:
        return named.pop()
    if len(named) == 2:
        good = {m.group(1).upper() if not re.match(r"worse|inferior|less", m.group(2), re.I)
                else ("B" if m.group(1).upper() == "A" else "A") for m in _BETTER.finditer(clean)}
        if len(good) == 1:
            return good.pop()
    return "refused" if _REFUSAL.search(clean) else "unparsed"


def vote_seed(seed: int, prompt: str, first: str, second: str, principle: str, vote: int) -> int:
    """A vote's seed: the question's own text and the vote's number, never the pair's
    order (so a swapped pair hears the same answers to the same questions)."""
    return derive_seed(seed, "verdict", prompt, first, second, principle, vote)


def ask(backend: Backend, questions: list[tuple[list, tuple[str, str, str, str]]], votes: int,
        temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
    """Each question's `votes` written answers, in one batch of generation.

    `questions` holds (chat, (prompt, first, second, principle id)) per question."""
    requests = [GenRequest(chat, "", vote_seed(seed, *parts, v))
                for chat, parts in questions for v in range(votes)]
    texts = [g.text for g in backend.generate(
        requests, GenerationConfig(max_new_tokens, temperature, 1.0, seed))]
    return [texts[i * votes:(i + 1) * votes] for i in range(len(questions))]


__all__ = ["VOTES", "parse_verdict", "vote_seed", "ask"]
