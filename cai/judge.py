"""The judge: soft preference labels from a feedback model's log-probabilities.

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
response 1–10, read as an expected value from the digit probabilities; usable as a reward);
`verdict` (the judge writes its choice, `votes` samples per question; `cai.verdict`).
Several judges at once are a panel (`cai.panel`).

This module is the judge as a component: the label stage (`cai.label`), the evaluations
and the judge reward all judge through it, and it registers no stage of its own.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

from cai.backends import Backend, GenerationConfig, GenRequest, ReplicaTask, ScoreRequest
from cai.backends.base import JudgeQuestion, Overlong, context_of, fit_to_context
from cai.backends.pyfunc import LOG_ZERO
from cai.constitution import Constitution, RLPrinciple, sample_rl_principles
from cai.core.chunks import Engine, run_chunks
from cai.core.data import PairItem
from cai.core.errors import CaiError
from cai.core.records import JsonlStore, Provenance, record_id
from cai.core.seeds import derive_seed
from cai.judge_config import (
    COT_CLAMP,
    LABEL,
    MODES,
    ORDERS,
    JudgeConfig,
    Judgement,
    LabelRecord,
)
from cai.templates import (
    COT_ANSWER,
    COT_PREFIX,
    JUDGE_PREFIX,
    RATING_PREFIX,
    judge_chat,
    rating_chat,
    verdict_chat,
)
from cai.verdict import ask, parse_verdict

# --------------------------------------------------------------------------- judging


def pair_key(pair: PairItem) -> tuple[str, str, str]:
    """An order-free key: the same for (a, b) and (b, a)."""
    a, b = sorted((pair.response_a, pair.response_b))
    key = pair.key()
    return (key if isinstance(key, str) else json.dumps(key, ensure_ascii=False), a, b)


def seen(pair: PairItem) -> str | list[dict[str, str]]:
    """What the judge is shown as the conversation: the prompt, or every turn of it."""
    return pair.key()


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


def _plan(pairs: list[PairItem], c: Constitution, cfg: JudgeConfig, seed: int) -> list[_Question]:
    qs = []
    for i, pair in enumerate(pairs):
        key = pair_key(pair)
        principles = sample_rl_principles(c, cfg.principles, seed, *key)
        if cfg.orders == "both":
            orders = ["ab", "ba"]
        else:  # one order, drawn from the order-free key so a swap keeps the same layout
            first_is_smaller = derive_seed(seed, "order", *key) % 2 == 0
            orders = ["ab" if (pair.response_a == key[1]) == first_is_smaller else "ba"]
        for p in principles:
            for o in orders:
                first, second = ((pair.response_a, pair.response_b) if o == "ab"
                                 else (pair.response_b, pair.response_a))
                chat = (verdict_chat(seen(pair), first, second, p, cfg.layout, cfg.reason_first)
                        if cfg.mode == "verdict" else judge_chat(seen(pair), first, second, p, cfg.layout))
                # The parts travel with the chat for function judges (`python:` specs).
                question = JudgeQuestion(pair.prompt, first, second, p.text,
                                         f"pair {pair.id!r}, principle {p.id}, order {o}")
                qs.append(_Question(i, p.id, o, ScoreRequest(chat, JUDGE_PREFIX, question)))
    return qs


_COMMIT = re.compile(r"(?:(?:therefore|so|thus|hence)\s*,?\s*)?(?:the\s+)?(?:final\s+|correct\s+)?"
                     r"answer\s+is\b", re.IGNORECASE)


def split_reasoning(text: str) -> str:
    """The judge's reasoning without the answer it committed to.

    The text is cut where the judge starts stating its answer ("… the answer is (B)"), so
    the scored prompt ends with the reasoning and our own answer prefix. Letters named
    inside the reasoning ("Option (A) is rude …") are part of it and are kept.
    """
    m = _COMMIT.search(text)
    return (text[:m.start()] if m else text).strip()


def _add_reasoning(qs: list[_Question], backend: Backend, cfg: JudgeConfig, seed: int) -> None:
    """CoT: the judge writes its reasoning (greedy), then is scored after it."""
    gens = backend.generate([GenRequest(q.request.chat, COT_PREFIX + " ", 0) for q in qs],
                            GenerationConfig(cfg.cot_max_new_tokens, 0.0, 1.0, seed))
    for q, g in zip(qs, gens):
        q.reasoning = split_reasoning(g.text)
        q.request = ScoreRequest(q.request.chat, f"{COT_PREFIX} {q.reasoning}{COT_ANSWER}")


def judge_pairs(pairs: list[PairItem], c: Constitution, backend: Backend, cfg: JudgeConfig,
                seed: int, policy: str | None = None) -> list[LabelRecord]:
    """Label pairs in one batch of backend calls under constitution `c`; `seed` draws the
    principles (and the order, with one order). Pure: no files are touched."""
    if cfg.mode == "score":
        return _score_pairs(pairs, c, backend, cfg, seed, policy)
    qs = _plan(pairs, c, cfg, seed)
    if cfg.mode == "verdict":
        return _verdict_pairs(pairs, qs, c, backend, cfg, seed, policy)
    if cfg.mode == "cot":
        _add_reasoning(qs, backend, cfg, seed)
    result = backend.choice_logprobs([q.request for q in qs], ("A", "B"))
    truncated = result.truncated
    per_pair: dict[int, list[Judgement]] = {}
    for n, (q, (la, lb)) in enumerate(zip(qs, result.logprobs)):
        p_first = _softmax2(float(la), float(lb))
        if cfg.mode == "cot":
            p_first = min(max(p_first, COT_CLAMP[0]), COT_CLAMP[1])
        text = backend.render(q.request.chat, q.request.answer_prefix) if cfg.keep_prompts else None
        fmt = getattr(backend, "fmt", None)
        ids = (fmt.encode_chat(q.request.chat, q.request.answer_prefix)
               if cfg.keep_prompts and fmt is not None and fmt.has_control(q.request.chat) else None)
        per_pair.setdefault(q.pair, []).append(Judgement(
            principle=q.principle, order=q.order, logprob_a=float(la), logprob_b=float(lb),
            mass=float(math.exp(la) + math.exp(lb)), p_first=p_first,
            truncated=bool(truncated is not None and truncated[n].any()), reasoning=q.reasoning,
            prompt_text=text, prompt_ids=ids))
    tokens = result.choice_tokens if cfg.keep_prompts else None
    return [_finish(pair, per_pair[i], None, c, backend, cfg, seed, tokens, policy)
            for i, pair in enumerate(pairs)]


def _verdict_pairs(pairs: list[PairItem], qs: list[_Question], c: Constitution, backend: Backend,
                   cfg: JudgeConfig, seed: int, policy: str | None) -> list[LabelRecord]:
    """Verdict mode: `votes` written answers per question, p_first the share of "A" among
    the answers that chose; the log-probs kept are the logs of the two shares."""
    parts = [(q.request.question.prompt, q.request.question.first, q.request.question.second,
              q.principle) for q in qs if q.request.question is not None]
    answers = ask(backend, [(q.request.chat, x) for q, x in zip(qs, parts)], cfg.votes,
                  cfg.vote_temperature, cfg.vote_max_tokens, seed)
    per_pair: dict[int, list[Judgement]] = {}
    for q, texts in zip(qs, answers):
        votes = [parse_verdict(t) for t in texts]
        na, nb = votes.count("A"), votes.count("B")
        per_pair.setdefault(q.pair, []).append(Judgement(
            principle=q.principle, order=q.order, logprob_a=_log(na / len(votes)),
            logprob_b=_log(nb / len(votes)), mass=(na + nb) / len(votes),
            p_first=na / (na + nb) if na + nb else 0.5, votes=votes, answers=texts,
            prompt_text=backend.render(q.request.chat) if cfg.keep_prompts else None))
    return [_finish(pair, per_pair[i], None, c, backend, cfg, seed, None, policy)
            for i, pair in enumerate(pairs)]


def _log(p: float) -> float:
    return math.log(p) if p > 0 else LOG_ZERO


def _answered(js: list[Judgement]) -> list[Judgement]:
    """The judgements that carry a choice: a verdict question none of whose answers chose
    gives no probability and is left out (flagged, never read as ½)."""
    return [j for j in js if j.votes is None or j.mass > 0]


def p_response_a(js: list[Judgement]) -> float:
    """Mean over principles of the both-order (or one-order) probability that a is better
    (½, flagged `no-verdict`, when no verdict question was answered at all)."""
    js = _answered(js)
    if not js:
        return 0.5
    by_principle: dict[str, list[float]] = {}
    for j in js:
        by_principle.setdefault(j.principle, []).append(j.p_first if j.order == "ab"
                                                         else 1.0 - j.p_first)
    return float(np.mean([np.mean(v) for v in by_principle.values()]))


def label_id(pair: PairItem, c: Constitution, model: str, cfg: JudgeConfig, seed: int) -> str:
    """A label's id hashes the pair, the constitution, the judge's identity, the method and
    the seed; never speed options, so a rerun with a bigger batch skips finished pairs."""
    return record_id(LABEL, pair.key(), pair.response_a, pair.response_b, c.hash, model,
                     cfg.method(), seed)


def label_flags(js: list[Judgement], p_a: float, cfg: JudgeConfig,
                rating_mass: float | None = None) -> list[str]:
    """What a label's reader should know: the orders disagree, the judge barely answered,
    the label is a tie, or a server hid a letter's log-prob."""
    flags = []
    votes = [v for j in js for v in j.votes or ()]
    asked, js = js, _answered(js)
    if {j.order for j in js} == {"ab", "ba"}:
        ab = np.mean([j.p_first for j in js if j.order == "ab"])
        ba = np.mean([1 - j.p_first for j in js if j.order == "ba"])
        if (ab - 0.5) * (ba - 0.5) < 0:
            flags.append("position-inconsistent")
    mass = np.mean([j.mass for j in asked]) if asked else rating_mass
    if mass is not None and mass < cfg.low_mass_threshold:
        flags.append("low-mass")
    if abs(p_a - 0.5) < cfg.tie_threshold:
        flags.append("tie")
    if any(j.truncated for j in js):
        flags.append("truncated-choices")
    flags += [flag for flag, vote in VOTE_FLAGS.items() if vote in votes]
    if votes and not js:
        flags.append("no-verdict")
    return flags


VOTE_FLAGS = {"unparsed": "unparsed", "judge-refused": "refused"}
"""Verdict mode: a label's flag when any of its answers was read as this vote."""


def _finish(pair: PairItem, js: list[Judgement], scores: dict[str, float] | None,
            c: Constitution, backend: Backend, cfg: JudgeConfig, seed: int,
            tokens: list[str] | None, policy: str | None, rating_mass: float | None = None,
            rating_prompts: list[str] | None = None) -> LabelRecord:
    p_a = p_response_a(js) if scores is None else 1 / (1 + math.exp(scores["b"] - scores["a"]))
    flags = label_flags(js, p_a, cfg, rating_mass)
    if pair.truncated:
        flags.append("truncated-input")
    a_wins = p_a >= 0.5
    return LabelRecord(
        id=label_id(pair, c, backend.identity, cfg, seed), stage=LABEL,
        provenance=Provenance(constitution=c.stamp.as_dict(), model=backend.identity,
                              sampling=cfg.method(), seed=seed),
        pair_id=pair.id, prompt=pair.prompt, response_a=pair.response_a,
        response_b=pair.response_b, p_a=p_a,
        chosen=pair.response_a if a_wins else pair.response_b,
        rejected=pair.response_b if a_wins else pair.response_a,
        p_chosen=p_a if a_wins else 1 - p_a, judgements=js, scores=scores,
        rating_mass=rating_mass, rating_prompts=rating_prompts, flags=flags,
        choice_tokens=tokens, policy=policy,
        context=[dict(m) for m in pair.context] if pair.context else None)


RATINGS = tuple(str(i) for i in range(1, 10))


def rating_distribution(backend: Backend, requests: list[ScoreRequest]) -> tuple[np.ndarray, np.ndarray]:
    """Expected 1–10 rating per request, and the probability mass on the ratings at all.

    "10" may be two tokens ("1", "0"), so P("1") is split by a second scoring of the
    prompt followed by "1": P(10) = P("1")·P("0" | "1") and P(1) = P("1")·(1 − P("0" | "1")).
    """
    if not requests:
        return np.zeros(0), np.zeros(0)
    digits = np.exp(backend.choice_logprobs(requests, RATINGS).logprobs)  # [n, 9]
    after_one = [ScoreRequest(r.chat, r.answer_prefix + "1") for r in requests]
    p_zero = np.exp(backend.choice_logprobs(after_one, ("0",)).logprobs[:, 0])
    probs = np.concatenate([digits, (digits[:, 0] * p_zero)[:, None]], axis=1)
    probs[:, 0] *= 1 - p_zero
    mass = probs.sum(axis=1)
    values = np.arange(1, 11)
    return (probs * values).sum(axis=1) / np.maximum(mass, 1e-300), mass


def expected_ratings(backend: Backend, requests: list[ScoreRequest]) -> np.ndarray:
    """Expected 1–10 rating per request (see `rating_distribution`)."""
    return rating_distribution(backend, requests)[0]


def _score_pairs(pairs: list[PairItem], c: Constitution, backend: Backend,
                 cfg: JudgeConfig, seed: int, policy: str | None) -> list[LabelRecord]:
    reqs, index = [], []
    for i, pair in enumerate(pairs):
        for p in sample_rl_principles(c, cfg.principles, seed, *pair_key(pair)):
            for side, resp in (("a", pair.response_a), ("b", pair.response_b)):
                reqs.append(ScoreRequest(rating_chat(seen(pair), resp, p), RATING_PREFIX))
                index.append((i, side))
    ratings, mass = rating_distribution(backend, reqs)
    out = []
    for i, pair in enumerate(pairs):
        mine = [n for n, (j, _) in enumerate(index) if j == i]
        scores = {s: float(np.mean([ratings[n] for n in mine if index[n][1] == s]))
                  for s in ("a", "b")}
        texts = ([backend.render(reqs[n].chat, reqs[n].answer_prefix) for n in mine]
                 if cfg.keep_prompts else None)
        out.append(_finish(pair, [], scores, c, backend, cfg, seed, None, policy,
                           float(np.mean(mass[mine])), texts))
    return out


def fit_pairs(pairs: list[PairItem], c: Constitution, backend: Backend,
              cfg: JudgeConfig, seed: int, state: Overlong) -> list[PairItem]:
    """The pairs whose every judge request fits the model's context, skipped or truncated
    per `state.mode` (and counted there); all of them when the backend cannot count tokens.

    Truncation cuts the prompt and both responses to one common character cap (the longest
    texts first), as large as still fits; the pair keeps its id and is flagged
    `truncated-input`. Use it before `judge_pairs` wherever pairs come from users' data.
    """
    def n(chat, prefix: str) -> int:
        assert count is not None  # only called once the backend said it can count
        return count(chat, prefix) or 0

    def longest(texts: tuple[str, ...], ps: list[RLPrinciple], context: tuple = ()) -> int:
        """Tokens the longest request for these texts needs under principles `ps`."""
        text, a, b = texts
        prompt = PairItem("", text, a, b, context=context).key()
        if cfg.mode == "score":  # a rating is read after "Rating: " and after "Rating: 1"
            return max(n(rating_chat(prompt, r, p), RATING_PREFIX + "1")
                       for p in ps for r in (a, b)) + 1
        if cfg.mode == "verdict":  # a written answer of up to its token budget
            return max(n(verdict_chat(prompt, x, y, p, cfg.layout, cfg.reason_first), "")
                       for p in ps for x, y in ((a, b), (b, a))) + cfg.vote_max_tokens
        chats = [judge_chat(prompt, x, y, p, cfg.layout) for p in ps for x, y in ((a, b), (b, a))]
        if cfg.mode == "cot":  # reasoning of up to its token budget, then the answer prefix
            return (max(n(ch, f"{COT_PREFIX} {COT_ANSWER}") for ch in chats)
                    + cfg.cot_max_new_tokens + 3)
        return max(n(ch, JUDGE_PREFIX) for ch in chats) + 1

    def needed(pair: PairItem, texts: tuple[str, ...]) -> int:
        # A conversation's earlier turns are kept whole; only the last turn and the two
        # responses are cut (and no shortcut: the earlier turns count too).
        item = PairItem("", *texts, context=pair.context)
        return longest(texts, sample_rl_principles(c, cfg.principles, seed, *pair_key(item)),
                       pair.context)

    limit, count = context_of(backend)
    if limit is None or count is None:
        return pairs
    return fit_to_context(pairs, limit, state, texts=lambda p: (p.prompt, p.response_a, p.response_b),
                          needed=needed, base=longest(("", "", ""), c.rl_principles),  # any principle
                          shrink=lambda p, cut: PairItem(p.id, *cut, truncated=True, context=p.context)).kept


@dataclass
class Labels:
    """What `label_pairs` leaves: this run's label records, read back from the store in
    its order, how many of them were judged now, and their statistics."""

    records: list[dict]
    """Every label of the run's pairs (judged now or earlier), as stored."""
    new: int
    """How many were judged (and written) by this call."""

    @property
    def stats(self) -> dict[str, float]:
        """`label_stats` of `records` (what the label stage's manifest keeps)."""
        return label_stats(self.records)


def label_pairs(pairs: list[PairItem], c: Constitution, backend: Backend, cfg: JudgeConfig,
                seed: int, store: JsonlStore, *, feedback_model: str, policy: str | None,
                overlong: Overlong, chunk_size: int, engine: Engine) -> Labels:
    """Judge pairs into a store, resumably: the whole of judging for a stage that keeps
    labels (`cai label`).

    Pairs too long for the judge are skipped or cut first (`fit_pairs`); each label's id is
    known before judging, so pairs already in the store cost no model call; the rest are
    judged in chunks (here, or on Ray actors that load `feedback_model` themselves).
    """
    pairs = fit_pairs(pairs, c, backend, cfg, seed, overlong)
    overlong.warn("pairs")
    if not pairs and overlong.skipped:
        raise CaiError(f"every pair is too long for the judge's context of {overlong.limit} "
                       "tokens; use --overlong truncate, or a judge with a longer context",
                       field="overlong")
    ids: dict[str, PairItem] = {}
    for pair in pairs:
        ids.setdefault(label_id(pair, c, backend.identity, cfg, seed), pair)
    todo = [p for rid, p in ids.items() if rid not in store]
    task = JudgeTask(cfg, seed, c, feedback_model, policy,
                     backend if engine.name == "local" else None)
    new = run_chunks(todo, chunk_size, task, store, total=len(ids), desc="label", unit="pair",
                     engine=engine)
    return Labels([r for r in store if r["id"] in ids], new)


def label_stats(records: list[dict]) -> dict[str, float]:
    """Statistics of a set of labels: the label stage's manifest and the policy evaluation's
    report (`judge_stats`) keep them."""
    if not records:
        return {}
    n = len(records)

    def rate(flag: str) -> float:
        return round(sum(flag in r["flags"] for r in records) / n, 4)

    return {"pairs": n, "position_inconsistency_rate": rate("position-inconsistent"),
            "mean_abs_p_minus_half": round(float(np.mean([abs(r["p_a"] - 0.5) for r in records])), 4),
            "low_mass_rate": rate("low-mass"), "tie_rate": rate("tie"),
            "mean_mass": _mean_mass(records),
            **({f"{f.replace('-', '_')}_rate": rate(f) for f in (*VOTE_FLAGS, "no-verdict")}
               if any(j.get("votes") for r in records for j in r["judgements"]) else {})}


def _mean_mass(records: list[dict]) -> float | None:
    masses = [j["mass"] for r in records for j in r["judgements"]]
    masses += [r["rating_mass"] for r in records if r.get("rating_mass") is not None]
    return round(float(np.mean(masses)), 4) if masses else None


@dataclass
class JudgeTask(ReplicaTask):
    """A chunk of pairs to judge as a picklable callable: run here, or on a Ray actor that
    loads its own judge replica once (`cai label` and the policy evaluation run it)."""

    judge: JudgeConfig
    seed: int
    c: Constitution
    feedback_model: str
    policy: str | None = None
    backend: Backend | None = None

    def model_spec(self) -> str:
        return self.feedback_model

    def __call__(self, chunk: list[PairItem]) -> list[LabelRecord]:
        return judge_pairs(chunk, self.c, self.replica(), self.judge, self.seed, self.policy)


__all__ = ["LABEL", "MODES", "ORDERS", "COT_CLAMP", "JudgeConfig", "Judgement", "LabelRecord",
           "JudgeTask", "Labels", "judge_pairs",
           "label_id", "label_pairs",
           "label_flags", "label_stats", "p_response_a", "pair_key", "split_reasoning",
           "rating_distribution", "expected_ratings", "fit_pairs"]
