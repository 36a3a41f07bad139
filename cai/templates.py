"""Every chat the stages send to a model, in one place.

Keeping the wording here (and not scattered through the stages) lets a user read exactly
what the models are asked, and lets tests check the chats sent in each round.
"""

from __future__ import annotations

from dataclasses import dataclass

from cai.backends.base import Chat
from cai.constitution import Constitution, FewShot, RLPrinciple, SLPrinciple
from cai.core.errors import CaiError

CRITIQUE_PREFIX = "Critique:"
REVISION_PREFIX = "Revision:"
JUDGE_PREFIX = "The answer is: ("
COT_PREFIX = "Let's think step by step:"
COT_ANSWER = "\nTherefore, the answer is: ("
RATING_PREFIX = "Rating: "

# --------------------------------------------------------------------------- SL stage


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def few_shot_turns(c: Constitution, limit: int | None = None) -> Chat:
    """The constitution's worked examples as earlier turns of the same conversation."""
    turns: Chat = []
    examples: list[FewShot] = c.few_shot[:limit] if limit is not None else c.few_shot
    for ex in examples:
        p = c.sl_principle(ex.principle) if ex.principle else c.sl_principles[0]
        turns += [
            _user(ex.prompt),
            _assistant(ex.response),
            _user(p.critique),
            _assistant(f"{CRITIQUE_PREFIX} {ex.critique}"),
            _user(p.revision),
            _assistant(f"{REVISION_PREFIX} {ex.revision}"),
        ]
    return turns


@dataclass
class SLConversation:
    """The growing conversation of one prompt through its critique → revision rounds."""

    history: Chat

    @classmethod
    def start(cls, c: Constitution, prompt: str, few_shot: int | None = None,
              context: Chat | tuple = ()) -> SLConversation:
        """The worked examples, then the conversation up to the user turn to answer; a
        system turn stays first, where chat templates require it."""
        system = [dict(m) for m in context if m["role"] == "system"]
        rest = [dict(m) for m in context if m["role"] != "system"]
        return cls(system + few_shot_turns(c, few_shot) + rest + [_user(prompt)])

    def respond(self, response: str) -> None:
        self.history.append(_assistant(response))

    def critique_chat(self, p: SLPrinciple) -> Chat:
        """Ask for a critique of the last answer under principle `p`."""
        return self.history + [_user(p.critique)]

    def add_critique(self, p: SLPrinciple, critique: str) -> None:
        self.history += [_user(p.critique), _assistant(f"{CRITIQUE_PREFIX} {critique}")]

    def revision_chat(self, p: SLPrinciple) -> Chat:
        """Ask for a rewrite that fixes what the critique just found."""
        return self.history + [_user(p.revision)]

    def add_revision(self, p: SLPrinciple, revision: str) -> None:
        self.history += [_user(p.revision), _assistant(f"{REVISION_PREFIX} {revision}")]


# --------------------------------------------------------------------------- feedback

LAYOUTS = ("options-first", "principle-first")


VERDICT_ASK = "Reply with your choice only: (A) or (B)."
VERDICT_ASK_REASONED = ("First compare the two replies in a few sentences. Then end with one "
                        "line of the form \"Answer: (A)\" or \"Answer: (B)\".")


SPEAKERS = {"system": "System", "user": "Human", "assistant": "Assistant"}


def transcript(prompt: str | Chat) -> str:
    """The conversation as the judge reads it: "Human: ..." for one turn, every turn
    ("System:", "Human:", "Assistant:") for a conversation."""
    if isinstance(prompt, str):
        return f"Human: {prompt}"
    return "\n\n".join(f"{SPEAKERS[m['role']]}: {m['content']}" for m in prompt)


def judge_chat(prompt: str | Chat, first: str, second: str, principle: RLPrinciple,
               layout: str = "options-first", ask: str = "Answer with (A) or (B).") -> Chat:
    """The multiple-choice question put to the feedback model for one order.

    `options-first` puts the conversation and both options before the principle, so the K
    principles of one order share one long token prefix and only the question differs
    (computed once by the hf backend, prefix-cached by vLLM). `principle-first` is the
    layout of the original work: the question comes before the options. `ask` is the last
    line: how the judge should answer (a letter to be scored, or a written verdict).
    """
    conversation = ("Consider this conversation between a human and an AI assistant.\n\n"
                    + transcript(prompt))
    options = f"Options:\n(A) {first}\n(B) {second}"
    if layout == "options-first":
        body = (f"{conversation}\n\nHere are two possible replies from the assistant.\n\n"
                f"{options}\n\n{principle.text}\n{ask}")
    elif layout == "principle-first":
        body = f"{conversation}\n\n{principle.text}\n\n{options}\n{ask}"
    else:
        raise CaiError(f"unknown layout {layout!r}; use one of {LAYOUTS}", field="layout")
    return [_user(body)]


def verdict_chat(prompt: str | Chat, first: str, second: str, principle: RLPrinciple,
                 layout: str = "options-first", reasoning: bool = False) -> Chat:
    """Verdict mode: the same question, answered in writing (a judge that gives no
    log-probs); with `reasoning` the judge compares the replies before it chooses."""
    return judge_chat(prompt, first, second, principle, layout,
                      VERDICT_ASK_REASONED if reasoning else VERDICT_ASK)


def rating_chat(prompt: str | Chat, response: str, principle: RLPrinciple) -> Chat:
    """Direct-score mode: ask for a 1–10 rating of one response under a principle."""
    return [_user(
        "Consider this conversation between a human and an AI assistant.\n\n"
        f"{transcript(prompt)}\n\nAssistant: {response}\n\n"
        f"With this question in mind: {principle.text}\n"
        "Rate the assistant's reply from 1 (worst) to 10 (best). Reply with the number only."
    )]
