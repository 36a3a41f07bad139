"""Rewards that watch RL without steering it: "monitors".

Overoptimization only shows when the reward being pushed on is compared with one it was not
trained against: a preference model trained on the other half of the labels (the HH
paper's train/test PM check), or a gold score where one exists (the known-answer run).
A monitor is any reward spec; it scores every rollout batch PPO samples, and the batch
mean goes into that step's `log.jsonl` line as `monitor/<name>`. It never enters the
update: the trainer sees exactly the scores of its own reward, and scoring is done without
gradients or random draws, so a run with monitors trains the same weights as one without.

Specs: `NAME=SPEC` or a bare `SPEC` (named after its function or folder). `SPEC` is any
reward spec (`pm:PATH`, `python:MODULE:FUNCTION`, `judge:MODEL`), or `test-pm`: the held-out
half of the reward's own preference model (`cai train pm --split halves` saves it as the
`test/` folder inside the train PM's).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.core.reward_spec import parse_reward_spec, pm_reward
from cai.train.common import Chat
from cai.train.pm_halves import TEST_FOLDER
from cai.train.rewards import RewardSource, load_reward

TEST_PM = "test-pm"
"""The monitor spec for the held-out half of a `--split halves` preference model."""
PREFIX = "monitor/"
"""Prefix of the monitors' keys in the RL log."""


def parse_monitor(entry: str, reward_spec: str) -> tuple[str, str]:
    """(name, reward spec) of one monitor entry; `test-pm` resolved against the reward."""
    entry = entry.strip()
    name, sep, spec = entry.partition("=")
    if not sep or ":" in name or "/" in name:
        name, spec = "", entry
    spec = spec.strip()
    if not spec:
        raise CaiError(f"empty monitor spec in {entry!r}", field="monitors")
    if spec == TEST_PM:
        try:
            reward = parse_reward_spec(reward_spec)
        except CaiError:
            reward = None
        if reward is None or reward.kind != "pm":
            raise CaiError(f"{TEST_PM} needs a preference-model reward (pm:PATH), not "
                           f"{reward_spec!r}", field="monitors")
        folder = Path(reward.target) / TEST_FOLDER
        if not (folder / "config.json").is_file():
            raise CaiError(f"{TEST_PM}: no test PM at {folder} (train the PM with "
                           "`split: halves`)", field="monitors")
        spec, name = pm_reward(folder), name or "test_pm"
    if not name:
        tail = spec.rstrip("/").rsplit(":", 1)[-1]
        name = Path(tail).name or tail
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return name, spec


class MonitoredReward:
    """The training reward, plus monitors scored on the same batch and kept in `last`.

    `score` returns the training reward's scores unchanged; `last` holds the monitors'
    batch means of the latest call (`monitor/<name>`) and `totals` their (sum, count), which
    the trainer adds up over its processes (each scores only its share of the batch).
    """

    def __init__(self, reward: RewardSource, monitors: dict[str, RewardSource]):
        self.reward = reward
        self.spec = reward.spec
        self.monitors = monitors
        self.last: dict[str, float] = {}
        self.totals: dict[str, tuple[float, int]] = {}

    def score(self, prompts: list[Chat], responses: list[str]) -> list[float]:
        import torch

        scores = self.reward.score(prompts, responses)
        last: dict[str, float] = {}
        totals: dict[str, tuple[float, int]] = {}
        with torch.no_grad():
            for name, mon in self.monitors.items():
                vals = mon.score(prompts, responses)
                totals[PREFIX + name] = (float(sum(vals)), len(vals))
                last[PREFIX + name] = float(sum(vals) / len(vals)) if vals else float("nan")
        self.last, self.totals = last, totals
        return scores

    def specs(self) -> dict[str, str]:
        """Each monitor's spec by name (for the manifest)."""
        return {name: getattr(m, "spec", "?") for name, m in self.monitors.items()}


def with_monitors(reward: RewardSource, entries: list[str], batch_size: int = 8,
                  **load_kw: Any) -> RewardSource:
    """The reward wrapped with the monitors `entries` name (the reward itself when none)."""
    if not entries:
        return reward
    monitors: dict[str, RewardSource] = {}
    for entry in entries:
        name, spec = parse_monitor(entry, getattr(reward, "spec", ""))
        if name in monitors:
            raise CaiError(f"two monitors named {name!r}; name them NAME=SPEC", field="monitors")
        monitors[name] = load_reward(spec, batch_size=batch_size, **load_kw)
    return MonitoredReward(reward, monitors)


def monitor_stats(reward: Any, reduce_sum: Callable[[Any], Any] | None = None
                  ) -> dict[str, float]:
    """The monitors' means over the latest rollout batch ({} for a reward without monitors).

    With several processes each scored its own share: pass `reduce_sum` (a sum of a tensor
    over the processes, called by every process) and the means are of the whole batch."""
    if not isinstance(reward, MonitoredReward):
        return {}
    if reduce_sum is None or not reward.totals:
        return dict(reward.last)
    import torch

    names = list(reward.totals)
    both = reduce_sum(torch.tensor([reward.totals[k] for k in names], dtype=torch.float64))
    return {k: float(s / c) if c else float("nan") for k, (s, c) in zip(names, both.tolist())}


__all__ = ["MonitoredReward", "with_monitors", "monitor_stats", "parse_monitor", "TEST_PM",
           "TEST_FOLDER", "PREFIX"]
