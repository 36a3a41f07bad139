"""RLAIF feedback: soft AI preference labels from the judge's log-probabilities.

For each pair the feedback model is asked K multiple-choice questions, one per principle
sampled from the constitution (seeded, weighted, distinct), each in both orders of the
two responses. A label is read from the judge's next-token log-probs of "A" and "B":

    p_order   = softmax(logp_A, logp_B)                  per principle and order
    p_k       = ½ · [p_A(a first) + p_B(b first)]        both orders cancel position bias
    p(a ≻ b)  = mean over the K principles               an ensemble, not one question

The principles drawn for a pair depend only on the pair's content, never on which response
came first, so swapping a pair's responses gives exactly 1 − p. Beside the label each
record keeps, per principle and order, both log-probs and the probability mass on the two
letters (low mass = the judge is not answering the question), and flags position-
inconsistent, low-mass and tied pairs.

Modes: `logprob` (above); `cot` (the judge reasons first, then is scored; p is clamped to
[0.4, 0.6] because reasoned labels come out overconfident); `score` (the judge rates each
response 1–10, read as an expected value from the digit probabilities; usable as a reward).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel
from tqdm.auto import tqdm

from cai.backends import Backend, GenerationConfig, GenRequest, ScoreRequest, load_backend
from cai.config import to_dict
from cai.constitution import Constitution, derive_seed, load, sample_rl_principles
from cai.data import PairItem, PromptItem, load_pairs, load_prompts
from cai.errors import CaiError
from cai.records import JsonlStore, Provenance, Record, StageDir, record_id, write_text_atomic
from cai.templates import (
    COT_ANSWER,
    COT_PREFIX,
    JUDGE_PREFIX,
    LAYOUTS,
    RATING_PREFIX,
    judge_chat,
    rating_chat,
)

STAGE = "label"
MODES = ("logprob", "cot", "score")
ORDERS = ("both", "one")
COT_CLAMP = (0.4, 0.6)


@dataclass
class LabelConfig:
    """Configuration of `cai label`; saved in the manifest so a run can be repeated."""

    constitution: str = "constitutions/harmless.yaml"
    """Constitution whose comparison principles the judge is asked."""
    feedback_model: str = "embedded:smollm2-135m"
    """Model spec of the feedback model (the judge)."""
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
    """Token budget of each policy response (and of CoT reasoning)."""
    principles: int = 4
    """K: distinct principles sampled per pair."""
    orders: str = "both"
    """"both" asks each question with the responses in both orders; "one" in one order,
    drawn per pair."""
    mode: str = "logprob"
    """"logprob", "cot" (reason, then score; p clamped to [0.4, 0.6]) or "score" (1–10)."""
    layout: str = "options-first"
    """Judge prompt layout: "options-first" (shares work across principles) or
    "principle-first" (the original layout)."""
    tie_threshold: float = 0.05
    """A pair with |p − ½| below this is flagged as a tie."""
    low_mass_threshold: float = 0.5
    """A judgement whose probability mass on the letters is below this is flagged."""
    keep_prompts: bool = False
    """Store the exact text scored and the token strings, to recompute any label."""
    limit: int | None = None
    """Label only the first N pairs (or prompts)."""
    text_field: str = "prompt"
    """Field holding the prompt text when reading prompts."""
    seed: int = 0
    """Run seed: principle draws, order draws and policy samples derive from it."""
    chunk_size: int = 32
    """Pairs scored in one backend call; each finished chunk is written and fsynced."""

    def __post_init__(self) -> None:
        checks = [(self.mode in MODES, "mode", f"must be one of {MODES}"),
                  (self.orders in ORDERS, "orders", f"must be one of {ORDERS}"),
                  (self.layout in LAYOUTS, "layout", f"must be one of {LAYOUTS}"),
                  (self.principles >= 1, "principles", "must be at least 1"),
                  (self.responses_per_prompt >= 2, "responses_per_prompt", "must be at least 2"),
                  (0 <= self.tie_threshold < 0.5, "tie_threshold", "must be in [0, 0.5)"),
                  ((self.pairs is None) != (self.prompts is None), "pairs",
                   "give exactly one of --pairs or --prompts"),
                  (self.prompts is None or self.policy, "policy", "--prompts needs --policy")]
        for ok, name, msg in checks:
            if not ok:
                raise CaiError(msg, field=name)


class Judgement(BaseModel):
    """One question put to the judge: a principle in one order."""

    principle: str
    order: str
    """"ab" (response_a shown as (A)) or "ba"."""
    logprob_a: float
    """Full-vocabulary log-prob of the letter "A" as the next token."""
    logprob_b: float
    mass: float
    """p("A") + p("B"): how much the judge answers the question at all."""
    p_first: float
    """softmax over the two letters: probability that option (A) is better."""
    reasoning: str | None = None
    prompt_text: str | None = None
    """With --keep-prompts: the exact text scored."""


class LabelRecord(Record):
    """A soft AI preference label for one pair."""

    pair_id: str
    prompt: str
    response_a: str
    response_b: str
    p_a: float
    """Probability that response_a is better (before picking chosen/rejected)."""
    chosen: str
    rejected: str
    p_chosen: float
    judgements: list[Judgement]
    scores: dict[str, float] | None = None
    """Score mode: expected 1–10 rating of each response ("a", "b")."""
    flags: list[str]
    choice_tokens: list[str] | None = None
    """With --keep-prompts: the token strings whose log-probs were read."""
    policy: str | None = None


# --------------------------------------------------------------------------- judging


def pair_key(pair: PairItem) -> tuple[str, str, str]:
    """An order-free key: the same for (a, b) and (b, a)."""
    a, b = sorted((pair.response_a, pair.response_b))
    return (pair.prompt, a, b)


def _softmax2(x: float, y: float) -> float:
    m = max(x, y)
    ex, ey = math.exp(x - m), math.exp(y - m)
    return ex / (ex + ey)


@dataclass
class _Question:
    pair: int
    principle: str
    order: str
    request: ScoreRequest
    reasoning: str | None = None


def _plan(pairs: list[PairItem], c: Constitution, cfg: LabelConfig) -> list[_Question]:
    qs = []
    for i, pair in enumerate(pairs):
        key = pair_key(pair)
        principles = sample_rl_principles(c, cfg.principles, cfg.seed, *key)
        if cfg.orders == "both":
            orders = ["ab", "ba"]
        else:  # one order, drawn from the order-free key so a swap keeps the same layout
            first_is_smaller = derive_seed(cfg.seed, "order", *key) % 2 == 0
            orders = ["ab" if (pair.response_a == key[1]) == first_is_smaller else "ba"]
        for p in principles:
            for o in orders:
                first, second = ((pair.response_a, pair.response_b) if o == "ab"
                                 else (pair.response_b, pair.response_a))
                chat = judge_chat(pair.prompt, first, second, p, cfg.layout)
                qs.append(_Question(i, p.id, o, ScoreRequest(chat, JUDGE_PREFIX)))
    return qs


def _add_reasoning(qs: list[_Question], backend: Backend, cfg: LabelConfig) -> None:
    """CoT: the judge writes its reasoning (greedy), then is scored after it."""
    gens = backend.generate([GenRequest(q.request.chat, COT_PREFIX + " ", 0) for q in qs],
                            GenerationConfig(cfg.max_new_tokens, 0.0, 1.0, cfg.seed))
    for q, g in zip(qs, gens):
        reasoning = g.text.split("(A)")[0].strip() if "answer is" in g.text else g.text.strip()
        q.reasoning = reasoning
        q.request = ScoreRequest(q.request.chat, f"{COT_PREFIX} {reasoning}{COT_ANSWER}")


def judge_pairs(pairs: list[PairItem], c: Constitution, backend: Backend,
                cfg: LabelConfig) -> list[LabelRecord]:
    """Label pairs in one batch of backend calls. Pure: no files are touched."""
    if cfg.mode == "score":
        return _score_pairs(pairs, c, backend, cfg)
    qs = _plan(pairs, c, cfg)
    if cfg.mode == "cot":
        _add_reasoning(qs, backend, cfg)
    result = backend.choice_logprobs([q.request for q in qs], ("A", "B"))
    per_pair: dict[int, list[Judgement]] = {}
    for q, (la, lb) in zip(qs, result.logprobs):
        p_first = _softmax2(float(la), float(lb))
        if cfg.mode == "cot":
            p_first = min(max(p_first, COT_CLAMP[0]), COT_CLAMP[1])
        text = backend.render(q.request.chat, q.request.answer_prefix) if cfg.keep_prompts else None
        per_pair.setdefault(q.pair, []).append(Judgement(
            principle=q.principle, order=q.order, logprob_a=float(la), logprob_b=float(lb),
            mass=float(math.exp(la) + math.exp(lb)), p_first=p_first, reasoning=q.reasoning,
            prompt_text=text))
    tokens = result.choice_tokens if cfg.keep_prompts else None
    return [_finish(pair, per_pair[i], None, c, backend, cfg, tokens) for i, pair in enumerate(pairs)]


def p_response_a(js: list[Judgement]) -> float:
    """Mean over principles of the both-order (or one-order) probability that a is better."""
    by_principle: dict[str, list[float]] = {}
    for j in js:
        by_principle.setdefault(j.principle, []).append(j.p_first if j.order == "ab"
                                                         else 1.0 - j.p_first)
    return float(np.mean([np.mean(v) for v in by_principle.values()]))


def _sampling(cfg: LabelConfig) -> dict[str, Any]:
    return {"mode": cfg.mode, "principles": cfg.principles, "orders": cfg.orders,
            "layout": cfg.layout, "tie_threshold": cfg.tie_threshold,
            "low_mass_threshold": cfg.low_mass_threshold}


def label_id(pair: PairItem, c: Constitution, model: str, cfg: LabelConfig) -> str:
    """A label's id hashes the pair, the constitution, the judge, the method and the seed."""
    return record_id(STAGE, pair.prompt, pair.response_a, pair.response_b, c.hash, model,
                     _sampling(cfg), cfg.seed)


def _finish(pair: PairItem, js: list[Judgement], scores: dict[str, float] | None,
            c: Constitution, backend: Backend, cfg: LabelConfig,
            tokens: list[str] | None) -> LabelRecord:
    p_a = p_response_a(js) if scores is None else 1 / (1 + math.exp(scores["b"] - scores["a"]))
    flags = []
    orders = {j.order for j in js}
    if len(orders) == 2:
        ab = np.mean([j.p_first for j in js if j.order == "ab"])
        ba = np.mean([1 - j.p_first for j in js if j.order == "ba"])
        if (ab - 0.5) * (ba - 0.5) < 0:
            flags.append("position-inconsistent")
    if js and np.mean([j.mass for j in js]) < cfg.low_mass_threshold:
        flags.append("low-mass")
    if abs(p_a - 0.5) < cfg.tie_threshold:
        flags.append("tie")
    a_wins = p_a >= 0.5
    return LabelRecord(
        id=label_id(pair, c, backend.spec, cfg), stage=STAGE,
        provenance=Provenance(constitution=c.stamp.as_dict(), model=backend.spec,
                              sampling=_sampling(cfg), seed=cfg.seed),
        pair_id=pair.id, prompt=pair.prompt, response_a=pair.response_a,
        response_b=pair.response_b, p_a=p_a,
        chosen=pair.response_a if a_wins else pair.response_b,
        rejected=pair.response_b if a_wins else pair.response_a,
        p_chosen=p_a if a_wins else 1 - p_a, judgements=js, scores=scores, flags=flags,
        choice_tokens=tokens, policy=cfg.policy)


RATINGS = tuple(str(i) for i in range(1, 10))


def expected_ratings(backend: Backend, requests: list[ScoreRequest]) -> np.ndarray:
    """Expected 1–10 rating per request, exact from the digit probabilities.

    "10" may be two tokens ("1", "0"), so P("1") is split by a second scoring of the
    prompt followed by "1": P(10) = P("1")·P("0" | "1") and P(1) = P("1")·(1 − P("0" | "1")).
    """
    digits = np.exp(backend.choice_logprobs(requests, RATINGS).logprobs)  # [n, 9]
    after_one = [ScoreRequest(r.chat, r.answer_prefix + "1") for r in requests]
    p_zero = np.exp(backend.choice_logprobs(after_one, ("0",)).logprobs[:, 0])
    probs = np.concatenate([digits, (digits[:, 0] * p_zero)[:, None]], axis=1)
    probs[:, 0] *= 1 - p_zero
    values = np.arange(1, 11)
    return (probs * values).sum(axis=1) / probs.sum(axis=1)


def _score_pairs(pairs: list[PairItem], c: Constitution, backend: Backend,
                 cfg: LabelConfig) -> list[LabelRecord]:
    reqs, index = [], []
    for i, pair in enumerate(pairs):
        for p in sample_rl_principles(c, cfg.principles, cfg.seed, *pair_key(pair)):
            for side, resp in (("a", pair.response_a), ("b", pair.response_b)):
                reqs.append(ScoreRequest(rating_chat(pair.prompt, resp, p), RATING_PREFIX))
                index.append((i, side))
    ratings = expected_ratings(backend, reqs)
    out = []
    for i, pair in enumerate(pairs):
        scores = {s: float(np.mean([r for (j, side), r in zip(index, ratings)
                                    if j == i and side == s])) for s in ("a", "b")}
        out.append(_finish(pair, [], scores, c, backend, cfg, None))
    return out


# --------------------------------------------------------------------------- the stage


def label_stats(records: list[dict]) -> dict[str, float]:
    """Label statistics kept in the manifest."""
    if not records:
        return {}
    n = len(records)

    def rate(flag: str) -> float:
        return round(sum(flag in r["flags"] for r in records) / n, 4)

    return {"pairs": n, "position_inconsistency_rate": rate("position-inconsistent"),
            "mean_abs_p_minus_half": round(float(np.mean([abs(r["p_a"] - 0.5) for r in records])), 4),
            "low_mass_rate": rate("low-mass"), "tie_rate": rate("tie"),
            "mean_mass": round(float(np.mean([j["mass"] for r in records for j in r["judgements"]]
                                             or [float("nan")])), 4)}


def sample_pairs(cfg: LabelConfig, stage: StageDir, prompts: list[PromptItem]) -> list[PairItem]:
    """Policy answers each prompt `responses_per_prompt` times; all unordered pairs follow.

    Responses are kept in responses.jsonl so a rerun does not sample them again.
    """
    assert cfg.policy
    store = JsonlStore(stage.root / "responses.jsonl")
    gcfg = GenerationConfig(cfg.max_new_tokens, cfg.policy_temperature, 1.0, cfg.seed)
    todo = []
    for item in prompts:
        for s in range(cfg.responses_per_prompt):
            rid = record_id("response", item.prompt, cfg.policy, gcfg.as_dict(), cfg.seed, s)
            if rid not in store:
                todo.append((rid, item, s))
    if todo:
        policy = load_backend(cfg.policy)
        chats = [GenRequest([{"role": "user", "content": it.prompt}], "",
                            derive_seed(cfg.seed, it.id, s) % 2**31) for _, it, s in todo]
        gens = policy.generate(chats, gcfg)
        store.append({"id": rid, "prompt_id": it.id, "prompt": it.prompt, "sample": s,
                      "text": g.text, "finish": g.finish_reason, "model": cfg.policy,
                      "sampling": gcfg.as_dict()} for (rid, it, s), g in zip(todo, gens))
    by_prompt: dict[str, list[dict]] = {}
    for r in store:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for item in prompts:
        rs = sorted(by_prompt.get(item.id, []), key=lambda r: r["sample"])
        for x, y in itertools.combinations(rs, 2):
            pairs.append(PairItem(f"{item.id}:{x['sample']}-{y['sample']}", item.prompt,
                                  x["text"], y["text"]))
    return pairs


def run_label(cfg: LabelConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Run (or resume) the labelling stage; returns the manifest."""
    t0 = time.time()
    c = load(cfg.constitution)
    if cfg.principles > len(c.rl_principles):
        raise CaiError(f"asks for {cfg.principles} distinct principles but {c.path} has "
                       f"{len(c.rl_principles)}", field="principles")
    # Bad input fails here, before anything is written.
    if cfg.pairs:
        pairs = load_pairs(cfg.pairs, cfg.limit)
        stage = StageDir(cfg.out, STAGE)
    else:
        prompts = load_prompts(cfg.prompts, cfg.text_field, cfg.limit)
        stage = StageDir(cfg.out, STAGE)
        pairs = sample_pairs(cfg, stage, prompts)
    backend = backend or load_backend(cfg.feedback_model)
    ids = {}
    todo = []
    for pair in pairs:
        # The id is known before judging, so finished pairs are skipped without a model call.
        rid = label_id(pair, c, backend.spec, cfg)
        ids[rid] = pair
        if rid not in stage.store:
            todo.append(pair)
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="label", unit="pair")
    for start in range(0, len(todo), cfg.chunk_size):
        chunk = todo[start:start + cfg.chunk_size]
        stage.store.append(judge_pairs(chunk, c, backend, cfg))
        bar.update(len(chunk))
    bar.close()
    records = [r for r in stage.store if r["id"] in ids]
    prefs = [{"id": r["id"], "prompt": [{"role": "user", "content": r["prompt"]}],
              "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}],
              "p_chosen": r["p_chosen"]} for r in records]
    write_text_atomic(stage.root / "preferences.jsonl",
                      "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in prefs))
    stats = label_stats(records)
    manifest = stage.write_manifest(
        config=to_dict(cfg), constitution=c.stamp.as_dict(),
        models={"feedback": backend.spec, **({"policy": cfg.policy} if cfg.policy else {})},
        counts={"records": len(records), "new": len(todo)},
        timings={"total": round(time.time() - t0, 2)}, extra={"label_stats": stats})
    stage.write_card("AI preference labels",
                     f"Soft preference labels from `{backend.spec}` under {cfg.principles} "
                     f"sampled principles per pair ({cfg.orders} orders, mode {cfg.mode}); "
                     "preferences.jsonl is in TRL's preference format plus `p_chosen`.", manifest)
    return manifest


__all__ = ["LabelConfig", "LabelRecord", "Judgement", "judge_pairs", "run_label", "label_stats",
           "p_response_a", "pair_key", "expected_ratings"]
