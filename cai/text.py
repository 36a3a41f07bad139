"""Small text checks shared by the stages and the evaluations."""

from __future__ import annotations

import re

_REFUSAL = re.compile(
    r"\b(i\s*(?:can(?:no|')?t|cannot|won'?t|will not|am not able to|'m not able to|am unable to|"
    r"'m unable to)\s+(?:help|assist|provide|do|comply|support|share|give)|"
    r"i(?:'m| am) sorry,? but|as an ai(?: language model)?,? i|i must decline|"
    r"i(?:'m| am) not comfortable)",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    """Does the text decline the request (whatever else it says)?"""
    return bool(_REFUSAL.search(text))


def is_bare_refusal(text: str, max_words: int = 30) -> bool:
    """A short decline that neither explains itself nor offers anything else.

    The constitution prefers an answer that states its objection and helps where it
    safely can; a bare refusal is flagged (not dropped) so users can see how often it happens.
    """
    words = len(text.split())
    return is_refusal(text) and words <= max_words and not re.search(
        r"\b(because|since|instead|however|but you can|consider|alternative)\b", text, re.I)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())
