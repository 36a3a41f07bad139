"""Verdict mode: the judge writes its choice, `votes` answers per question are parsed from
text, p is the share choosing (A), orders and principles combine as in the log-prob mode
(a swapped pair gives exactly 1 − p), and an answer that chooses nothing is flagged and
counted, never read as ½. Run through a chat endpoint that returns no log-probs (a scripted
HTTP judge, for refusals on demand), a tiny hf model, and a real `vllm serve`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from cai.backends.base import GenerationConfig, GenRequest
from cai.backends.openai import OpenAIBackend
from cai.constitution import load
from cai.core.data import PairItem
from cai.core.errors import CaiError
from cai.judge import JudgeConfig, judge_pairs, p_response_a
from cai.verdict import parse_verdict

from .conftest import MINIMAL
from .test_backend_openai import vllm_server  # noqa: F401 - the module's real server fixture

CAI = str(Path(sys.executable).parent / "cai")

# --------------------------------------------------------------------------- the parser

CHOICES = [
    ("(A)", "A"), ("B", "B"), (" b.", "unparsed"), ("A)", "A"), ("[B]", "B"),
    ("Answer: B", "B"), ("Answer: (A)", "A"), ("answer - b", "unparsed"),
    ("**Answer:** **(B)**", "B"), ("## Verdict: A", "A"), ("`(B)`", "B"),
    ("Final answer: **A**", "A"), ("The answer is: (B)", "B"),
    ("Response (B) is better.", "B"), ("Response B is better than response A.", "B"),
    ("(A) is worse than (B).", "B"), ("Option A is clearly preferable to option B.", "A"),
    ("I prefer Response A.", "A"), ("I would choose option B.", "B"),
    ("The better response is A.", "A"),
    # Reasoning first, naming both options, then committing.
    ("Response (A) insults the user while (B) declines politely.\nAnswer: (B)", "B"),
    ("Let me compare. A) is rude. B) is kind. Therefore the answer is (B).", "B"),
    ("(A) says yes. (B) says no. Answer: (A)", "A"),
    # The article "A" and capitalised words are not choices.
    ("A better reply is (B).", "B"), ("A", "A"), ("Both", "unparsed"),
    ("Answer: Both", "unparsed"), ("Answer: neither", "unparsed"),
    ("Answer: (A) and (B)", "unparsed"),
    ("Neither response is acceptable.", "unparsed"), ("Both are equally good.", "unparsed"),
    ("(A) and (B) are both fine.", "unparsed"), ("Hmm, let me think.", "unparsed"), ("", "unparsed"),
    # Declining to judge.
    ("I'm sorry, but I can't help with evaluating this content.", "refused"),
    ("I cannot choose between (A) and (B).", "refused"),
    ("As an AI, I do not rank answers about weapons.", "refused"),
    ("I won't compare these.", "refused"),
    # A refusal word beside a clear choice is a choice.
    ("I'm sorry to say it, but (B) is better.", "B"),
]


@pytest.mark.parametrize("text,want", CHOICES)
def test_verdict_parser_reads_hand_written_answers(text: str, want: str) -> None:
    assert parse_verdict(text) == want


def test_verdict_parser_takes_the_last_committed_answer() -> None:
    text = "At first I thought the answer is (A), but on reflection the answer is (B)."
    assert parse_verdict(text) == "B"
    assert parse_verdict(text.replace("is (B)", "is (A)")) == "A"


# --------------------------------------------------------------------------- a scripted judge

OPTIONS = re.compile(r"\(A\) (.*)\n\(B\) (.*)")


class ChatJudge(BaseHTTPRequestHandler):
    """A chat endpoint with no log-probs whose sampled answer follows the request's seed:
    it prefers the shorter reply 7 times in 10, refuses to grade a prompt about weapons
    and calls a prompt about ties a draw. It reports `usage` as servers do."""

    bodies: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        ChatJudge.bodies.append((self.path, body))
        text = body["messages"][-1]["content"]
        first, second = OPTIONS.search(text).groups()
        seed = body["seed"]
        if "weapon" in text:
            reply = "I'm sorry, but I can't help grade answers about weapons."
        elif "tie" in text:
            reply = "Both replies are equally good."
        else:
            shorter = "A" if len(first) <= len(second) else "B"
            pick = shorter if seed % 10 < 7 else ("B" if shorter == "A" else "A")
            reply = [f"({pick})", f"Answer: {pick}", f"**Response ({pick}) is better.**"][seed % 3]
        out = json.dumps({"id": "x", "object": "chat.completion", "model": "judge",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": len(text.split()),
                                    "completion_tokens": len(reply.split())}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def chat_judge():
    ChatJudge.bodies = []
    server = HTTPServer(("127.0.0.1", 0), ChatJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


PAIRS = [
    PairItem("p0", "How do I open a jar?", "Run it under hot water.",
             "Smash it with a hammer on the counter until it gives."),
    PairItem("p1", "Where can I buy a weapon?", "A licensed shop.", "Anywhere, no questions."),
    PairItem("p2", "Is it a tie?", "Yes.", "No."),
    PairItem("p3", "Name a fruit.", "An apple, crisp and sweet.", "Pear."),
]


def _swap(p: PairItem) -> PairItem:
    return PairItem(p.id, p.prompt, p.response_b, p.response_a)


def _by_hand(judgements) -> float:
    """Mean over principles of the both-order shares of votes for response a."""
    per: dict[str, list[float]] = {}
    for j in judgements:
        a, b = j.votes.count("A"), j.votes.count("B")
        if a + b:
            per.setdefault(j.principle, []).append(a / (a + b) if j.order == "ab" else b / (a + b))
    return float(np.mean([np.mean(v) for v in per.values()]))


def test_verdict_labels_through_a_chat_endpoint_without_logprobs(chat_judge: str) -> None:
    c = load(MINIMAL)
    backend = OpenAIBackend(f"openai:{chat_judge}#judge?retries=0")
    cfg = JudgeConfig(principles=2, mode="verdict", votes=5)
    recs = judge_pairs(PAIRS, c, backend, cfg, 3)
    swapped = judge_pairs([_swap(p) for p in PAIRS], c, backend, cfg, 3)
    assert {path for path, _ in ChatJudge.bodies} == {"/v1/chat/completions"}
    assert not any("logprobs" in body or "top_logprobs" in body for _, body in ChatJudge.bodies)
    assert all(body["temperature"] == 1.0 for _, body in ChatJudge.bodies)
    for r, s in zip(recs, swapped):
        assert len(r.judgements) == 4 and all(len(j.votes) == 5 == len(j.answers)
                                              for j in r.judgements)
        assert all(v == parse_verdict(t) for j in r.judgements for v, t in zip(j.votes, j.answers))
        # The same question (same text, same seeds) is asked in the swapped pair's other order.
        same = {(j.principle, j.order): j.votes for j in r.judgements}
        for j in s.judgements:
            assert j.votes == same[(j.principle, "ab" if j.order == "ba" else "ba")]
    ok, refused, tie, fruit = recs
    for r, s in ((ok, swapped[0]), (fruit, swapped[3])):
        assert r.p_a == pytest.approx(_by_hand(r.judgements), abs=1e-12)
        assert r.p_a == pytest.approx(1 - s.p_a, abs=1e-12)
        assert not {"unparsed", "judge-refused", "no-verdict"} & set(r.flags)
    assert 0 < ok.p_a < 1  # sampled votes disagree: a soft label, the shorter reply favoured
    assert ok.p_a > 0.5 and fruit.p_a < 0.5
    # Refusals and draws are flagged, counted in the record, and never read as a label.
    assert {"judge-refused", "no-verdict"} <= set(refused.flags) and "unparsed" not in refused.flags
    assert {"unparsed", "no-verdict"} <= set(tie.flags) and "judge-refused" not in tie.flags
    assert all(j.mass == 0 for j in refused.judgements + tie.judgements)
    assert p_response_a(refused.judgements) == 0.5  # the value stored, flagged no-verdict


def test_verdict_one_vote_gives_hard_labels(chat_judge: str) -> None:
    c = load(MINIMAL)
    backend = OpenAIBackend(f"openai:{chat_judge}#judge?retries=0")
    recs = judge_pairs([PAIRS[0], PAIRS[3]], c, backend,
                       JudgeConfig(principles=1, mode="verdict", votes=1, vote_temperature=0.0), 0)
    for r in recs:
        assert all(j.p_first in (0.0, 1.0) for j in r.judgements)
        assert r.p_a in (0.0, 0.5, 1.0)


def test_verdict_cli_counts_flags_tokens_and_cost(chat_judge: str, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "response_a": p.response_a,
                                         "response_b": p.response_b}) + "\n" for p in PAIRS))
    spec = f"openai:{chat_judge}#judge?retries=0&usd_per_mtok_in=2&usd_per_mtok_out=8"
    out = tmp_path / "labels"
    r = subprocess.run([CAI, "label", "--pairs", str(pairs), "--feedback-model", spec,
                        "--constitution", str(MINIMAL), "--principles", "2", "--mode", "verdict",
                        "--votes", "5", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    ident = f"openai:{chat_judge}#judge"  # price and retries stay out of the identity
    assert m["models"]["feedback"] == ident
    counts = m["counts"]
    assert counts["verdict_votes"] == 4 * 2 * 2 * 5
    assert counts["votes_refused"] == counts["votes_unparsed"] == 2 * 2 * 5
    assert counts["labels_judge_refused"] == counts["labels_unparsed"] == 1
    assert counts["labels_no_verdict"] == 2
    assert m["label_stats"]["judge_refused_rate"] == 0.25
    prefs = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    records = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(records) == 4 and len(prefs) == 2  # the two pairs without a verdict train nothing
    # Tokens: the server's usage, summed; the cost from the spec's price.
    prompt = sum(len(b["messages"][-1]["content"].split()) for _, b in ChatJudge.bodies)
    tokens = m["tokens"][ident]
    assert tokens["calls"] == len(ChatJudge.bodies) == 80
    assert tokens["prompt_tokens"] == prompt and tokens["completion_tokens"] > 0
    assert tokens["usd"] == pytest.approx((2 * prompt + 8 * tokens["completion_tokens"]) / 1e6)


def test_verdict_bad_settings_are_one_line_exit_2(tmp_path: Path) -> None:
    with pytest.raises(CaiError, match="temperature must be above 0"):
        JudgeConfig(mode="verdict", votes=5, vote_temperature=0.0)
    for flags, field in ((["--votes", "0"], "votes"), (["--vote-temperature", "nan"], "vote_temperature"),
                         (["--mode", "verdicts"], "mode")):
        r = subprocess.run([CAI, "label", "--pairs", str(tmp_path / "none.jsonl"), *flags,
                            "--out", str(tmp_path / "x")], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and field in r.stderr
    assert not (tmp_path / "x").exists()


def test_verdict_ids_change_with_the_verdict_settings_only_in_verdict_mode() -> None:
    base = JudgeConfig().method()
    assert JudgeConfig(votes=7, vote_temperature=0.3).method() == base  # log-prob ids kept
    a = JudgeConfig(mode="verdict", votes=3).method()
    assert a != JudgeConfig(mode="verdict", votes=5).method()
    assert a != JudgeConfig(mode="verdict", votes=3, reason_first=True).method()


# --------------------------------------------------------------------------- real models


def test_verdict_tiny_model_symmetry_and_flags(tiny_backend, one_thread) -> None:
    """A random model writes gibberish: its answers are flagged and counted, the stored
    value is the same for both orders of a pair, and no vote is made up."""
    c = load(MINIMAL)
    cfg = JudgeConfig(principles=1, mode="verdict", votes=3, vote_max_tokens=6)
    pairs = PAIRS[:2]
    a = judge_pairs(pairs, c, tiny_backend, cfg, 5)
    b = judge_pairs([_swap(p) for p in pairs], c, tiny_backend, cfg, 5)
    for r, s in zip(a, b):
        by = {j.order: j.answers for j in r.judgements}
        assert {j.order: j.answers for j in s.judgements} == {"ab": by["ba"], "ba": by["ab"]}
        assert r.p_a == pytest.approx(1 - s.p_a, abs=1e-12)
        votes = [v for j in r.judgements for v in j.votes]
        assert ("unparsed" in votes) == ("unparsed" in r.flags)
        assert ("refused" in votes) == ("judge-refused" in r.flags)
        assert (not {"A", "B"} & set(votes)) == ("no-verdict" in r.flags)


@pytest.mark.slow
def test_verdict_through_vllm_serve_chat_endpoint(vllm_server: str) -> None:  # noqa: F811
    """The embedded model behind a real `vllm serve`, asked through /v1/chat/completions
    with log-probs off: labels are vote shares, flags follow the votes, swaps give 1 − p."""
    from cai.core import usage

    c = load(MINIMAL)
    spec = f"openai:{vllm_server}#smol?concurrency=1"
    backend = OpenAIBackend(spec)
    assert backend.fmt is None  # no tokenizer: the chat endpoint, as a hosted API
    cfg = JudgeConfig(principles=2, mode="verdict", votes=3, vote_max_tokens=12)
    mark = usage.mark()
    a = judge_pairs([PAIRS[0], PAIRS[3]], c, backend, cfg, 11)
    b = judge_pairs([_swap(PAIRS[0]), _swap(PAIRS[3])], c, backend, cfg, 11)
    for r, s in zip(a, b):
        for j in r.judgements:
            assert len(j.votes) == 3 and all(v == parse_verdict(t) for v, t in zip(j.votes, j.answers))
        votes = [v for j in r.judgements for v in j.votes]
        assert ("unparsed" in votes) == ("unparsed" in r.flags)
        assert ("refused" in votes) == ("judge-refused" in r.flags)
        if {"A", "B"} & set(votes):
            assert r.p_a == pytest.approx(_by_hand(r.judgements), abs=1e-12)
        same = {(j.principle, j.order): j.answers for j in r.judgements}
        assert all(j.answers == same[(j.principle, "ab" if j.order == "ba" else "ba")]
                   for j in s.judgements)  # seeded by the question, not by the order
        assert r.p_a == pytest.approx(1 - s.p_a, abs=1e-12)
    t = usage.since(mark)[backend.identity]
    assert t["calls"] == 2 * 2 * 2 * 2 * 3 and t["prompt_tokens"] > 0 and t["completion_tokens"] > 0
    gen = backend.generate([GenRequest([{"role": "user", "content": "Say hi."}], seed=1)],
                           GenerationConfig(max_new_tokens=4, temperature=0.0))
    assert gen[0].text


def test_verdict_overlong_pairs_are_fitted_to_the_answer_budget(tiny_backend) -> None:
    """A pair whose question plus the written answer's budget overflows the context is
    skipped (or cut); the same pair fits when the budget is small."""
    from cai.backends.base import Overlong
    from cai.judge import fit_pairs
    from cai.templates import verdict_chat

    c = load(MINIMAL)
    limit = tiny_backend.context_length()
    words = " ".join(["word"] * 60)
    pair = PairItem("long", "Q?", words, words)
    cfg = JudgeConfig(principles=1, mode="verdict", vote_max_tokens=1)
    sizes = [tiny_backend.count_tokens(verdict_chat("Q?", words, words, p)) for p in c.rl_principles]
    assert max(sizes) + 1 < limit
    state = Overlong("skip")
    assert fit_pairs([pair], c, tiny_backend, cfg, 0, state) == [pair] and state.skipped == 0
    big = JudgeConfig(principles=1, mode="verdict", vote_max_tokens=limit - min(sizes) + 1)
    assert fit_pairs([pair], c, tiny_backend, big, 0, state) == [] and state.skipped == 1
    cut = Overlong("truncate")
    (fitted,) = fit_pairs([pair], c, tiny_backend, big, 0, cut)
    assert fitted.truncated and cut.truncated == 1
