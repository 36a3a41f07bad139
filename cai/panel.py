"""Judge panels: several feedback models label each pair, the label their (weighted) mean.

Each judge of the panel judges the pair exactly as it would alone (`cai.judge.judge_pairs`:
K sampled principles, both orders, in the panel's mode; a `python:` judge by its function,
which says its probability directly), and the panel's p(a ≻ b) is the weighted mean of
the judges' p. A judge that gave no verdict on a pair (verdict mode, every answer
unparsed or refused) is left out of that pair's mean, never counted as ½. The record keeps
every judge's p (`panel`), every judge's questions (each judgement names its `judge`) and
the union of their flags, plus `judges-disagree` when one judge prefers a and another b.

The panel's identity names every member and its weight, so record ids and manifests do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cai.backends import Backend, ReplicaTask, load_backend
from cai.backends.base import Overlong
from cai.constitution import Constitution
from cai.core.chunks import Engine, run_chunks
from cai.core.data import PairItem
from cai.core.errors import CaiError
from cai.core.pyfunc import is_python_spec
from cai.core.records import JsonlStore, Provenance
from cai.judge import LABEL, JudgeConfig, LabelRecord, Labels, fit_pairs, judge_pairs, label_id


def panel_identity(identities: list[str], weights: list[float] | None = None) -> str:
    """The panel's name: its members' identities (with their weights when given)."""
    if weights:
        return "panel(" + " + ".join(f"{w:g}*{m}" for w, m in zip(weights, identities)) + ")"
    return "panel(" + " + ".join(identities) + ")"


def member_config(cfg: JudgeConfig, backend: Backend) -> JudgeConfig:
    """How one member judges: the panel's settings without the panel; a function judge
    (`python:`) says its probability, so it is read as in mode logprob."""
    python = is_python_spec(getattr(backend, "spec", ""))
    return dataclasses.replace(cfg, models=[], panel_weights=[],
                               mode="logprob" if python else cfg.mode)


def judge_panel(pairs: list[PairItem], c: Constitution, members: list[Backend], cfg: JudgeConfig,
                seed: int, policy: str | None = None) -> list[LabelRecord]:
    """Label pairs with every member, then combine (see the module docstring). Pure."""
    weights = cfg.panel_weights or [1.0] * len(members)
    ids = [b.identity for b in members]
    identity = panel_identity(ids, cfg.panel_weights)
    by_member = [judge_pairs(pairs, c, b, member_config(cfg, b), seed, policy) for b in members]
    method = {**cfg.method(), "panel": [
        {"model": m, "weight": w, **member_config(cfg, b).method()}
        for m, w, b in zip(ids, weights, members)]}
    out = []
    for i, pair in enumerate(pairs):
        recs = [m[i] for m in by_member]
        voting = [(w, r) for w, r in zip(weights, recs) if "no-verdict" not in r.flags]
        total = sum(w for w, _ in voting)
        p_a = sum(w * r.p_a for w, r in voting) / total if total > 0 else 0.5
        flags = sorted({f for r in recs for f in r.flags if f not in ("tie", "no-verdict")})
        sides = {r.p_a > 0.5 for _, r in voting if r.p_a != 0.5}
        if len(sides) == 2:
            flags.append("judges-disagree")
        if abs(p_a - 0.5) < cfg.tie_threshold:
            flags.append("tie")
        if total <= 0:
            flags.append("no-verdict")
        a_wins = p_a >= 0.5
        js = [j.model_copy(update={"judge": m}) for m, r in zip(ids, recs) for j in r.judgements]
        out.append(LabelRecord(
            id=label_id(pair, c, identity, cfg, seed), stage=LABEL,
            provenance=Provenance(constitution=c.stamp.as_dict(), model=identity,
                                  sampling=method, seed=seed),
            pair_id=pair.id, prompt=pair.prompt, response_a=pair.response_a,
            response_b=pair.response_b, p_a=p_a,
            chosen=pair.response_a if a_wins else pair.response_b,
            rejected=pair.response_b if a_wins else pair.response_a,
            p_chosen=p_a if a_wins else 1 - p_a, judgements=js, flags=flags, policy=policy,
            panel={m: r.p_a for m, r in zip(ids, recs)},
            context=[dict(m) for m in pair.context] if pair.context else None))
    return out


@dataclass
class PanelTask(ReplicaTask):
    """A chunk of pairs for the whole panel, as a picklable callable (each Ray actor loads
    its own members; a local run keeps the ones it was given)."""

    judge: JudgeConfig
    seed: int
    c: Constitution
    policy: str | None = None
    members: list[Backend] | None = field(default=None)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "members": None, "backend": None}

    def model_spec(self) -> str:
        return self.judge.models[0]

    def __call__(self, chunk: list[PairItem]) -> list[LabelRecord]:
        if self.members is None:
            self.members = [load_backend(m, reuse=False) for m in self.judge.models]
        return judge_panel(chunk, self.c, self.members, self.judge, self.seed, self.policy)


def load_panel(cfg: JudgeConfig) -> list[Backend]:
    """The panel's members, each loaded once (not through the one-model cache, which would
    evict one member to load the next)."""
    if len(cfg.models) < 2:
        raise CaiError("a panel needs two or more judges", field="models")
    return [load_backend(m, reuse=False) for m in cfg.models]


def label_panel(pairs: list[PairItem], c: Constitution, members: list[Backend], cfg: JudgeConfig,
                seed: int, store: JsonlStore, *, policy: str | None, overlong: Overlong,
                chunk_size: int, engine: Engine) -> Labels:
    """`cai.judge.label_pairs` for a panel: pairs too long for any member are skipped or
    cut first; finished labels are skipped; the rest are judged in chunks."""
    for b in members:
        pairs = fit_pairs(pairs, c, b, member_config(cfg, b), seed, overlong)
    overlong.warn("pairs")
    if not pairs and overlong.skipped:
        raise CaiError(f"every pair is too long for a judge's context of {overlong.limit} tokens",
                       field="overlong")
    identity = panel_identity([b.identity for b in members], cfg.panel_weights)
    ids: dict[str, PairItem] = {}
    for pair in pairs:
        ids.setdefault(label_id(pair, c, identity, cfg, seed), pair)
    todo = [p for rid, p in ids.items() if rid not in store]
    task = PanelTask(cfg, seed, c, policy, members if engine.name == "local" else None)
    task.backend = None
    new = run_chunks(todo, chunk_size, task, store, total=len(ids), desc="label", unit="pair",
                     engine=engine)
    return Labels([r for r in store if r["id"] in ids], new)


__all__ = ["panel_identity", "member_config", "judge_panel", "PanelTask", "load_panel",
           "label_panel"]
