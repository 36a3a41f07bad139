"""The Constitutional AI method as one recipe: its steps in order and what each hands the next.

    sl     the base model answers red-team prompts, critiques and revises its answers
           → SL data (revised answers to fine-tune on, revision ≻ initial pairs)
    sft    the base model fine-tuned on sl's data → the SL-CAI policy
    label  the newest policy answers red-team prompts twice, the feedback model judges each
           pair under the constitution → AI preference labels
    pm     the base model trained on label's preferences (and sl's pairs) → a reward model
    rl     the newest policy trained against pm's reward → the RL-CAI policy
    dpo    the SL-CAI model trained on the first round's preferences directly → a DPO policy
    eval   every policy (base, SL-CAI, RL-CAI, DPO) compared by a judge on held-out prompts

With `rounds: R > 1`, label → pm → rl repeats after the first rl, each round labelling the
newest policy's answers. `cai pipeline run` follows `RECIPE` by step name (`cai.planning`
turns it into configs); the stages' typed inputs and outputs (`cai.core.stage`) say what
each config field holds and which file of a step's folder is each output, for the CLI and
the manifests' provenance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cai.core.reward_spec import JUDGE as JUDGE_PREFIX


@dataclass(frozen=True)
class From:
    """An earlier step's output: of the steps of the named stages planned so far (every
    round), the newest (or, `first`, the earliest); its stage's `Output` of that kind says
    which file of the step's folder, and how a reader names it."""

    stages: tuple[str, ...]
    output: str
    """An `Output.kind` of those stages ("policy", "labels", "reward", ...)."""
    first: bool = False
    folder: bool = False
    """With no such step in this run: the folder the first named stage writes under the run
    anyway (an earlier run made it), instead of the next alternative."""
    only_if: str | None = None
    """A boolean setting of the run that turns this handoff on (off: the field is unwired)."""


@dataclass(frozen=True)
class Players:
    """Every policy by its player name, as `name=spec,...`: the run's base model first, then
    the newest output of each player name (`Output.player`) among the named stages' steps."""

    stages: tuple[str, ...]
    base: Run


@dataclass(frozen=True)
class Run:
    """One of the run's own settings (`PipelineConfig`), with a spec prefix (`JUDGE_PREFIX`)."""

    setting: str
    prefix: str = ""


Source = From | Players | Run | str
"""Where a config field's value comes from; a plain string is that value itself."""


@dataclass(frozen=True)
class RecipeStep:
    """One stage of the method and where each of its wired config fields comes from."""

    stage: str
    """The registered stage (`cai.core.stage.REGISTRY`); also the step's folder name."""
    inputs: dict[str, tuple[Source, ...]]
    """Config field → its sources, tried in order; the first that gives a value wins, and a
    field none of them gives is left to the stage's default (or the run config's section)."""
    unset: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings for when a field is left unwired: the evaluation with no PM has no reward
    to pick the best of k answers by."""
    training_files: tuple[str, ...] = ()
    """Files of its folder that later steps train on, made from the current prompts only:
    the held-out check reads their prompts."""
    training_prompts: str | None = None
    """A config field whose prompts (up to the step's `limit`) it trains on directly."""


def step(stage: str, unset: dict[str, dict[str, Any]] | None = None,
         training_files: tuple[str, ...] = (), training_prompts: str | None = None,
         **inputs: Source | tuple[Source, ...]) -> RecipeStep:
    """A `RecipeStep`; each input is one source or a tuple of alternatives."""
    return RecipeStep(stage, {k: v if isinstance(v, tuple) else (v,) for k, v in inputs.items()},
                      unset or {}, training_files, training_prompts)


@dataclass(frozen=True)
class Recipe:
    steps: tuple[RecipeStep, ...]
    rounds: tuple[str, ...]
    """The steps `rounds: R > 1` repeats, in this order, after the last of them."""

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(s.stage for s in self.steps)

    def __getitem__(self, stage: str) -> RecipeStep:
        return next(s for s in self.steps if s.stage == stage)

    def sequence(self, stages: list[str], rounds: int) -> Iterator[tuple[str, str]]:
        """(step key, stage) in run order for the chosen stages: "sl", ..., "round-2/label"."""
        for s in self.steps:
            if s.stage in stages:
                yield s.stage, s.stage
            if s.stage == self.rounds[-1]:
                for r in range(2, rounds + 1):
                    yield from ((f"round-{r}/{n}", n) for n in self.rounds if n in stages)


BASE = Run("model")
"""The helpful base model."""
JUDGE = Run("feedback_model")
"""The feedback model: labels pairs, judges the evaluation unless it has a judge of its own."""
RED_TEAM = "red_team"
"""The shipped red-team prompt set (split into a train and a held-out part per run)."""
POLICY = From(("sft", "rl"), "policy")
"""The newest policy: SL-CAI, then each round's RL-CAI."""
SL_PAIRS = From(("sl",), "sl-data", only_if="sl_pairs_in_pm")
"""The SL pairs (revision ≻ initial) beside the AI labels."""


RECIPE = Recipe(steps=(
    step("sl", prompts=RED_TEAM, model=BASE,
         training_files=("sft.jsonl", "pairs.jsonl")),
    step("sft", data=From(("sl",), "sl-data", folder=True), model=BASE),
    step("label", prompts=RED_TEAM, policy=(POLICY, BASE), feedback_model=JUDGE,
         training_files=("preferences.jsonl",)),
    step("pm", preferences=From(("label",), "labels"), pairs=SL_PAIRS, model=BASE),
    step("rl", model=(POLICY, BASE), reward=(From(("pm",), "reward"), Run("feedback_model", JUDGE_PREFIX)),
         prompts=RED_TEAM, training_prompts="prompts"),
    step("dpo", preferences=From(("label",), "labels", first=True), pairs=SL_PAIRS,
         model=(From(("sft",), "sl-model"), BASE)),
    step("eval", models=Players(("sft", "rl", "dpo"), BASE), red_team=RED_TEAM, feedback_model=JUDGE,
         reward=From(("pm",), "reward"), pm_eval=From(("pm",), "pm-eval"),
         rl_log=From(("rl",), "rl-log"), unset={"reward": {"best_of_k": 0}}),
), rounds=("label", "pm", "rl"))
"""Constitutional AI: sl → sft → label → pm → rl, and dpo beside pm → rl, then eval."""


__all__ = ["RECIPE", "Recipe", "RecipeStep", "From", "Players", "Run", "step"]
