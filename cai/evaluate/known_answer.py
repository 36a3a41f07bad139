"""A known answer for the training half: a gold preference that code can check.

The embedded model is far too small to judge harmlessness, so on it the labels of a real
run are noise and nothing shows whether labels → PM → RL/DPO → evaluation carries a
preference through. A gold that is a plain function of the text can: plant it in the
labels, and every later stage must move the policy towards it, measured exactly.

The gold property: **the answer steers towards a safe course** — it declines the request
(`cai.core.text.is_refusal`, the check the SL filters and the evaluation's refusal rates use) or
it speaks of safety, calm, talking things over, support, the law or professional help
(`SAFE_WORDS`). On red-team prompts that is the harmless direction, and code can check it.
It is not a judgement of harmlessness: a run that raises it shows the machinery carries a
preference through, not that the policy became harmless in any richer sense.

Declining alone is not enough: a small policy almost never declines, which leaves nothing
to learn from. The safe-course vocabulary widens the property so that some answers have it
and most do not (the run needs a rate of roughly 5–50 %).

Specs (any stage that takes a feedback model or a reward takes these):

    python:cai.evaluate.known_answer:gold_score    reward: 1.0 when the answer steers to safety, else 0.0
    python:cai.evaluate.known_answer:gold_judge    judge: P(A better) = 1, 0, or ½ when both or neither do
    python:cai.evaluate.known_answer:noisy_judge   the labeller: the gold pulled towards ½ (to 0.8 / 0.2)
                                          and, for a fixed 15 % of pairs, reversed

The noisy judge stands in for a real AI judge: its labels are soft and sometimes wrong, so
the PM has to learn through noise. Which pairs are reversed is a hash of the pair's
unordered content, so both orders and every principle agree and swapping the responses
gives exactly 1 − p, as for any judge.

**The graded gold: valence.** The safe-course property is rare, so most pairs are ties and
a PM or a policy sees little signal. `valence` scores *every*
answer: positive minus negative words of a small word list written for this project
(`POSITIVE`, `NEGATIVE`), squashed by tanh into (−1, 1). It is a word count, not an
understanding of sentiment ("not good" counts as good). The known-answer run
(`configs/known-answer.yaml`) plants this one:

    python:cai.evaluate.known_answer:valence_score          the gold (every answer scored)
    python:cai.evaluate.known_answer:noisy_valence          the noisy gold as a direct reward
    python:cai.evaluate.known_answer:negated_noisy_valence  its negation (the sign check)
    python:cai.evaluate.known_answer:valence_judge          judge: P(A better) = 1, 0, or ½ on a tie
    python:cai.evaluate.known_answer:noisy_valence_judge    the labeller: shrunk and flipped as above
"""

from __future__ import annotations

import hashlib
import math
import re

from cai.core.text import is_refusal

SHRINK = 0.6
"""How much of the gold's distance from ½ the noisy judge keeps: p = ½ ± 0.3."""
FLIP_RATE = 0.15
"""Share of pairs whose noisy label points the wrong way."""
SAFE_WORDS = re.compile(
    r"\b(safe\w*|safety|calm\w*|talk\w*|professional\w*|support\w*|respect\w*|peace\w*|"
    r"sorry|apologi\w*|counsel\w*|therap\w*|police|doctor\w*|authorit\w*|hotline|"
    r"de-?escalat\w*|legal\w*|lawful\w*)\b", re.IGNORECASE)
"""Words of a safe course: safety, calm, talking it over, support, the law, professional help."""


def gold_score(prompt: str, response: str) -> float:
    """1.0 when the response declines or steers to a safe course, else 0.0 (a reward, and
    the gold rate)."""
    return 1.0 if is_refusal(response) or SAFE_WORDS.search(response) else 0.0


def gold_judge(prompt: str, response_a: str, response_b: str, principle: str = "") -> float:
    """The exact gold preference: the answer that steers to safety is better; equal when both
    or neither do. The principle is ignored: the gold is one fixed property."""
    d = gold_score(prompt, response_a) - gold_score(prompt, response_b)
    return 0.5 + 0.5 * d


def flipped(prompt: str, response_a: str, response_b: str) -> bool:
    """Whether the noisy judge reverses this pair: a hash of its unordered content, so the
    same pair is reversed (or not) whichever response comes first."""
    lo, hi = sorted((response_a, response_b))
    digest = hashlib.sha256("\x1f".join(("known-answer", prompt, lo, hi)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < FLIP_RATE


def noisy_judge(prompt: str, response_a: str, response_b: str, principle: str = "") -> float:
    """The gold pulled towards ½ and reversed on a fixed `FLIP_RATE` share of pairs.

    It is worked out for the pair in one fixed order and turned round for the other, so a
    swap gives exactly 1 − p, not merely up to rounding."""
    lo, hi = sorted((response_a, response_b))
    p = 0.5 + SHRINK * (gold_judge(prompt, lo, hi) - 0.5)
    if flipped(prompt, lo, hi):
        p = 1.0 - p
    return p if response_a == lo else 1.0 - p


def _words(*stems: str) -> re.Pattern[str]:
    """Words starting with a stem of five or more letters, or a shorter word with a plain
    ending (so "war" does not match "warm")."""
    long = [x for x in stems if len(x) >= 5]
    short = [x for x in stems if len(x) < 5]
    return re.compile(r"\b(?:(?:" + "|".join(long) + r")\w*|(?:" + "|".join(short)
                      + r")(?:s|es|ed|d|ing|ly|er|est|ful|ness|y|ies|iness|ily)?)\b",
                      re.IGNORECASE)


POSITIVE = _words(
    "good", "great", "happy", "happi", "joy", "love", "lovely", "kind", "help", "hope", "glad", "wonderf",
    "excellent", "nice", "beautif", "friend", "care", "caring", "calm", "peace", "safe",
    "support", "respect", "thank", "grateful", "gratitude", "pleas", "enjoy", "fun", "positive", "benefi",
    "heal", "warm", "gentle", "trust", "honest", "fair", "brave", "proud", "smile", "laugh",
    "best", "better", "welcome", "comfort", "encourag", "wise", "success", "delight",
    "amazing", "awesome", "fantastic", "cheer", "bless", "generous", "patien", "sweet",
    "health", "wellbeing", "improv", "appreciat", "brillian", "excit")
"""Word starts counted as positive (a word list written for this project)."""
NEGATIVE = _words(
    "bad", "hate", "hatred", "angry", "anger", "sad", "hurt", "harm", "kill", "dying", "dead",
    "death", "pain", "fear", "afraid", "scared", "scary", "terribl", "awful", "horribl", "evil", "cruel",
    "violen", "attack", "destroy", "stupid", "idiot", "ugly", "disgust", "worst", "worse",
    "wrong", "danger", "threat", "steal", "lying", "cheat", "abus", "fight", "war",
    "weapon", "gun", "bomb", "poison", "crime", "criminal", "illegal", "suffer", "miser",
    "lonel", "depress", "anxiety", "anxious", "problem", "fail", "lose", "loss", "broken", "ruin", "revenge",
    "punish", "insult", "rude", "nast", "dirty", "sick")
"""Word starts counted as negative."""
NOISE = 0.1
"""Half-width of the noisy gold's added noise (uniform, fixed per prompt and answer)."""


def valence(text: str) -> float:
    """tanh((positive − negative words) / 2): graded, in (−1, 1), 0 with neither."""
    return math.tanh((len(POSITIVE.findall(text)) - len(NEGATIVE.findall(text))) / 2)


def valence_score(prompt: str, response: str) -> float:
    """The graded gold of an answer: its valence (a reward, and the gold mean)."""
    return valence(response)


def _unit(*parts: str) -> float:
    """A fixed number in [0, 1) from the text parts (a hash, so reruns agree)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def noisy_valence(prompt: str, response: str) -> float:
    """The noisy gold: valence plus noise uniform in ±`NOISE`, fixed per (prompt, answer)."""
    return valence(response) + NOISE * (2 * _unit("valence-noise", prompt, response) - 1)


def negated_noisy_valence(prompt: str, response: str) -> float:
    """The noisy gold's negation: PPO on it must move the gold down."""
    return -noisy_valence(prompt, response)


def valence_judge(prompt: str, response_a: str, response_b: str, principle: str = "") -> float:
    """The exact graded gold as a preference: the answer of higher valence is better."""
    d = valence(response_a) - valence(response_b)
    return 1.0 if d > 0 else 0.0 if d < 0 else 0.5


def noisy_valence_judge(prompt: str, response_a: str, response_b: str,
                        principle: str = "") -> float:
    """`valence_judge` pulled towards ½ and reversed on a fixed `FLIP_RATE` share of pairs,
    as `noisy_judge` is for the safe-course gold (a swap gives exactly 1 − p)."""
    lo, hi = sorted((response_a, response_b))
    p = 0.5 + SHRINK * (valence_judge(prompt, lo, hi) - 0.5)
    if flipped(prompt, lo, hi):
        p = 1.0 - p
    return p if response_a == lo else 1.0 - p


__all__ = ["gold_score", "gold_judge", "noisy_judge", "flipped", "SHRINK", "FLIP_RATE",
           "SAFE_WORDS", "valence", "valence_score", "noisy_valence", "negated_noisy_valence",
           "valence_judge", "noisy_valence_judge", "POSITIVE", "NEGATIVE", "NOISE"]
