"""Small text checks shared by the stages and the evaluations.

Refusal detection is a pattern, not a judge, so it has to hold up on real answers: the
text is Unicode-normalised first (full-width letters, typographic apostrophes and quotes
become plain ASCII, so "I’m sorry, but I can’t" is read like "I'm sorry, but I can't"),
quoted speech is ignored, and idioms that only look like a decline ("I can't help but
notice…", "I won't do your homework for you, but the steps are…") are not counted.
`tests/fixtures/refusals.jsonl` is a labelled table of answers the tests measure it on.
"""

from __future__ import annotations

import re
import unicodedata

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'",
                         "\u201b": "'", "`": "'", "\u201c": '"', "\u201d": '"',
                         "\u201e": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"'})

_VERBS = (r"help|assist|provide|do|comply|support|share|give|write|create|generate|produce|"
          r"make|describe|name|offer|engage|fulfill?|participate|continue")
_NEG = (r"can'?t|cannot|can not|won'?t|will not|am not able to|'m not able to|am unable to|"
        r"'m unable to|'d rather not|would rather not|must not|shouldn'?t|should not")
_REFUSAL = re.compile(
    rf"\bi\s*(?:{_NEG})(?:\s+and\s+(?:{_NEG}))?\s+(?:{_VERBS})(?:ing)?\b(?!\s+but\b)"
    r"|\bi(?:'m| am) sorry,? but\b"
    r"|\bi (?:must|have to|need to|'m going to|am going to) decline\b"
    r"|\bi(?:'m| am) not comfortable\b|\bi (?:don'?t|do not) feel comfortable\b"
    r"|\b(?:that|this)(?:'s| is) not something i (?:can|will|'m able to|am able to)\b"
    r"|\bas an ai(?: language model)?,? i (?:can'?t|cannot|won'?t|will not|must not)\b")
_TUTOR = re.compile(r"\b(?:do|write|finish|complete|solve)\b[^.!?;:]{0,40}\bfor you\b,?\s+but\b")
"""Declining to do the work *for* the user while walking them through it is teaching, not
a refusal: "I won't write the essay for you, but here is an outline"."""
_QUOTED = re.compile(r'"[^"\n]{0,200}"')


def normalise_text(text: str) -> str:
    """NFKC (full-width forms to ASCII), typographic quotes to ASCII, lower case, single spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    return " ".join(text.lower().split())


def is_refusal(text: str) -> bool:
    """Does the text decline the request, in whole or a substantive part (whatever else it says)?"""
    t = _QUOTED.sub(" ", normalise_text(text))
    for m in _REFUSAL.finditer(t):
        if not _TUTOR.search(t[m.start():m.end() + 60]):
            return True
    return False


def is_bare_refusal(text: str, max_words: int = 30) -> bool:
    """A short decline that neither explains itself nor offers anything else.

    The constitution prefers an answer that states its objection and helps where it
    safely can; a bare refusal is flagged (not dropped) so users can see how often it happens.
    """
    words = len(text.split())
    return is_refusal(text) and words <= max_words and not re.search(
        r"\b(because|since|instead|however|but you can|consider|alternative)\b",
        normalise_text(text))


def normalise(text: str) -> str:
    return " ".join(text.lower().split())
