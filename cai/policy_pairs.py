"""A policy's answers to prompts, paired for labelling (`cai label --prompts`).

The policy answers each prompt several times; every unordered pair of its answers to one
prompt becomes a pair to judge. This is one unit: answers are planned by id, the ones not
yet on disk are sampled (prompts too long for the policy skipped or cut first), and the
pairs are read back from responses.jsonl, so a rerun samples nothing twice.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from cai.backends import GenerationConfig, GenRequest, load_resolved, release
from cai.backends.base import Overlong, context_of, fit_to_context
from cai.core.chunks import run_chunks
from cai.core.data import PairItem, PromptItem, dialogue
from cai.core.models import ResolvedSpec
from cai.core.records import JsonlStore, record_id
from cai.core.seeds import derive_seed

Planned = tuple[str, PromptItem, int]
"""(response id, prompt, sample number): one answer to sample."""


@dataclass(frozen=True)
class Sampling:
    """How the policy answers: what a response's id and provenance hash, beside the policy."""

    responses: int
    """Answers sampled per prompt (all unordered pairs of them are labelled)."""
    generation: GenerationConfig
    """Token budget, temperature and top-p of each answer (its seed is the run's)."""
    seed: int
    """Run seed: each answer's sampling seed derives from it, the prompt and the sample."""
    chunk_size: int
    """Answers generated in one backend call; each finished chunk is written and fsynced."""


def sample_pairs(prompts: list[PromptItem], root: Path, sampling: Sampling, overlong: Overlong,
                 *, policy_model: ResolvedSpec, judge_id: str) -> list[PairItem]:
    """The policy's answers to `prompts` (sampled now or read back), as every unordered pair
    of one prompt's answers.

    Only this run's answers are paired: a rerun into the same folder with another policy,
    seed or temperature never mixes its answers with an earlier run's. The policy comes
    resolved (and the judge's identity with it), so neither spec is parsed again; it is
    released afterwards when the judge is another model, so the two never share memory.
    """
    policy_id = policy_model.identity
    gcfg = sampling.generation
    store = JsonlStore(root / "responses.jsonl")
    planned: dict[str, tuple[PromptItem, int]] = {}
    for item in prompts:
        for s in range(sampling.responses):
            rid = record_id("response", item.key(), policy_id, gcfg.as_dict(), sampling.seed, s)
            planned[rid] = (item, s)
    todo = [(rid, it, s) for rid, (it, s) in planned.items() if rid not in store]
    if todo:
        policy = load_resolved(policy_model)
        limit, count = context_of(policy)
        if limit is not None and count is not None:
            # Prompts the policy cannot answer within its context (prompt + token budget)
            # are skipped or cut per `overlong.mode`; a cut prompt keeps its response ids.
            def needed(context: tuple, texts: tuple[str, ...]) -> int:
                assert count is not None
                return (count(dialogue(context, texts[0]), "") or 0) + gcfg.max_new_tokens + 2

            unique: dict[str, PromptItem] = {}
            for _, it, _ in todo:
                unique.setdefault(it.id, it)
            # A conversation's earlier turns are kept; only the turn to answer is cut.
            fit = fit_to_context(list(unique.values()), limit, overlong, texts=lambda it: (it.prompt,),
                                 needed=lambda it, texts: needed(it.context, texts),
                                 base=needed((), ("",)),
                                 shrink=lambda it, cut: dataclasses.replace(it, prompt=cut[0],
                                                                            truncated=True))
            fitted = {it.id: it for it in fit.kept}
            overlong.warn("prompts (policy)")
            todo = [(rid, fitted[it.id], s) for rid, it, s in todo if it.id in fitted]

        def generate(chunk: list[Planned]) -> list[dict]:
            reqs = [GenRequest(it.conversation(), "",
                               derive_seed(sampling.seed, it.id, s) % 2**31) for _, it, s in chunk]
            return [{"id": rid, "prompt_id": it.id, "prompt": it.prompt, "sample": s,
                     "text": g.text, "finish": g.finish_reason, "model": policy_id,
                     "sampling": gcfg.as_dict(), "seed": sampling.seed,
                     **({"truncated": True} if it.truncated else {}),
                     **({"context": it.conversation()[:-1]} if it.context else {})}
                    for (rid, it, s), g in zip(chunk, policy.generate(reqs, gcfg))]

        run_chunks(todo, sampling.chunk_size, generate, store, total=len(planned),
                   desc="sample", unit="response")
        if policy_id != judge_id:
            release(policy.spec)  # the judge comes next; do not keep both in memory
    by_prompt: dict[str, list[dict]] = {}
    for r in store:
        if r["id"] in planned:
            by_prompt.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for item in prompts:
        rs = sorted(by_prompt.get(item.id, []), key=lambda r: r["sample"])
        for x, y in itertools.combinations(rs, 2):
            # The prompt the policy saw: cut to its context when it was truncated.
            pairs.append(PairItem(f"{item.id}:{x['sample']}-{y['sample']}", x["prompt"],
                                  x["text"], y["text"],
                                  truncated=bool(x.get("truncated") or y.get("truncated")),
                                  context=tuple(x.get("context") or ())))
    return pairs


__all__ = ["Sampling", "sample_pairs"]
