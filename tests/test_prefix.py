"""Prefix reuse in the transformers backend: the packed scoring plan and its exactness."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cai.backends.hf import HFBackend, HFOptions
from cai.backends.prefix import plan_chunks


def _unique_tokens(seqs: list[list[int]]) -> int:
    """Distinct (prefix, token) nodes of the token trie, counted with a set."""
    return len({tuple(s[: i + 1]) for s in seqs for i in range(len(s))})


def _replay(seqs: list[list[int]], max_tokens: int) -> tuple[list[list[int]], int]:
    """Rebuild every sequence from the plan alone: the carried prefix (taken from the
    previous chunk's rows) followed by its path of fed tokens. Returns them and the number
    of tokens fed."""
    chunks = plan_chunks(seqs, max_tokens)
    rebuilt: list[list[int]] = [[] for _ in seqs]
    carried: list[int] = []
    fed = 0
    for n, ch in enumerate(chunks):
        assert len(ch.tokens) == len(ch.positions)
        assert len(carried) == ch.ctx
        fed += len(ch.tokens)
        for row in ch.rows:
            if not row.path:  # identical to the previous chunk's last row
                rebuilt[row.index] = list(rebuilt[row.index - 1])
                continue
            body = [ch.tokens[t] for t in row.path]
            assert [ch.positions[t] for t in row.path] == list(range(row.reach, row.reach + len(body)))
            rebuilt[row.index] = carried[: row.reach] + body
        if n + 1 < len(chunks):
            carried = rebuilt[ch.rows[-1].index][: chunks[n + 1].ctx]
    return rebuilt, fed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=25),
       st.integers(1, 30))
def test_plan_feeds_each_trie_node_once_and_rebuilds_every_sequence(seqs, max_tokens) -> None:
    seqs = sorted(seqs)
    rebuilt, fed = _replay(seqs, max_tokens)
    assert rebuilt == seqs
    assert fed == _unique_tokens(seqs)


def _naive(backend: HFBackend, seqs, targets) -> np.ndarray:
    out = []
    for ids, tgt in zip(seqs, targets):
        with torch.no_grad():
            logits = backend.model(torch.tensor([ids])).logits[0, -1]
        out.append(torch.log_softmax(logits.float(), -1)[tgt].double().numpy())
    return np.array(out)


def _tree_seqs(seed: int) -> list[list[int]]:
    """Prompts shaped like judge prompts: a shared head, per-pair bodies, per-principle tails,
    plus a duplicate and a prompt that is a prefix of another."""
    rng = random.Random(seed)
    head = [rng.randrange(100, 2000) for _ in range(30)]
    seqs = []
    for _ in range(4):
        body = head + [rng.randrange(100, 2000) for _ in range(rng.randint(5, 25))]
        for _ in range(2):
            order = body + [rng.randrange(100, 2000) for _ in range(rng.randint(3, 15))]
            for _ in range(3):
                seqs.append(order + [rng.randrange(100, 2000) for _ in range(rng.randint(1, 6))])
    seqs.append(list(seqs[3]))
    seqs.append(seqs[5][:-2])
    return seqs


@pytest.mark.parametrize("pack_tokens", [16, 45, 512])
def test_packed_scores_equal_naive_for_any_chunking_and_order(tiny_model, pack_tokens) -> None:
    b = HFBackend(f"hf:{tiny_model}", tiny_model, HFOptions(progress=False, pack_tokens=pack_tokens))
    seqs = _tree_seqs(pack_tokens)
    targets = [[65, 66]] * len(seqs)
    ref = _naive(b, seqs, targets)
    got = b.score_token_ids(seqs, targets)
    assert np.abs(got - ref).max() < 1e-4
    perm = list(range(len(seqs)))
    random.Random(1).shuffle(perm)
    shuffled = b.score_token_ids([seqs[i] for i in perm], targets)
    assert np.abs(shuffled - ref[perm]).max() < 1e-4


def test_packed_feeds_fewer_tokens_than_the_trie_schedule_runs_forwards(tiny_model) -> None:
    """Packing is the default; `scoring=trie` is the older schedule, same values."""
    seqs = _tree_seqs(7)
    targets = [[65, 66]] * len(seqs)
    counts = {}
    for mode in ("packed", "trie"):
        b = HFBackend(f"hf:{tiny_model}", tiny_model, HFOptions(progress=False, scoring=mode))
        calls = []
        hook = b.model.register_forward_hook(lambda m, a, o, calls=calls: calls.append(1))
        counts[mode] = (b.score_token_ids(seqs, targets), len(calls))
        hook.remove()
    assert np.abs(counts["packed"][0] - counts["trie"][0]).max() < 1e-4
    assert counts["packed"][1] == 1 < counts["trie"][1]


# ---------------------------------------------------------------- generation prefix reuse


def _conversations(n: int = 3) -> list[list[dict[str, str]]]:
    shots = []
    for i in range(3):  # a shared few-shot head, like the SL stage's examples
        shots += [{"role": "user", "content": f"Example question {i} about the weather today?"},
                  {"role": "assistant", "content": f"Example answer {i}: it is sunny and warm."}]
    topics = ["cats", "the sea at night", "bread", "old maps", "rain"]
    return [shots + [{"role": "user", "content": f"Tell me about {t}."}] for t in topics[:n]]


def _steps(backend: HFBackend, cfg, steps: int = 3, n: int = 3) -> list[list[str]]:
    """SL-like use: each step's chats extend the previous step's with its reply and a new
    request, so a prefix cache can resume every row from the last step."""
    from cai.backends.base import GenRequest

    chats = _conversations(n)
    texts = []
    for step in range(steps):
        outs = backend.generate([GenRequest(ch, "Reply:" if step else "", seed=i)
                                 for i, ch in enumerate(chats)], cfg)
        texts.append([o.text for o in outs])
        chats = [ch + [{"role": "assistant", "content": o.text},
                       {"role": "user", "content": f"Now say more, step {step}."}]
                 for ch, o in zip(chats, outs)]
    return texts


def _prefill_tokens(backend: HFBackend) -> tuple[list[int], object]:
    """Token positions fed by prefill forwards (decode steps feed one per row)."""
    fed: list[int] = []

    def hook(module, args, kwargs, output) -> None:
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:
            fed.append(ids.numel())

    return fed, backend.model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_generation_with_prefix_reuse_equals_without(tiny_model, temperature, batch_size) -> None:
    from cai.backends.base import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=6, temperature=temperature, seed=11)
    plain = HFBackend(f"hf:{tiny_model}", tiny_model,
                      HFOptions(progress=False, prefix_cache_mb=0, batch_size=batch_size))
    reuse = HFBackend(f"hf:{tiny_model}", model=plain.model, tokenizer=plain.tok,
                      options=HFOptions(progress=False, batch_size=batch_size))
    assert plain.prefix_cache is None and reuse.prefix_cache is not None
    want = _steps(plain, cfg)
    fed, hook = _prefill_tokens(reuse)
    got = _steps(reuse, cfg)
    hook.remove()
    assert got == want
    fed_plain, hook = _prefill_tokens(plain)
    _steps(plain, cfg)
    hook.remove()
    # Reuse feeds far fewer prompt tokens than recomputing every step.
    assert sum(fed) < 0.5 * sum(fed_plain)


def test_prefix_reuse_survives_a_cache_too_small_to_hold_it(tiny_model) -> None:
    """Eviction changes what is reused, never the outputs."""
    from cai.backends.base import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=5, temperature=1.0, seed=2)
    big = HFBackend(f"hf:{tiny_model}", tiny_model, HFOptions(progress=False, batch_size=2))
    small = HFBackend(f"hf:{tiny_model}", model=big.model, tokenizer=big.tok,
                      options=HFOptions(progress=False, batch_size=2, prefix_cache_mb=1))
    small.prefix_cache.max_bytes = 20_000  # a few hundred tokens of the tiny model
    assert _steps(small, cfg, n=5) == _steps(big, cfg, n=5)
    # Over budget only by the newest entry and the chain it builds on (one leaf left).
    leaves = [e for e in small.prefix_cache.entries.values() if e.children == 0]
    assert small.prefix_cache.bytes <= 20_000 or len(leaves) == 1


def test_prefix_cache_rebuilds_chained_entries() -> None:
    from cai.backends.prefix import PrefixCache

    def kv(lo: int, hi: int):
        t = torch.arange(lo, hi, dtype=torch.float32).view(1, -1, 1)
        return [(t, -t)]

    cache = PrefixCache(max_bytes=10**6)
    head = cache.put(list(range(10)), None, 0, kv(0, 10))
    step = cache.put(list(range(10)) + [50, 51, 52], head, 10, kv(10, 13))
    n, hit = cache.longest(list(range(10)) + [50, 51, 99], limit=100)
    assert (n, hit) == (12, step)
    k, v = cache.layers(hit, n)[0]
    assert k.flatten().tolist() == list(range(12)) and torch.equal(v, -k)
    assert cache.longest([1, 2, 3], limit=100) == (0, None)
    assert cache.longest(list(range(10)), limit=4)[0] == 4
    # A base that others build on outlives a small budget; its leaves go first.
    cache.max_bytes = 0
    cache._evict(keep=None)
    assert list(cache.entries.values()) == []


# ---------------------------------------------------------------- the stages on top


def test_label_stage_with_packed_scoring_equals_the_naive_loop(tiny_model) -> None:
    """Labels (log-probs of both choices in both orders) from the packed schedule, in
    chunks small enough to split pairs, equal a one-prompt-per-forward loop."""
    from cai.constitution import load
    from cai.core.data import PairItem
    from cai.judge import JudgeConfig, judge_pairs

    from .conftest import HARMLESS

    pairs = [PairItem(f"p{i}", f"Question {i}: how would I do thing {i}?", f"Answer one {i}.",
                      f"A different and longer answer number {i}, with detail.") for i in range(4)]
    c = load(HARMLESS)
    cfg = JudgeConfig(principles=3)
    packed = HFBackend(f"hf:{tiny_model}", tiny_model, HFOptions(progress=False, pack_tokens=200))
    naive = HFBackend(f"hf:{tiny_model}", model=packed.model, tokenizer=packed.tok,
                      options=HFOptions(progress=False, scoring="trie", batch_size=1,
                                        min_shared_tokens=10**9))
    got, want = judge_pairs(pairs, c, packed, cfg, 5), judge_pairs(pairs, c, naive, cfg, 5)
    for g, w in zip(got, want):
        assert [j.principle for j in g.judgements] == [j.principle for j in w.judgements]
        for a, b in zip(g.judgements, w.judgements):
            assert abs(a.logprob_a - b.logprob_a) < 1e-4 and abs(a.logprob_b - b.logprob_b) < 1e-4
        assert abs(g.p_a - w.p_a) < 1e-4


def test_sl_stage_gives_the_same_records_with_and_without_prefix_reuse(tiny_model, tmp_path) -> None:
    """Sampled SL runs (few-shot examples, two rounds) with the prefix cache at batch size
    2 and without it at 16 write the same texts."""
    import json

    from cai.sl import SLConfig, run_sl

    from .conftest import HARMLESS

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"How do I do bad thing {i}?"})
                               + "\n" for i in range(3)))
    reuse = HFBackend(f"hf:{tiny_model}", tiny_model, HFOptions(progress=False, batch_size=2))
    plain = HFBackend(f"hf:{tiny_model}", model=reuse.model, tokenizer=reuse.tok,
                      options=HFOptions(progress=False, prefix_cache_mb=0, batch_size=16))
    texts = []
    for name, backend in (("reuse", reuse), ("plain", plain)):
        run_sl(SLConfig(prompts=str(prompts), constitution=str(HARMLESS), out=str(tmp_path / name),
                        rounds=2, few_shot=2, max_new_tokens=6, temperature=1.0, seed=4), backend)
        rows = [json.loads(x) for x in (tmp_path / name / "data.jsonl").read_text().splitlines()]
        texts.append([(r["id"], r["initial"], [(x["critique"], x["revision"]) for x in r["rounds"]],
                       r["final"]) for r in rows])
    assert texts[0] == texts[1]
    assert reuse.prefix_cache.entries  # the cache was used
