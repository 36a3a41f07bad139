"""The label stage (`cai label`): soft AI preference labels for pairs, written to disk.

Pairs come from a file, or from a policy that answers prompts several times
(`cai.policy_pairs`; every unordered pair of its answers to a prompt is labelled). Each pair
is judged by `cai.judge`: K sampled principles, both orders, p(a ≻ b) from the feedback model's
log-probs of "A" and "B". Labels are kept as records (resumable: a label's id is known
before judging) and as preferences.jsonl in TRL's preference format plus `p_chosen`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from cai.backends import Backend, GenerationConfig, load_resolved
from cai.backends.base import OVERLONG_MODES, Overlong
from cai.constitution import read
from cai.core import usage
from cai.core.data import HF_PREFIX, PROMPT_FORMATS, dialogue, load_pairs, read_prompts
from cai.core.errors import CaiError
from cai.core.models import resolve_spec
from cai.core.records import write_jsonl
from cai.core.resources import resolve
from cai.core.stage import (
    Engine,
    EngineFields,
    Input,
    Output,
    Stage,
    StageDir,
    register,
    write_card,
    write_manifest,
)
from cai.judge import LABEL, JudgeConfig, label_pairs
from cai.panel import label_panel, load_panel, panel_identity
from cai.policy_pairs import Sampling, sample_pairs

STAGE = LABEL


@dataclass
class LabelConfig(EngineFields):
    """Configuration of `cai label`; saved in the manifest so a run can be repeated."""

    constitution: str = "harmless"
    """Constitution whose comparison principles the judge is asked (a file, or a shipped
    name such as `harmless`)."""
    feedback_model: str = field(default="embedded:smollm2-135m",
                                metadata={"many": "judge.models"})
    """Model spec of the feedback model (the judge); given more than once, a panel of
    judges whose mean p is the label (`judge.models`)."""
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
    """Field holding the prompt text when reading prompts (a row with `messages` is a
    conversation: its final answers are compared given every turn)."""
    prompt_format: str = "plain"
    """How the prompt field is read: "plain" (one user turn) or "hh" (a "Human: ...
    Assistant: ..." transcript; a final assistant turn is dropped, as the policy answers)."""
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
                  (self.prompts is None or self.policy, "policy", "--prompts needs --policy"),
                  (self.prompt_format in PROMPT_FORMATS, "prompt_format",
                   f"must be one of {PROMPT_FORMATS}")]
        for ok, name, msg in checks:
            if not ok:
                raise CaiError(msg, field=name)


def run_label(cfg: LabelConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Run (or resume) the labelling stage; returns the manifest.

    Everything that can refuse the input (constitution, K, model specs, data) is read
    before anything is written. Each model spec is resolved once here and handed on."""
    t0, tokens = time.time(), usage.mark()
    judge = cfg.judge
    # Input files first, in one place (a bare name picks a shipped file, said on stderr).
    constitution_file = resolve(cfg.constitution, "constitutions")
    prompts_file = (None if not cfg.prompts else cfg.prompts
                    if cfg.prompts.startswith(HF_PREFIX) else resolve(cfg.prompts, "prompts"))
    c = read(constitution_file)
    judge.check_principles(c)
    panel = [resolve_spec(m) for m in judge.models]
    judge_model = resolve_spec(cfg.feedback_model)
    # A python: judge is imported (and checked) here.
    judge_id = (panel_identity([m.identity for m in panel], judge.panel_weights) if panel
                else judge_model.identity)
    policy_model = resolve_spec(cfg.policy) if cfg.policy else None
    prompt_overlong = Overlong(cfg.overlong)
    if cfg.pairs:
        pairs = load_pairs(cfg.pairs, cfg.limit)
        stage = StageDir(cfg.out, STAGE)
    else:
        assert prompts_file is not None and policy_model is not None
        prompts = read_prompts(prompts_file, cfg.text_field, cfg.limit, cfg.prompts,
                               cfg.prompt_format)
        stage = StageDir(cfg.out, STAGE)
        sampling = Sampling(cfg.responses_per_prompt,
                            GenerationConfig(cfg.max_new_tokens, cfg.policy_temperature, 1.0,
                                             cfg.seed), cfg.seed, cfg.chunk_size)
        pairs = sample_pairs(prompts, stage.root, sampling, prompt_overlong,
                             policy_model=policy_model, judge_id=judge_id)
    assert stage.store is not None
    overlong = Overlong(cfg.overlong)
    policy = policy_model.identity if policy_model else None
    if panel:
        members = load_panel(judge)
        labels = label_panel(pairs, c, members, judge, cfg.seed, stage.store, policy=policy,
                             overlong=overlong, chunk_size=cfg.chunk_size, engine=Engine.of(cfg))
        judges = {"feedback": judge_id,
                  **{f"feedback_{n + 1}": b.identity for n, b in enumerate(members)}}
    else:
        backend = backend or load_resolved(judge_model)
        labels = label_pairs(pairs, c, backend, judge, cfg.seed, stage.store,
                             feedback_model=cfg.feedback_model, policy=policy, overlong=overlong,
                             chunk_size=cfg.chunk_size, engine=Engine.of(cfg))
        judges = {"feedback": backend.identity}
    # A label whose judge gave no verdict at all is kept (flagged) but trains nothing.
    usable = [r for r in labels.records if "no-verdict" not in r["flags"]]
    prefs = [{"id": r["id"], "prompt": dialogue(r.get("context") or (), r["prompt"]),
              "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}],
              "p_chosen": r["p_chosen"], "flags": r["flags"]} for r in usable]
    write_jsonl(stage.root / "preferences.jsonl", prefs)
    manifest = write_manifest(
        stage.root, STAGE, config=cfg,
        constitution=c.stamp.as_dict(),
        models={**judges, **({"policy": policy} if policy else {})},
        counts={"records": len(labels.records), "new": labels.new, **overlong.counts(),
                **prompt_overlong.counts("overlong_prompts"), **verdict_counts(labels.records)},
        started=t0,
        data=("data.jsonl", "preferences.jsonl", "responses.jsonl"),
        extra={"label_stats": labels.stats, "tokens": usage.since(tokens)})
    write_card(stage.root, "AI preference labels",
               f"Soft preference labels from `{judge_id}` under {judge.principles} sampled "
               f"principles per pair ({judge.orders} orders, mode {judge.mode}); preferences.jsonl "
               "is in TRL's preference format plus `p_chosen`.", manifest)
    return manifest


def verdict_counts(records: list[dict]) -> dict[str, int]:
    """Verdict mode's counts for the manifest: written answers read as unparsed or refused,
    and labels flagged for them (absent when no answer was written)."""
    votes = [v for r in records for j in r["judgements"] for v in j.get("votes") or ()]
    if not votes:
        return {}
    return {"verdict_votes": len(votes), "votes_unparsed": votes.count("unparsed"),
            "votes_refused": votes.count("refused"),
            "labels_unparsed": sum("unparsed" in r["flags"] for r in records),
            "labels_judge_refused": sum("judge-refused" in r["flags"] for r in records),
            "labels_no_verdict": sum("no-verdict" in r["flags"] for r in records)}


register(Stage("label", LabelConfig, run_label,
               "RLAIF: soft preference labels from the feedback model's log-probs.",
               inputs=(Input("pairs", "pairs"), Input("prompts", "red-team-prompts"),
                       Input("policy", "policy", model=True),
                       Input("feedback_model", "judge-model", model=True),
                       Input("constitution", "constitution")),
               outputs=(Output("labels"),), pipeline=True, constitution_parts=("rl",)))

__all__ = ["LabelConfig", "run_label", "sample_pairs"]
