"""SL-CAI stage: respond → (critique → revise) × N rounds, in batch, into SL-CAI data.

For each red-team prompt a helpful model answers; then, each round, a principle is drawn
from the constitution (seeded, weighted), the model critiques its latest answer under it
and rewrites the answer. The constitution's worked examples come first in the same
conversation to steer the format. All prompts of a chunk move through a round together,
so every backend call is one big batch: all initial responses, then all round-1
critiques, all round-1 revisions, and so on.

Outputs in the stage folder:
- data.jsonl: one record per (prompt, sample) with every step kept;
- sft.jsonl: chat-format SFT data (prompt → final revision), optionally mixed with
  helpful prompts' plain responses;
- pairs.jsonl: preference pairs (final revision ≻ initial response) for DPO;
- manifest.json and a dataset card README.md.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from cai.backends import Backend, Generation, GenerationConfig, GenRequest, ReplicaTask, load_backend
from cai.backends.base import OVERLONG_MODES, Overlong, context_of, fit_to_context
from cai.constitution import Constitution, load, sample_sl_principle
from cai.core import usage
from cai.core.chunks import Engine, EngineFields, run_chunks
from cai.core.data import PROMPT_FORMATS, PromptItem, dialogue, load_prompts, with_system
from cai.core.errors import CaiError
from cai.core.records import OptionalFields, Provenance, Record, record_id, write_jsonl
from cai.core.seeds import derive_seed
from cai.core.stage import Input, Output, Stage, StageDir, register, write_card, write_manifest
from cai.core.text import is_bare_refusal, normalise
from cai.templates import CRITIQUE_PREFIX, REVISION_PREFIX, SLConversation

STAGE = "sl"


@dataclass
class SLConfig(EngineFields):
    """Configuration of `cai sl`; saved in the manifest so a run can be repeated."""

    prompts: str = "red_team"
    """Red-team prompts: a jsonl file, a local `datasets` folder or a shipped set's name."""
    constitution: str = "harmless"
    """Constitution whose principles drive the critiques and revisions (a file, or a
    shipped name such as `harmless`)."""
    model: str = "embedded:smollm2-135m"
    """Model spec of the helpful model that answers, critiques and revises."""
    out: str = "runs/sl"
    """Output folder; rerunning with the same folder resumes."""
    rounds: int | None = None
    """Critique → revision rounds; default: the constitution's `sl.rounds`."""
    samples_per_prompt: int = 1
    """Independent samples (each with its own principle draws) per prompt."""
    limit: int | None = None
    """Use only the first N prompts."""
    text_field: str = "prompt"
    """Field holding the prompt text in the input (a row with `messages` is a conversation:
    its last user turn is answered with every earlier turn in context)."""
    prompt_format: str = "plain"
    """How the prompt field is read: "plain" (one user turn) or "hh" (a "Human: ...
    Assistant: ..." transcript; a final assistant turn is dropped, as the model answers)."""
    system_prompt: str | None = None
    """System prompt for the model's conversations (replacing any system turn in the data);
    recorded in each record's provenance and kept in the SFT data."""
    few_shot: int | None = None
    """How many of the constitution's worked examples to show; default all."""
    max_new_tokens: int = 192
    """Token budget of each response, critique and revision."""
    temperature: float = 0.7
    """Sampling temperature (0 = greedy)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    seed: int = 0
    """Run seed: principle draws and sampling seeds derive from it and each prompt."""
    chunk_size: int = 64
    """Prompts moved through all rounds together; each finished chunk is written (and
    fsynced) at once, so a kill loses at most one chunk."""
    helpful_prompts: str | None = None
    """Optional helpful prompts whose plain responses are mixed into the SFT data."""
    helpful_ratio: float = 0.0
    """Helpful SFT examples per red-team SFT example (0 = none)."""
    min_words: int = 3
    """Revisions shorter than this count as empty."""
    drop_cut_off: bool = True
    """Drop records whose final revision hit the token budget (a cut-off answer teaches the
    model to stop mid-sentence); off only for smoke runs with tiny budgets."""

    overlong: str = "skip"
    """A prompt whose conversation could outgrow the model's context (worked examples,
    prompt, and every round's response, critique and revision at full max_new_tokens):
    "skip" leaves it out, "truncate" cuts the prompt text to fit (with a warning). Both are
    counted in the manifest (overlong_skipped, overlong_truncated)."""

    def __post_init__(self) -> None:
        finite = all(math.isfinite(x) for x in (self.temperature, self.top_p, self.helpful_ratio))
        checks = [
            (finite, "temperature", "temperature, top_p and helpful_ratio must be finite"),
            (self.rounds is None or 1 <= self.rounds <= 64, "rounds", "must be from 1 to 64"),
            (self.samples_per_prompt >= 1, "samples_per_prompt", "must be at least 1"),
            (self.helpful_ratio >= 0, "helpful_ratio", "must be >= 0"),
            (self.chunk_size >= 1, "chunk_size", "must be at least 1"),
            (self.limit is None or self.limit >= 1, "limit", "must be at least 1"),
            (self.few_shot is None or self.few_shot >= 0, "few_shot", "must be >= 0"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
            (self.min_words >= 0, "min_words", "must be >= 0"),
            (0 <= self.temperature <= 100, "temperature", "must be from 0 to 100"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.overlong in OVERLONG_MODES, "overlong", f"must be one of {OVERLONG_MODES}"),
            (self.prompt_format in PROMPT_FORMATS, "prompt_format",
             f"must be one of {PROMPT_FORMATS}"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise CaiError(msg, field=name)

    def generation(self) -> GenerationConfig:
        return GenerationConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)


class SLRound(BaseModel):
    """One critique → revision round of a record."""

    round: int
    principle: str
    """Id of the SL principle sampled for this round."""
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    critique_finish: str = "stop"
    revision_finish: str = "stop"


class SLRecord(Record, OptionalFields):
    """Everything one prompt went through in the SL stage."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("context",)

    kind: str = "red-team"
    """"red-team" (critiqued and revised) or "helpful" (plain response for the SFT mix)."""
    prompt_id: str
    prompt: str
    """The user turn answered (the last one of a conversation)."""
    category: str = ""
    sample: int = 0
    initial: str
    initial_finish: str = "stop"
    rounds: list[SLRound]
    final: str
    filters: list[str]
    """Quality filters this record failed; a record with any is left out of sft/pairs."""
    flags: list[str]
    """Observations that do not drop the record (e.g. "bare-refusal")."""
    keep: bool
    context: list[dict[str, str]] | None = None
    """The conversation's earlier turns before `prompt` (system, user, assistant); absent
    for a one-turn prompt."""


# --------------------------------------------------------------------------- quality


def _check_format(text: str, own_prefix: str) -> bool:
    """True when a critique/revision stayed in its turn: no other turn's marker inside it."""
    markers = ("Human:", "User:", "Assistant:", CRITIQUE_PREFIX, REVISION_PREFIX)
    return not any(m in text for m in markers if m != own_prefix) and own_prefix not in text


def quality(rec_initial: str, rounds: list[SLRound], final: str, final_finish: str,
            min_words: int) -> tuple[list[str], list[str]]:
    """Filters (drop) and flags (keep) of one record; each is counted in the manifest."""
    filters, flags = [], []
    if len(final.split()) < min_words:
        filters.append("empty-revision")
    elif final_finish == "length":
        filters.append("cut-off-revision")
    if rounds and normalise(final) == normalise(rec_initial):
        filters.append("unchanged-revision")
    if any(not _check_format(r.critique, CRITIQUE_PREFIX) or not r.critique.strip()
           for r in rounds):
        filters.append("critique-format")
    if any(not _check_format(r.revision, REVISION_PREFIX) for r in rounds):
        filters.append("revision-format")
    if is_bare_refusal(final):
        flags.append("bare-refusal")
    return filters, flags


# --------------------------------------------------------------------------- the stage


@dataclass
class _Work:
    """One (prompt, sample) moving through the rounds."""

    item: PromptItem
    sample: int
    rid: str
    seed: int
    convo: SLConversation
    kind: str = "red-team"
    initial: Generation | None = None
    rounds: list[SLRound] = field(default_factory=list)
    last: Generation | None = None


def _gen(backend: Backend, chats: list, prefix: str, seeds: list[int],
         cfg: GenerationConfig) -> list[Generation]:
    reqs = [GenRequest(chat, prefix, seed) for chat, seed in zip(chats, seeds)]
    return backend.generate(reqs, cfg) if reqs else []


def run_chunk(work: list[_Work], c: Constitution, backend: Backend, cfg: SLConfig,
              rounds: int) -> None:
    """Move a chunk of prompts through the initial response and every round, in batches."""
    gcfg = cfg.generation()
    outs = _gen(backend, [w.convo.history for w in work], "", [w.seed for w in work], gcfg)
    for w, g in zip(work, outs):
        w.initial = w.last = g
        w.convo.respond(g.text)
    red = [w for w in work if w.kind == "red-team"]
    for r in range(1, rounds + 1):
        principles = [sample_sl_principle(c, cfg.seed, w.item.id, w.sample, r) for w in red]
        crit = _gen(backend, [w.convo.critique_chat(p) for w, p in zip(red, principles)],
                    CRITIQUE_PREFIX + " ", [derive_seed(w.seed, r, "c") % 2**31 for w in red], gcfg)
        for w, p, g in zip(red, principles, crit):
            w.convo.add_critique(p, g.text)
        rev = _gen(backend, [w.convo.revision_chat(p) for w, p in zip(red, principles)],
                   REVISION_PREFIX + " ", [derive_seed(w.seed, r, "r") % 2**31 for w in red], gcfg)
        for w, p, gc, gr in zip(red, principles, crit, rev):
            w.convo.add_revision(p, gr.text)
            w.rounds.append(SLRound(
                round=r, principle=p.id, critique_request=p.critique, critique=gc.text,
                revision_request=p.revision, revision=gr.text, critique_finish=gc.finish_reason,
                revision_finish=gr.finish_reason))
            w.last = gr


def _to_record(w: _Work, c: Constitution, cfg: SLConfig, model: str) -> SLRecord:
    assert w.initial is not None and w.last is not None
    final = w.last.text
    filters, flags = quality(w.initial.text, w.rounds, final, w.last.finish_reason, cfg.min_words)
    if w.item.truncated:
        flags.append("truncated-prompt")
    gcfg = cfg.generation()
    return SLRecord(
        id=w.rid, stage=STAGE, kind=w.kind,
        provenance=Provenance(constitution=c.stamp.as_dict(), model=model,
                              sampling={**gcfg.as_dict(), "few_shot": cfg.few_shot,
                                        "item_seed": w.seed,
                                        **({"system_prompt": cfg.system_prompt}
                                           if cfg.system_prompt else {})}, seed=cfg.seed),
        prompt_id=w.item.id, prompt=w.item.prompt, category=w.item.category, sample=w.sample,
        initial=w.initial.text, initial_finish=w.initial.finish_reason, rounds=w.rounds,
        final=final, filters=filters, flags=flags, keep=not filters,
        context=[dict(m) for m in w.item.context] if w.item.context else None)


def fit_prompts(items: list[PromptItem], c: Constitution, cfg: SLConfig, rounds: int,
                backend: Backend, state: Overlong, kind: str = "red-team") -> list[PromptItem]:
    """The prompts whose whole conversation fits the model's context, skipped or truncated
    per `state.mode` (and counted there); all of them when the backend cannot count tokens.

    The bound is the last request of the last round — worked examples, the prompt, the
    longest critique and revision requests of the constitution — plus every text the model
    generates on the way (response, critiques and revisions) at full `max_new_tokens`.
    """
    limit, count = context_of(backend)
    if limit is None or count is None:
        return items
    n_rounds = rounds if kind == "red-team" else 0
    gen = cfg.max_new_tokens + 2  # a decoded text can re-encode a token or two longer

    def longest(texts: list[str]) -> str:
        return max(texts, key=lambda t: count([{"role": "user", "content": t}], "") or 0)

    crit = longest([p.critique for p in c.sl_principles]) if n_rounds else ""
    rev = longest([p.revision for p in c.sl_principles]) if n_rounds else ""

    def needed(texts: tuple[str, ...], context: tuple = ()) -> int:
        convo = _conversation(c, texts[0], context, cfg.few_shot, kind)
        if not n_rounds:
            return (count(convo.history, "") or 0) + gen
        convo.respond("")
        for r in range(n_rounds):
            convo.history.append({"role": "user", "content": crit})
            convo.history.append({"role": "assistant", "content": CRITIQUE_PREFIX + " "})
            convo.history.append({"role": "user", "content": rev})
            if r < n_rounds - 1:
                convo.history.append({"role": "assistant", "content": REVISION_PREFIX + " "})
        return (count(convo.history, REVISION_PREFIX + " ") or 0) + (2 * n_rounds + 1) * gen

    # A conversation's earlier turns are kept whole; only the turn to answer is cut.
    return fit_to_context(items, limit, state, texts=lambda it: (it.prompt,),
                          needed=lambda it, texts: needed(texts, it.context), base=needed(("",)),
                          shrink=_cut_prompt).kept


def _cut_prompt(item: PromptItem, texts: tuple[str, ...]) -> PromptItem:
    return dataclasses.replace(item, prompt=texts[0], truncated=True)


def _conversation(c: Constitution, prompt: str, context: tuple, few_shot: int | None,
                  kind: str) -> SLConversation:
    """The chat a prompt starts from; helpful prompts get a plain conversation, with no
    constitution examples before them."""
    if kind == "red-team":
        return SLConversation.start(c, prompt, few_shot, context)
    return SLConversation(dialogue(context, prompt))


def plan(items: list[PromptItem], c: Constitution, cfg: SLConfig, model: str, rounds: int,
         kind: str = "red-team") -> list[_Work]:
    """One unit of work per (prompt, sample), each with an id that hashes all its inputs."""
    gcfg = cfg.generation().as_dict()
    work = []
    for item in items:
        for s in range(cfg.samples_per_prompt if kind == "red-team" else 1):
            n_rounds = rounds if kind == "red-team" else 0
            rid = record_id(STAGE, kind, item.key(), c.hash, model, gcfg, cfg.few_shot,
                            n_rounds, cfg.seed, s)
            seed = derive_seed(cfg.seed, item.id, s) % 2**31
            convo = _conversation(c, item.prompt, item.context, cfg.few_shot, kind)
            work.append(_Work(item, s, rid, seed, convo, kind))
    return work


@dataclass
class SLTask(ReplicaTask):
    """A chunk of SL work as a picklable callable: run here, or on a Ray actor that loads
    its own backend replica once."""

    cfg: SLConfig
    c: Constitution
    rounds: int
    backend: Backend | None = None

    def model_spec(self) -> str:
        return self.cfg.model

    def __call__(self, chunk: list[_Work]) -> list[SLRecord]:
        backend = self.replica()
        run_chunk(chunk, self.c, backend, self.cfg, self.rounds)
        return [_to_record(w, self.c, self.cfg, backend.identity) for w in chunk]


def run_sl(cfg: SLConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Run (or resume) the SL stage; returns the manifest."""
    t0, tokens = time.time(), usage.mark()
    c = load(cfg.constitution)
    if cfg.few_shot is not None and cfg.few_shot > len(c.few_shot):
        # Refused, not clamped: few_shot is part of every record id, so a clamped 10 would
        # give the records of 3 under other ids.
        raise CaiError(f"{cfg.few_shot} is more than the {len(c.few_shot)} worked examples of "
                       f"{c.path} (sl.few_shot); give 0 to {len(c.few_shot)}, or leave it unset "
                       "for all", field="few_shot")
    rounds = cfg.rounds or c.spec.sl.rounds
    items = [with_system(it, cfg.system_prompt)
             for it in load_prompts(cfg.prompts, cfg.text_field, cfg.limit, cfg.prompt_format)]
    helpful = ([with_system(it, cfg.system_prompt)
                for it in load_prompts(cfg.helpful_prompts, cfg.text_field,
                                       prompt_format=cfg.prompt_format)]
               if cfg.helpful_prompts else [])
    stage = StageDir(cfg.out, STAGE)  # claimed and test-written before any model loads
    assert stage.store is not None
    backend = backend or load_backend(cfg.model)
    overlong = Overlong(cfg.overlong)
    items = fit_prompts(items, c, cfg, rounds, backend, overlong)
    work = plan(items, c, cfg, backend.identity, rounds)
    if helpful and cfg.helpful_ratio > 0:
        n_help = min(len(helpful), round(cfg.helpful_ratio * len(work)))
        helpful = fit_prompts(helpful[:n_help], c, cfg, rounds, backend, overlong, "helpful")
        work += plan(helpful, c, cfg, backend.identity, rounds, kind="helpful")
    overlong.warn("prompts")
    if not work and overlong.skipped:
        raise CaiError(f"every prompt is too long for the model's context of {overlong.limit} "
                       f"tokens with {rounds} rounds of up to {cfg.max_new_tokens} new tokens; "
                       "lower --max-new-tokens, --rounds or --few-shot, or use --overlong "
                       "truncate", field="overlong")
    todo = [w for w in work if w.rid not in stage.store]

    engine = Engine.of(cfg)
    task = SLTask(cfg, c, rounds, backend if engine.name == "local" else None)
    new = run_chunks(todo, cfg.chunk_size, task, stage.store, total=len(work), desc="sl",
                     engine=engine)
    wanted = {w.rid for w in work}
    records = [r for r in stage.store if r["id"] in wanted]
    counts = write_outputs(stage.root, records, cfg.seed, cfg.drop_cut_off)
    manifest = write_manifest(
        stage.root, STAGE, config=cfg,
        constitution=c.stamp.as_dict(), models={"policy": backend.identity},
        counts={"records": len(records), "new": new, "rounds": rounds, **counts,
                **overlong.counts()}, started=t0,
        data=("data.jsonl", "sft.jsonl", "pairs.jsonl"), extra={"tokens": usage.since(tokens)})
    write_card(stage.root, "SL-CAI data", "Red-team prompts answered, critiqued and revised "
               f"under {rounds} sampled principles each (constitution `{c.name}`).", manifest)
    return manifest


def write_outputs(root: Path, records: list[dict], seed: int,
                  drop_cut_off: bool = True) -> dict[str, int]:
    """Derive sft.jsonl and pairs.jsonl from the records; count every filter and flag.

    Records keep every filter they failed; which filters drop a record is decided here, so
    changing `drop_cut_off` on a finished run needs no new generation."""
    red = [r for r in records if r["kind"] == "red-team"]
    helpful = [r for r in records if r["kind"] == "helpful" and len(r["final"].split()) > 0
               and r["initial_finish"] == "stop"]
    counts: dict[str, int] = {"red_team": len(red), "helpful": len(helpful)}
    for r in red:
        for f in r["filters"]:
            counts[f"filter:{f}"] = counts.get(f"filter:{f}", 0) + 1
        for f in r["flags"]:
            counts[f"flag:{f}"] = counts.get(f"flag:{f}", 0) + 1
    ignored = set() if drop_cut_off else {"cut-off-revision"}
    kept = [r for r in red if not set(r["filters"]) - ignored]
    counts["kept"] = len(kept)

    def chat(r: dict, text: str) -> list[dict[str, str]]:
        # The whole conversation, the answer last: SFT's loss falls on that answer only.
        return dialogue(r.get("context") or (), r["prompt"]) + [
            {"role": "assistant", "content": text}]

    sft = [{"id": r["id"], "kind": r["kind"], "messages": chat(r, r["final"])}
           for r in kept + helpful]
    random.Random(seed).shuffle(sft)
    pairs = [{"id": r["id"], "prompt": dialogue(r.get("context") or (), r["prompt"]),
              "chosen": [{"role": "assistant", "content": r["final"]}],
              "rejected": [{"role": "assistant", "content": r["initial"]}], "p_chosen": 1.0}
             for r in kept]
    for name, rows in (("sft.jsonl", sft), ("pairs.jsonl", pairs)):
        write_jsonl(root / name, rows)
    counts["sft_examples"] = len(sft)
    counts["pairs"] = len(pairs)
    return counts


register(Stage("sl", SLConfig, run_sl, "SL-CAI: respond, critique and revise in rounds.",
               inputs=(Input("prompts", "red-team-prompts"),
                       Input("helpful_prompts", "helpful-prompts"),
                       Input("model", "base-model", model=True), Input("constitution", "constitution")),
               outputs=(Output("sl-data"),), pipeline=True, constitution_parts=("sl",)))

__all__ = ["SLConfig", "SLRecord", "SLRound", "run_sl", "fit_prompts"]
