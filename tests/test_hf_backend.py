"""The transformers backend: exact shared-prefix scoring and seeded generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cai.backends.base import GenerationConfig, GenRequest, ScoreRequest, render_plain
from cai.backends.hf import HFBackend, HFOptions
from cai.core.errors import CaiError


def _judge_requests(n_pairs: int = 3, k: int = 3) -> list[ScoreRequest]:
    reqs = []
    for pair in range(n_pairs):
        for order in ("ab", "ba"):
            for q in range(k):
                body = (f"Conversation {pair}: how do I do thing number {pair}? " * 4
                        + f"\nOptions:\n(A) reply {order} one {pair}\n(B) reply {order} two\n"
                        + f"Question {q}: which reply is better and why {q}?")
                reqs.append(ScoreRequest([{"role": "user", "content": body}], "The answer is: ("))
    return reqs


def _naive(backend: HFBackend, reqs: list[ScoreRequest]) -> np.ndarray:
    """One full forward per prompt, no cache, no padding: the reference values."""
    out = []
    for r in reqs:
        ids, tgt = backend.fmt.choice_token_ids(r.chat, r.answer_prefix, ("A", "B"))
        with torch.no_grad():
            logits = backend.model(torch.tensor([ids])).logits[0, -1]
        out.append(torch.log_softmax(logits.float(), -1)[tgt].double().numpy())
    return np.array(out)


def test_prefix_sharing_scores_equal_naive(tiny_backend: HFBackend) -> None:
    reqs = _judge_requests()
    shared = tiny_backend.choice_logprobs(reqs)
    ref = _naive(tiny_backend, reqs)
    assert shared.logprobs.shape == (len(reqs), 2)
    assert np.abs(shared.logprobs - ref).max() < 1e-4
    assert shared.choice_tokens == ["A", "B"]
    # Log-probs over the full vocabulary: they are negative and their mass is below one.
    assert (shared.logprobs < 0).all() and (shared.mass < 1).all()


def test_sharing_is_used_and_order_does_not_matter(tiny_model) -> None:
    reqs = _judge_requests()
    b = HFBackend(f"hf:{tiny_model}", tiny_model, HFOptions(progress=False, batch_size=4))
    calls = []
    hook = b.model.register_forward_hook(lambda m, a, kw_out: calls.append(1))
    a = b.choice_logprobs(reqs)
    hook.remove()
    # 18 prompts in 3 pairs x 2 orders: far fewer forwards than one per prompt.
    assert len(calls) < len(reqs)
    rev = b.choice_logprobs(reqs[::-1])
    assert np.abs(rev.logprobs[::-1] - a.logprobs).max() < 1e-5


def test_generation_is_seeded(tiny_backend: HFBackend) -> None:
    reqs = [GenRequest([{"role": "user", "content": f"Tell me about {t}."}], seed=i)
            for i, t in enumerate(["cats", "the sea", "bread"])]
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=5)
    one, two = tiny_backend.generate(reqs, cfg), tiny_backend.generate(reqs, cfg)
    assert [g.text for g in one] == [g.text for g in two]
    other = tiny_backend.generate(reqs, GenerationConfig(max_new_tokens=8, temperature=1.0, seed=6))
    assert [g.text for g in one] != [g.text for g in other]
    assert all(g.finish_reason in ("stop", "length") and g.tokens <= 8 for g in one)


def test_chat_and_plain_rendering(tiny_model) -> None:
    chat = [{"role": "user", "content": "Hi"}]
    b = HFBackend(f"hf:{tiny_model}", tiny_model, HFOptions(progress=False))
    assert b.is_chat and b.render(chat, "Sure").endswith("<|im_start|>assistant\nSure")
    base = HFBackend(f"hf:{tiny_model}?chat=0", tiny_model, HFOptions(progress=False, chat="0"))
    assert base.render(chat, "(") == render_plain(chat, "(") == "Human: Hi\n\nAssistant: ("


def test_multi_token_choice_is_a_clear_error(tiny_backend: HFBackend) -> None:
    with pytest.raises(CaiError, match="one token"):
        tiny_backend.choice_logprobs([ScoreRequest([{"role": "user", "content": "x"}], "(")],
                                     ("Apple pie", "B"))
