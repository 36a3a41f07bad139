"""Token accounting: every backend that runs a model counts the tokens it read and wrote
(the server's `usage` over HTTP, counted locally otherwise), each stage's manifest keeps
its own counts per model, and a priced spec gives the cost."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import HTTPServer
from pathlib import Path

import pytest

from cai.backends.base import GenerationConfig, GenRequest, ScoreRequest
from cai.backends.openai import OpenAIBackend
from cai.core import usage
from cai.core.errors import CaiError
from cai.core.models import model_identity
from cai.evaluate.labeler import LabelerEvalConfig, run_labeler_eval
from cai.judge import JudgeConfig
from cai.label import LabelConfig, run_label
from cai.report import write_report
from cai.sl import SLConfig, run_sl

from .conftest import MINIMAL
from .test_backend_openai import NoLogprobs

CAI = str(Path(sys.executable).parent / "cai")
CHATS = [[{"role": "user", "content": "Say hello."}],
         [{"role": "user", "content": "Name three colours, please, in a list."}]]


def test_tokens_hf_backend_counts_what_it_reads_and_writes(tiny_backend, one_thread) -> None:
    mark = usage.mark()
    gens = tiny_backend.generate([GenRequest(c, "", n) for n, c in enumerate(CHATS)],
                                 GenerationConfig(max_new_tokens=5, temperature=1.0, seed=2))
    scores = [ScoreRequest(c, "The answer is: (") for c in CHATS]
    tiny_backend.choice_logprobs(scores)
    got = usage.since(mark)[tiny_backend.identity]
    read = (sum(len(tiny_backend.fmt.encode_chat(c, "")) for c in CHATS)
            + sum(len(tiny_backend.fmt.encode_chat(r.chat, r.answer_prefix)) for r in scores))
    assert got == {"prompt_tokens": read, "completion_tokens": sum(g.tokens for g in gens),
                   "calls": 4}
    assert 0 < got["completion_tokens"] <= 10
    assert "usd" not in got  # no price given
    assert usage.since(usage.mark()) == {}  # nothing ran since


def test_tokens_openai_counts_locally_when_the_server_gives_no_usage() -> None:
    server = HTTPServer(("127.0.0.1", 0), NoLogprobs)  # answers "A", no usage, no log-probs
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        backend = OpenAIBackend(f"openai:{url}#m?tokenizer=embedded:smollm2-135m&retries=0")
        mark = usage.mark()
        backend.generate([GenRequest(c) for c in CHATS], GenerationConfig(max_new_tokens=1))
        got = usage.since(mark)[backend.identity]
        assert got["calls"] == 2 and got["completion_tokens"] == 0
        assert got["prompt_tokens"] == sum(backend.count_tokens(c) for c in CHATS)
    finally:
        server.shutdown()


def test_tokens_price_option_gives_cost_and_stays_out_of_identity(tmp_path: Path) -> None:
    spec = "openai:http://127.0.0.1:9/v1#m?usd_per_mtok_in=1.5&usd_per_mtok_out=6"
    assert model_identity(spec) == model_identity("openai:http://127.0.0.1:9/v1#m")
    assert usage.parse_price({"usd_per_mtok_in": "1.5", "usd_per_mtok_out": "6"}) == (1.5, 6.0)
    assert usage.parse_price({"usd_per_mtok_in": "2"}) == (2.0, 0.0)
    assert usage.parse_price({}) is None
    for bad in ("x", "-1", "inf", "nan"):
        with pytest.raises(CaiError, match="usd_per_mtok_in"):
            usage.parse_price({"usd_per_mtok_in": bad})
    mark = usage.mark()
    usage.add("priced-model", 2_000_000, 500_000)
    usage.add("free-model", 10, 3)
    usage.set_price("priced-model", (1.5, 6.0))
    got = usage.since(mark)
    assert got["priced-model"]["usd"] == pytest.approx(2 * 1.5 + 0.5 * 6)
    assert "usd" not in got["free-model"]
    assert usage.total(got) == {"prompt_tokens": 2_000_010, "completion_tokens": 500_003,
                                "usd": pytest.approx(6.0)}
    pairs = tmp_path / "x.jsonl"  # a real input: the bad price is the one thing wrong
    pairs.write_text(json.dumps({"prompt": "q", "response_a": "a", "response_b": "b"}) + "\n")
    r = subprocess.run([CAI, "label", "--pairs", str(pairs), "--constitution", str(MINIMAL),
                        "--principles", "2", "--out", str(tmp_path / "out"), "--feedback-model",
                        "embedded:smollm2-135m?usd_per_mtok_out=cheap"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "usd_per_mtok_out" in r.stderr and "Traceback" not in r.stderr


def test_tokens_in_sl_label_and_eval_manifests(tmp_path: Path, tiny_backend, one_thread) -> None:
    ident = tiny_backend.identity
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"How to x{i}?"}) + "\n"
                               for i in range(2)))
    sl = SLConfig(prompts=str(prompts), constitution=str(MINIMAL), out=str(tmp_path / "sl"),
                  rounds=1, max_new_tokens=4, temperature=1.0, seed=1)
    m = run_sl(sl, tiny_backend)
    t = m["tokens"][ident]
    assert t["calls"] == 2 * 3 and t["prompt_tokens"] > 0 and 0 < t["completion_tokens"] <= 2 * 3 * 4
    assert run_sl(sl, tiny_backend)["tokens"] == {}  # resumed: nothing new was asked

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "response_a": "Hello.", "response_b": "Go."}) + "\n")
    m = run_label(LabelConfig(pairs=str(pairs), constitution=str(MINIMAL), out=str(tmp_path / "label"),
                              judge=JudgeConfig(principles=2)), tiny_backend)
    t = m["tokens"][ident]
    assert t["calls"] == 2 * 2 and t["prompt_tokens"] > 0 and t["completion_tokens"] == 0

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"context": "Hi?", "options": ["Hello.", "Go."], "correct": 0}) + "\n")
    m = run_labeler_eval(LabelerEvalConfig(items=str(items), constitution=str(MINIMAL),
                                           out=str(tmp_path / "ev"), judge=JudgeConfig(principles=1)),
                         tiny_backend)
    assert m["tokens"][ident]["calls"] == 2

    report = write_report(tmp_path).read_text()
    assert "## Tokens per stage" in report and f"`{ident}`" in report
