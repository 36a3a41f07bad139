"""`cai eval known-answer`'s sampling options: `scored_samples` (the gold on every answer,
the PMs and the KL on the first few) and `engine: vllm` (one engine that loads each
policy's weights in turn), on tiny random models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cai.evaluate.known_answer_run import KnownAnswerConfig, _seed, run_known_answer
from tests.test_known_answer_run import FUNCS, PROMPTS, _fake_run, _tiny_pm

from .conftest import vllm_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_run(embedded_path: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, Path]:
    """A fake known-answer run whose SL-CAI and DPO are one random model and whose RL is
    another (so a policy that was never loaded would show), with a trained PM."""
    tmp = tmp_path_factory.mktemp("ka-engines")
    (tmp / "funcs.py").write_text(FUNCS, encoding="utf-8")
    a = vllm_llama(embedded_path, tmp / "a", 0)
    b = vllm_llama(embedded_path, tmp / "b", 1)
    run = _fake_run(tmp, a, _tiny_pm(tmp, tiny_model), f"python:{tmp / 'funcs.py'}:cat_judge")
    log = (run / "rl" / "log.jsonl").read_text()
    shutil.rmtree(run / "rl")
    shutil.copytree(b, run / "rl")
    (run / "rl" / "log.jsonl").write_text(log)
    return run, tmp / "funcs.py"


def _eval(run: Path, funcs: Path, out: str, **over) -> dict:
    cfg = dict(run=str(run), out=str(run / out), gold=f"python:{funcs}:has_cat", best_of=2,
               max_new_tokens=6, batch_size=8, n_boot=200, base=False)
    run_known_answer(KnownAnswerConfig(**{**cfg, **over}))
    return json.loads((run / out / "known_answer.json").read_text())


def test_scored_samples_set_and_unset_leave_the_gold_and_narrow_the_pm_figures(two_run) -> None:
    run, funcs = two_run
    whole = _eval(run, funcs, "whole", samples=3)
    first = _eval(run, funcs, "first", samples=3, scored_samples=1)
    # The answers are the same (seeded per answer), so every gold figure is the same ...
    for key in ("rl_minus_sl_gold", "dpo_minus_sl_gold"):
        assert first[key] == whole[key]
    for name, p in whole["policies"].items():
        assert first["policies"][name]["gold"] == p["gold"]
        assert p["answers"] == first["policies"][name]["answers"] == 3 * len(PROMPTS)
        # ... while the PMs and the KL read the first answer of each prompt only.
        assert p["scored_answers"] == 3 * len(PROMPTS)
        assert first["policies"][name]["scored_answers"] == len(PROMPTS)
    assert 0 < first["pm_gold_pairs"] < whole["pm_gold_pairs"] or \
        first["pm_gold_pairs"] == whole["pm_gold_pairs"] == 0
    assert first["policies"]["rl-cai"]["kl_from_sl"] != whole["policies"]["rl-cai"]["kl_from_sl"]


@pytest.mark.slow
def test_vllm_engine_samples_each_policy_from_its_own_weights(two_run) -> None:
    """The engine starts on SL-CAI's weights and loads RL's (another model) before sampling
    it: each policy's answers are what a fresh engine on that policy's folder samples with
    the same seeds; a missed weight load would give RL SL-CAI's answers."""
    from transformers import AutoTokenizer

    from cai.backends.chat import ChatFormat
    from cai.train.rollout import VLLMRollout

    run, funcs = two_run
    got = _eval(run, funcs, "vllm", samples=2, engine="vllm")
    cfg = KnownAnswerConfig(run=str(run))
    tok = AutoTokenizer.from_pretrained(str(run / "sft"))
    fmt = ChatFormat(tok)
    ids = [fmt.encode(fmt.render([{"role": "user", "content": p}])) for p in PROMPTS[:3]]
    for name, folder in (("rl-cai", "rl"), ("sl-cai", "sft")):
        fresh = VLLMRollout(run / folder, fmt.stop_ids, max_model_len=256)
        toks = fresh.sample(ids, [_seed(cfg, name, i, 0) for i in range(3)], 6, 1.0).tokens
        want = [tok.decode([t for t in x if t not in fmt.stop_ids], skip_special_tokens=True).strip()
                for x in toks]
        assert [e["answer"] for e in got["policies"][name]["examples"]] == want, name
        del fresh
    # Another engine, other samples from the same seeds; the gold figures stay well formed.
    hf = _eval(run, funcs, "hf", samples=2)
    assert [e["answer"] for e in hf["policies"]["rl-cai"]["examples"]] != \
        [e["answer"] for e in got["policies"]["rl-cai"]["examples"]]
    assert got["policies"]["rl-cai"]["kl_from_sl"] > 0.01
