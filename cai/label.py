"""The label stage (`cai label`): soft AI preference labels for pairs, written to disk.

Pairs come from a file, or from a policy that answers prompts several times (every
unordered pair of its answers to a prompt is labelled). Each pair is judged by
`cai.judge`: K sampled principles, both orders, p(a ≻ b) from the feedback model's
log-probs of "A" and "B". Labels are kept as records (resumable: a label's id is known
before judging) and as preferences.jsonl in TRL's preference format plus `p_chosen`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.backends import Backend, GenerationConfig, GenRequest, load_backend, release
from cai.backends.base import OVERLONG_MODES, Overlong, context_of, fit_texts
from cai.constitution import load
from cai.core.data import PairItem, PromptItem, load_pairs, load_prompts
from cai.core.errors import CaiError
from cai.core.models import ResolvedSpec, resolve_spec
from cai.core.records import JsonlStore, record_id, write_text_atomic
from cai.core.seeds import derive_seed
from cai.core.stage import (
    Engine,
    EngineFields,
    Input,
    Output,
    Stage,
    StageDir,
    register,
    run_chunks,
    write_card,
    write_manifest,
)
from cai.judge import LABEL, JudgeConfig, JudgeTask, fit_pairs, label_id, label_stats

STAGE = LABEL


@dataclass
class LabelConfig(EngineFields):
    """Configuration of `cai label`; saved in the manifest so a run can be repeated."""

    constitution: str = "harmless"
    """Constitution whose comparison principles the judge is asked (a file, or a shipped
    name such as `harmless`)."""
    feedback_model: str = "embedded:smollm2-135m"
    """Model spec of the feedback model (the judge)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """How the feedback model judges: principles, orders, mode, layout, thresholds (a
    nested `judge:` mapping in YAML; the same flags as each field on the command line)."""
    out: str = "runs/label"
    """Output folder; rerunning with the same folder resumes."""
    pairs: str | None = None
    """Pairs to label: jsonl with prompt, response_a, response_b."""
    prompts: str | None = None
    """Or prompts: the policy samples `responses_per_prompt` answers to each, forming pairs."""
    policy: str | None = None
    """Model spec of the policy that answers `prompts`."""
    responses_per_prompt: int = 2
    """Responses sampled per prompt (all unordered pairs of them are labelled)."""
    policy_temperature: float = 1.0
    """Sampling temperature of the policy's responses."""
    max_new_tokens: int = 128
    """Token budget of each policy response (the judge's reasoning has its own,
    `judge.cot_max_new_tokens`)."""
    limit: int | None = None
    """Label only the first N pairs (or prompts)."""
    text_field: str = "prompt"
    """Field holding the prompt text when reading prompts."""
    seed: int = 0
    """Run seed: principle draws, order draws and policy samples derive from it."""
    chunk_size: int = 32
    """Pairs scored in one backend call; each finished chunk is written and fsynced."""
    overlong: str = "skip"
    """A pair (or prompt) too long for the model's context: "skip" leaves it out, "truncate"
    cuts the longest texts to fit (with a warning and a `truncated-input` flag). Both are
    counted in the manifest (overlong_skipped, overlong_truncated)."""

    def __post_init__(self) -> None:
        checks = [(self.responses_per_prompt >= 2, "responses_per_prompt", "must be at least 2"),
                  (self.responses_per_prompt <= 64, "responses_per_prompt",
                   "must be at most 64 (all pairs of them are labelled)"),
                  (math.isfinite(self.policy_temperature) and 0 <= self.policy_temperature <= 100,
                   "policy_temperature", "must be from 0 to 100"),
                  (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
                  (self.overlong in OVERLONG_MODES, "overlong", f"must be one of {OVERLONG_MODES}"),
                  (self.limit is None or self.limit >= 1, "limit", "must be at least 1"),
                  (self.chunk_size >= 1, "chunk_size", "must be at least 1"),
                  ((self.pairs is None) != (self.prompts is None), "pairs",
                   "give exactly one of --pairs or --prompts"),
                  (self.prompts is None or self.policy, "policy", "--prompts needs --policy")]
        for ok, name, msg in checks:
            if not ok:
                raise CaiError(msg, field=name)


def sample_pairs(cfg: LabelConfig, root: Path, prompts: list[PromptItem],
                 overlong: Overlong | None = None, *, policy_model: ResolvedSpec,
                 judge_id: str) -> list[PairItem]:
    """Policy answers each prompt `responses_per_prompt` times; all unordered pairs follow.

    Responses are kept in responses.jsonl so a rerun does not sample them again. Only this
    run's responses are paired: a rerun into the same folder with another policy, seed or
    temperature never mixes its responses with an earlier run's. The policy comes resolved
    (and the judge's identity with it) from `run_label`, so neither spec is parsed again.
    """
    policy_id = policy_model.identity
    store = JsonlStore(root / "responses.jsonl")
    gcfg = GenerationConfig(cfg.max_new_tokens, cfg.policy_temperature, 1.0, cfg.seed)
    planned: dict[str, tuple[PromptItem, int]] = {}
    for item in prompts:
        for s in range(cfg.responses_per_prompt):
            rid = record_id("response", item.prompt, policy_id, gcfg.as_dict(), cfg.seed, s)
            planned[rid] = (item, s)
    todo = [(rid, it, s) for rid, (it, s) in planned.items() if rid not in store]
    if todo:
        policy = load_backend(policy_model)
        todo = _fit_policy_prompts(todo, policy, gcfg, overlong or Overlong(cfg.overlong))

        def generate(chunk: list[tuple[str, PromptItem, int]]) -> list[dict]:
            reqs = [GenRequest([{"role": "user", "content": it.prompt}], "",
                               derive_seed(cfg.seed, it.id, s) % 2**31) for _, it, s in chunk]
            return [{"id": rid, "prompt_id": it.id, "prompt": it.prompt, "sample": s,
                     "text": g.text, "finish": g.finish_reason, "model": policy_id,
                     "sampling": gcfg.as_dict(), "seed": cfg.seed,
                     **({"truncated": True} if it.truncated else {})}
                    for (rid, it, s), g in zip(chunk, policy.generate(reqs, gcfg))]

        run_chunks(todo, cfg.chunk_size, generate, store, total=len(planned), desc="sample",
                   unit="response")
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
                                  truncated=bool(x.get("truncated") or y.get("truncated"))))
    return pairs


def _fit_policy_prompts(todo: list[tuple[str, PromptItem, int]], policy: Backend,
                        gcfg: GenerationConfig, state: Overlong) -> list[tuple[str, PromptItem, int]]:
    """Prompts the policy can answer within its context (prompt + max_new_tokens): the rest
    are skipped or truncated per `state.mode`. A truncated prompt keeps its response ids."""
    limit, count = context_of(policy)
    if limit is None or count is None:
        return todo
    state.limit = limit

    def needed(texts: tuple[str, ...]) -> int:
        return (count([{"role": "user", "content": texts[0]}], "") or 0) + gcfg.max_new_tokens + 2

    base = needed(("",))
    fitted: dict[str, PromptItem | None] = {}
    for _, it, _ in todo:
        if it.id not in fitted:
            cut = fit_texts((it.prompt,), needed, limit, state, base)
            fitted[it.id] = (None if cut is None else it if cut[0] == it.prompt
                             else dataclasses.replace(it, prompt=cut[0], truncated=True))
    return [(rid, fitted[it.id], s) for rid, it, s in todo if fitted[it.id] is not None]


def run_label(cfg: LabelConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Run (or resume) the labelling stage; returns the manifest."""
    t0 = time.time()
    judge = cfg.judge
    c = load(cfg.constitution)
    judge.check_principles(c)
    # Bad input fails here, before anything is written.
    judge_model = resolve_spec(cfg.feedback_model)
    judge_id = judge_model.identity  # a python: judge is imported (and checked) here
    policy_model = resolve_spec(cfg.policy) if cfg.policy else None
    prompt_overlong = Overlong(cfg.overlong)
    if cfg.pairs:
        pairs = load_pairs(cfg.pairs, cfg.limit)
        stage = StageDir(cfg.out, STAGE)
    else:
        assert cfg.prompts is not None and policy_model is not None
        prompts = load_prompts(cfg.prompts, cfg.text_field, cfg.limit)
        stage = StageDir(cfg.out, STAGE)
        pairs = sample_pairs(cfg, stage.root, prompts, prompt_overlong, policy_model=policy_model,
                             judge_id=judge_id)
        prompt_overlong.warn("prompts (policy)")
    assert stage.store is not None
    backend = backend or load_backend(judge_model)
    overlong = Overlong(cfg.overlong)
    pairs = fit_pairs(pairs, c, backend, judge, cfg.seed, overlong)
    overlong.warn("pairs")
    if not pairs and overlong.skipped:
        raise CaiError(f"every pair is too long for the judge's context of {overlong.limit} "
                       "tokens; use --overlong truncate, or a judge with a longer context",
                       field="overlong")
    policy = policy_model.identity if policy_model else None
    ids: dict[str, PairItem] = {}
    for pair in pairs:
        # The id is known before judging, so finished pairs are skipped without a model call.
        ids.setdefault(label_id(pair, c, backend.identity, judge, cfg.seed), pair)
    todo = [p for rid, p in ids.items() if rid not in stage.store]
    engine = Engine.of(cfg)
    task = JudgeTask(judge, cfg.seed, c, cfg.feedback_model, policy,
                     backend if engine.name == "local" else None)
    new = run_chunks(todo, cfg.chunk_size, task, stage.store, total=len(ids), desc="label",
                     unit="pair", engine=engine)
    records = [r for r in stage.store if r["id"] in ids]
    prefs = [{"id": r["id"], "prompt": [{"role": "user", "content": r["prompt"]}],
              "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}],
              "p_chosen": r["p_chosen"], "flags": r["flags"]} for r in records]
    write_text_atomic(stage.root / "preferences.jsonl",
                      "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in prefs))
    stats = label_stats(records)
    manifest = write_manifest(
        stage.root, STAGE, config=cfg,
        constitution=c.stamp.as_dict(),
        models={"feedback": backend.identity, **({"policy": policy} if policy else {})},
        counts={"records": len(records), "new": new, **overlong.counts(),
                **prompt_overlong.counts("overlong_prompts")},
        started=t0,
        data=("data.jsonl", "preferences.jsonl", "responses.jsonl"),
        extra={"label_stats": stats})
    write_card(stage.root, "AI preference labels",
               f"Soft preference labels from `{backend.identity}` under {judge.principles} sampled "
               f"principles per pair ({judge.orders} orders, mode {judge.mode}); preferences.jsonl "
               "is in TRL's preference format plus `p_chosen`.", manifest)
    return manifest


register(Stage("label", LabelConfig, run_label,
               "RLAIF: soft preference labels from the feedback model's log-probs.",
               inputs=(Input("pairs", "pairs"), Input("prompts", "red-team-prompts"),
                       Input("policy", "policy"), Input("feedback_model", "judge-model")),
               outputs=(Output("labels"),), step="label", constitution_parts=("rl",)))

__all__ = ["LabelConfig", "run_label", "sample_pairs"]
