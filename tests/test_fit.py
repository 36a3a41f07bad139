"""`fit_to_context`: the one place inputs are fitted to a model's context."""

from __future__ import annotations

import dataclasses

from cai.backends.base import Fit, Overlong, fit_to_context
from cai.core.data import PromptItem


def _fit(items: list[PromptItem], mode: str) -> tuple[Fit, Overlong]:
    state = Overlong(mode)
    fit = fit_to_context(items, 20, state, texts=lambda it: (it.prompt,),
                         needed=lambda it, texts: len(texts[0]) + 2 * len(it.context), base=0,
                         shrink=lambda it, cut: dataclasses.replace(it, prompt=cut[0], truncated=True))
    return fit, state


def test_skip_leaves_out_what_does_not_fit() -> None:
    short, long = PromptItem("a", "x" * 5), PromptItem("b", "y" * 30)
    fit, state = _fit([short, long], "skip")
    assert fit.kept == [short] and fit.cut == [] and state.counts() == {"overlong_skipped": 1}
    assert state.limit == 20


def test_truncate_keeps_the_cut_form_in_order() -> None:
    long, short = PromptItem("b", "y" * 30), PromptItem("a", "x" * 5)
    fit, state = _fit([long, short], "truncate")
    cut = dataclasses.replace(long, prompt="y" * 20, truncated=True)
    assert fit.kept == [cut, short] and fit.cut == [cut]
    assert state.counts() == {"overlong_truncated": 1}


def test_earlier_turns_are_counted_not_shortcut() -> None:
    turns = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    item = PromptItem("c", "z" * 18, context=turns)
    fit, state = _fit([item], "skip")  # 18 + 2 * 2 turns > 20, though base says it is short
    assert fit.kept == [] and state.skipped == 1
