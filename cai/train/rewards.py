"""Where RL rewards come from, behind one protocol.

PPO, RLOO and GRPO only ever ask "how good is this response to this prompt?". Keeping the
answer behind `RewardSource` lets a run swap the preference model for a judge that rates
responses directly (d-RLAIF) without touching the trainers, and lets tests use a toy reward.

Specs: `pm:PATH` (or a bare folder) is a preference model saved by `cai train pm`;
`judge:MODELSPEC` asks that model for a 1–10 rating under sampled RL principles;
`python:MODULE:FUNCTION` or `python:path/to/file.py:FUNCTION` calls `fn(prompt, response)`
(rule-based or verifiable rewards, and known-answer checks of the whole pipeline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cai.core.errors import CaiError
from cai.core.reward_spec import folder_not_found, judge_reward, parse_reward_spec, pm_reward
from cai.train.common import Chat, as_chat


@runtime_checkable
class RewardSource(Protocol):
    """Scores (prompt, response) pairs; a higher score is a better response."""

    spec: str
    """The reward spec, recorded in the manifest."""

    def score(self, prompts: list[Chat], responses: list[str]) -> list[float]:
        """One float per pair; prompts are chats ending in the user's turn."""
        ...


class PMReward:
    """A preference-model folder (`cai train pm`: sequence classification, one logit).

    Loading and scoring go through `cai.train.pm` (`load_reward_model`, `pm_scores`), so a
    response is tokenized, truncated and read exactly as the PM saw it in training: the
    `pm_text` of the conversation, the logit at the last real token, in fp32.
    """

    def __init__(self, path: str | Path, batch_size: int = 8, device: str | None = None,
                 dtype: str = "float32"):
        import torch

        from cai.train.pm import load_reward_model

        self.path = Path(path)
        self.spec = pm_reward(self.path)
        if not (self.path / "config.json").is_file():
            raise CaiError("not a preference-model folder (no config.json); train one with "
                           "`cai train pm`", str(self.path), "reward")
        self.batch_size = batch_size
        self.model, self.tok = load_reward_model(self.path, dtype)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def score(self, prompts: list[Chat], responses: list[str]) -> list[float]:
        from cai.train.pm import pm_scores

        return pm_scores(self.model, self.tok, prompts, responses, self.batch_size)


class JudgeReward:
    """Direct-score judge (d-RLAIF): the expected 1–10 rating, averaged over principles.

    Each (prompt, response) gets `principles` RL principles drawn as a pure function of the
    seed and the pair's text, so a response is always judged under the same questions.
    """

    def __init__(self, spec: str, constitution: str | Path = "constitutions/harmless.yaml",
                 principles: int = 1, seed: int = 0, backend: Any = None):
        from cai.backends import load_backend
        from cai.constitution import load

        if principles < 1:
            raise CaiError("must be at least 1", field="judge_principles")
        self.spec = judge_reward(spec)
        self.constitution = load(constitution)
        self.k = principles
        self.seed = seed
        self.backend = backend or load_backend(spec)

    def score(self, prompts: list[Chat], responses: list[str]) -> list[float]:
        import numpy as np

        from cai.backends import ScoreRequest
        from cai.constitution import sample_rl_principles
        from cai.judge import expected_ratings
        from cai.templates import RATING_PREFIX, rating_chat

        reqs = []
        for p, r in zip(prompts, responses):
            text = _prompt_text(p)
            chat = as_chat(p)
            shown = text if len(chat) == 1 else chat  # a conversation: every turn, as labelled
            for pr in sample_rl_principles(self.constitution, self.k, "reward", self.seed, text, r):
                reqs.append(ScoreRequest(rating_chat(shown, r, pr), RATING_PREFIX))
        if not reqs:
            return []
        ratings = np.asarray(expected_ratings(self.backend, reqs)).reshape(len(responses), self.k)
        return [float(x) for x in ratings.mean(axis=1)]


class PythonReward:
    """A Python function as the reward: `fn(prompt, response) -> float`, `prompt` being the
    user's text. `spec` is the function's identity (the spec plus a hash of its source
    file), so manifests and best-of-k score ids change when the function does."""

    def __init__(self, spec: str):
        from cai.core.pyfunc import load_function

        self.function = load_function(spec, "reward")
        self.spec = self.function.identity

    def score(self, prompts: list[Chat], responses: list[str]) -> list[float]:
        import math

        from cai.core.pyfunc import as_float, call

        out = []
        for n, (p, r) in enumerate(zip(prompts, responses)):
            text = _prompt_text(p)
            item = f"response {n} to {_snippet(text)!r}"
            value = as_float(call(self.function, (text, r), item, "reward"), self.function,
                             item, "reward")
            if not math.isfinite(value):
                raise CaiError(f"{self.function.spec} returned {value!r} on {item}; a reward "
                               "must be a finite number", field="reward")
            out.append(value)
        return out


def _snippet(text: str, n: int = 40) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[:n - 1] + "…"


def _prompt_text(prompt: Chat | str) -> str:
    """The user's side of a prompt as text, for templates that quote the human turn."""
    turns = [m["content"] for m in as_chat(prompt) if m.get("role") == "user"]
    return "\n\n".join(turns)


def load_reward(spec: str, *, constitution: str | Path = "constitutions/harmless.yaml",
                principles: int = 1, seed: int = 0, batch_size: int = 8,
                dtype: str = "float32") -> RewardSource:
    """Build the reward a spec names: "pm:PATH" or a bare folder, "judge:MODELSPEC", or
    "python:MODULE:FUNCTION" / "python:FILE.py:FUNCTION"; a preference model is held in
    `dtype` (a `cai.train.loading` dtype name)."""
    r = parse_reward_spec(spec)
    if r.kind == "python":
        return PythonReward(r.text)
    if r.kind == "judge":
        return JudgeReward(r.target, constitution, principles, seed)
    if not r.path.is_dir():
        raise folder_not_found(r.target)
    return PMReward(r.path, batch_size, dtype=dtype)


__all__ = ["RewardSource", "PMReward", "JudgeReward", "PythonReward", "load_reward"]
