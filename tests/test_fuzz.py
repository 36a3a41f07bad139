"""Property-based fuzzing: the constitution loader, the config loader, the jsonl readers and
the prompt renderer take any text or bytes; nothing escapes but `CaiError`."""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cai.backends.base import Overlong, fit_texts  # noqa: E402
from cai.constitution import (  # noqa: E402
    WEIGHT_RANGE,
    RLPrinciple,
    load,
    parse,
    sample_rl_principles,
    sample_sl_principle,
)
from cai.core.config import load_yaml_config  # noqa: E402
from cai.core.data import load_pairs, load_prompts  # noqa: E402
from cai.core.errors import CaiError  # noqa: E402
from cai.core.records import JsonlStore, read_records  # noqa: E402
from cai.sl import SLConfig  # noqa: E402
from cai.templates import LAYOUTS, SLConversation, judge_chat, rating_chat  # noqa: E402

from .conftest import MINIMAL  # noqa: E402

# CI runs a fixed set of examples; CAI_FUZZ_EXAMPLES=5000 runs a deeper, random search.
DEEP = int(os.environ.get("CAI_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=DEEP or 150, deadline=None, derandomize=not DEEP,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SMALL = settings(FUZZ, max_examples=DEEP or 60)
VALID = MINIMAL.read_text(encoding="utf-8")
CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n", "The answer is: (A)",
           "\ue0000\ue001", "\ue0001\ue001", "{{", "}}", "{% if %}", "\x00", "\r\n", "\u2028"]

# Text that looks like YAML: keys of the schema, scalars of every type, flow and block syntax,
# anchors, tags and special floats, glued together at random.
YAML_BITS = st.sampled_from([
    "schema:", "cai.constitution/v1", "name:", "version:", "sl:", "rl:", "rounds:",
    "principles:", "few_shot:", "- id:", "critique:", "revision:", "text:", "weight:",
    "prompt:", "response:", "principle:", "description:", ".inf", "-.inf", ".nan", "1.0e-320",
    "1e400", "0", "-1", "2.5", "true", "null", "~", "[", "]", "{", "}", ",", "&a", "*a", "!!str",
    "!!python/object:os.system", "!!binary", "---", "...", "|", ">", "'", '"', "#", ":", "\n",
    "\n  ", "\n    ", "\t", " ", "? ", "%YAML 1.1", "\ufeff", "\x00", "é", "\U0001f600",
])
YAMLISH = st.lists(YAML_BITS, max_size=40).map(" ".join)


def _check_constitution(text: str) -> None:
    try:
        c = parse(text, "fuzz.yaml")
    except CaiError as err:
        assert str(err).startswith("fuzz.yaml:")  # every error names file:line
        return
    # What parses is safe to use: JSON without Infinity/NaN, weights in range, sampling works.
    json.dumps(c.to_json(), allow_nan=False)
    lo, hi = WEIGHT_RANGE
    assert all(lo <= p.weight <= hi and math.isfinite(p.weight)
               for p in [*c.sl_principles, *c.rl_principles])
    assert sample_sl_principle(c, 0, "x", 0, 1) in c.sl_principles
    assert len(sample_rl_principles(c, 1, 0, "p", "a", "b")) == 1


@FUZZ
@given(YAMLISH)
def test_constitution_parse_yamlish_text(text: str) -> None:
    _check_constitution(text)


@FUZZ
@given(st.text(max_size=300))
def test_constitution_parse_any_text(text: str) -> None:
    _check_constitution(text)


@FUZZ
@given(st.integers(0, len(VALID)), st.integers(0, 40), st.text(max_size=20) | YAML_BITS)
def test_constitution_parse_mutated_valid_file(at: int, cut: int, insert: str) -> None:
    """A valid constitution with a random slice replaced by random text."""
    _check_constitution(VALID[:at] + insert + VALID[at + cut:])


def _values():
    scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=30)
               | st.floats(allow_nan=True, allow_infinity=True))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)


@FUZZ
@given(st.data())
def test_constitution_parse_structured_edits(data) -> None:
    """The valid constitution's data with one value anywhere replaced by any YAML value."""
    import yaml

    tree = yaml.safe_load(VALID)
    node, path = tree, []
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    value = data.draw(_values())
    if not path:
        tree = value
    else:
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
    _check_constitution(yaml.safe_dump(tree, allow_unicode=True))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@SMALL
@given(st.binary(max_size=300) | YAMLISH.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_constitution_and_config_files_of_any_bytes(work: Path, data: bytes) -> None:
    path = work / "c.yaml"
    path.write_bytes(data)
    try:
        load(path)
    except CaiError:
        pass
    try:
        load_yaml_config(SLConfig, path)
    except CaiError:
        pass


# ----------------------------------------------------------------------------- jsonl

JSON_LINE = st.one_of(
    st.binary(max_size=80),
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.dictionaries(st.sampled_from(["id", "prompt", "response_a", "response_b", "category",
                                     "x"]), _values(), max_size=5)
    .map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"\xef\xbb\xbf", b"[" * 5000, b"NaN", b'{"id": NaN}', b"\r",
                     b'{"prompt": "ok", "response_a": "a", "response_b": "b", "id": "x"}']),
)


@FUZZ
@given(st.lists(JSON_LINE, max_size=6), st.booleans())
def test_jsonl_readers_take_any_lines(work: Path, lines: list[bytes], newline_at_end: bool) -> None:
    path = work / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline_at_end else b""))
    for read in (load_prompts, load_pairs, read_records):
        try:
            items = read(path)
        except CaiError:
            continue
        assert isinstance(items, list)
    assert path.read_bytes() == b"\n".join(lines) + (b"\n" if newline_at_end else b"")
    # The resume reader may cut a torn last line, and nothing else.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            store = JsonlStore(path)
        except CaiError:
            return
    assert all(isinstance(i, str) for i in store.ids)
    assert len(list(store)) >= len(store.ids)


# ----------------------------------------------------------------------------- rendering

TEXT = st.text(max_size=60) | st.lists(st.sampled_from(CONTROL) | st.text(max_size=8),
                                       max_size=8).map("".join)
NONBLANK = TEXT.filter(lambda t: t.strip())


@FUZZ
@given(TEXT, TEXT, TEXT, NONBLANK, st.sampled_from(LAYOUTS))
def test_prompt_renderer_takes_any_text(prompt: str, a: str, b: str, question: str,
                                        layout: str) -> None:
    p = RLPrinciple(id="q", text=question)
    for chat in (judge_chat(prompt, a, b, p, layout), rating_chat(prompt, a, p)):
        assert all(isinstance(m["content"], str) and m["role"] in ("user", "assistant")
                   for m in chat)
        body = chat[-1]["content"]
        assert prompt in body and question in body
    c = load(MINIMAL)
    convo = SLConversation.start(c, prompt, few_shot=random.Random(len(prompt)).randint(0, 1))
    convo.respond(a)
    crit = convo.critique_chat(c.sl_principles[0])
    convo.add_critique(c.sl_principles[0], b)
    assert crit[-1]["content"] == c.sl_principles[0].critique
    assert convo.history[-1]["content"].endswith(b)
    with pytest.raises(CaiError):
        judge_chat(prompt, a, b, p, layout + "?")


@pytest.fixture(scope="module")
def fmt(embedded_path: Path):
    from cai.backends.chat import ChatFormat, load_tokenizer

    return ChatFormat(load_tokenizer(embedded_path))


def _specials(fmt, ids: list[int]) -> int:
    special = set(fmt.tok.all_special_ids) | {fmt.tok.convert_tokens_to_ids(t) for t in
                                              ("<|im_start|>", "<|im_end|>")}
    return sum(i in special for i in ids)


@SMALL
@given(TEXT, TEXT, st.sampled_from(["", "The answer is: (", "Critique: "]))
def test_data_text_never_becomes_control_tokens(fmt, prompt: str, response: str,
                                                 prefix: str) -> None:
    """Whatever the data says, the judge prompt has the template's control tokens only."""
    p = RLPrinciple(id="q", text="Which is better?")
    chat = judge_chat(prompt, response, "Fine.", p)
    clean = judge_chat("Hi", "Hello.", "Fine.", p)
    ids = fmt.encode_chat(chat, prefix)
    assert _specials(fmt, ids) == _specials(fmt, fmt.encode_chat(clean, prefix))
    assert fmt.count_tokens(chat, prefix) == len(ids)
    # The cheap bound `fit_texts` trusts before tokenizing: empty texts + 3 per byte + 8 each.
    empty = fmt.count_tokens(judge_chat("", "", "Fine.", p), prefix)
    assert len(ids) <= empty + sum(3 * len(t.encode("utf-8", "replace")) + 8
                                   for t in (prompt, response))


@SMALL
@given(st.lists(st.text(min_size=1, max_size=50), min_size=1, max_size=3), st.integers(1, 200),
       st.sampled_from(["skip", "truncate"]), st.booleans())
def test_fit_texts_result_always_fits_or_is_skipped(texts: list[str], limit: int, mode: str,
                                                    use_base: bool) -> None:
    def needed(ts: tuple[str, ...]) -> int:
        return sum(len(t.encode("utf-8")) for t in ts) + 5

    state = Overlong(mode)
    out = fit_texts(tuple(texts), needed, limit, state, 5 if use_base else None)
    assert state.skipped + state.truncated <= 1
    if out is not None:
        assert needed(out) <= limit and len(out) == len(texts)
        assert all(t.startswith(o) and o for t, o in zip(texts, out))
