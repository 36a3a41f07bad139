"""How a tokenizer turns chats into model input: one implementation for every backend.

The hf, vLLM and OpenAI-compatible backends must feed a model the exact same token ids,
or their log-probs would not agree; so rendering, encoding and the choice-token lookup
live here once.
"""

from __future__ import annotations

from collections.abc import Callable

from cai.backends.base import Chat, render_plain
from cai.core.errors import CaiError

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_NO_LIMIT = 10**8
"""A tokenizer without a known limit reports a huge `model_max_length` (int(1e30))."""
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                    "seq_length", "n_ctx")


def context_length(config=None, tokenizer=None) -> int | None:
    """The longest sequence (prompt + generation) a model takes, in tokens.

    Read from the model config's position limit (`max_position_embeddings` and its other
    names); the tokenizer's `model_max_length` is used only when the config does not say.
    None when neither knows: then nothing can be checked.
    """
    if config is not None:
        text_config = getattr(config, "get_text_config", None)
        cfg = text_config() if callable(text_config) else config
        for name in _POSITION_FIELDS:
            value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _NO_LIMIT:
                return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _NO_LIMIT:
        return value
    return None


def load_tokenizer(path):
    """A tokenizer from a local folder, never running code from it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise CaiError(f"cannot load the tokenizer: {msg}", str(path), "model") from None


def check_fits(lengths: list[int], extra: int, limit: int | None, what: str) -> None:
    """Refuse a request that would run past the model's context (it would read garbage).

    The stages skip or truncate over-long inputs before they reach a backend; this is the
    last guard, so an over-context run is never silent."""
    if limit is None or not lengths:
        return
    longest = max(lengths)
    if longest + extra > limit:
        raise CaiError(f"a {what} prompt of {longest} tokens + {extra} more exceeds the model's "
                       f"context of {limit} tokens; shorten the input (the stages' `overlong` "
                       "option skips or truncates such inputs) or lower max_new_tokens")


def encode_segments(chat: Chat, render: Callable[[Chat], str], encode: Callable[[str], list[int]],
                    encode_plain: Callable[[str], list[int]]) -> list[int]:
    """Token ids of a rendered chat whose message texts are encoded as plain text.

    The chat is rendered with a placeholder in place of each message's text; the template's
    own text between placeholders is encoded with its control tokens (`encode`), each
    message's text with them split into ordinary pieces (`encode_plain`). One rule for the
    judge (`ChatFormat.encode_chat`) and the trainers (`cai.train.common.encode_chat`).
    """
    marks = [f"\ue000{i}\ue001" for i in range(len(chat))]
    rest = render([{**m, "content": k} for m, k in zip(chat, marks)])
    ids: list[int] = []
    for m, k in zip(chat, marks):
        head, found, rest = rest.partition(k)
        if not found:
            raise CaiError("the chat template rewrites message text, so text with control-"
                           "token strings cannot be encoded safely; clean the input")
        ids += encode(head) + encode_plain(m["content"])
    return ids + encode(rest)


class ChatFormat:
    """Renders chats with a tokenizer's chat template (or as plain text for a base model)."""

    def __init__(self, tokenizer, chat: str = "auto", extra_stop_ids: tuple[int, ...] = ()):
        self.tok = tokenizer
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.is_chat = chat != "0" and bool(getattr(tokenizer, "chat_template", None))
        stops = {tokenizer.eos_token_id, *extra_stop_ids}
        for t in END_OF_TURN:
            tid = tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                stops.add(tid)
        self.stop_ids = sorted(s for s in stops if isinstance(s, int))
        # Strings the tokenizer would turn into control tokens (<|im_end|>, ...).
        self.protect_data = True  # False only to measure the attack (benchmarks/bench_injection.py)
        self.control = sorted({t for t in [*tokenizer.added_tokens_encoder,
                                           *tokenizer.all_special_tokens] if t}, key=len)

    def render(self, chat: Chat, answer_prefix: str = "") -> str:
        """The exact text the model sees; the assistant turn is opened by `answer_prefix`."""
        if not self.is_chat:
            return render_plain(chat, answer_prefix)
        text = self.tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return text + answer_prefix

    def encode(self, text: str) -> list[int]:
        # A chat template already holds its special tokens; plain text gets the BOS, if any.
        return self.tok(text, add_special_tokens=not self.is_chat)["input_ids"]

    def has_control(self, chat: Chat) -> bool:
        """True when message text holds a string that would tokenize as a control token."""
        return any(t in m["content"] for m in chat for t in self.control)

    def encode_chat(self, chat: Chat, answer_prefix: str = "") -> list[int]:
        """Token ids of a chat, with message text always encoded as plain text.

        Text from data (prompts, responses, critiques) may contain strings such as
        `<|im_end|>`; tokenized with the template they would become real control tokens and
        could close a turn and forge the judge's answer. Clean chats are encoded whole, as
        before; a chat with such strings is encoded segment by segment: the template's own
        text with its control tokens, each message's text with them split into plain pieces.
        """
        if not self.is_chat:
            return self.tok(render_plain(chat, answer_prefix), add_special_tokens=True,
                            split_special_tokens=True)["input_ids"]
        if not self.has_control(chat) or not self.protect_data:
            return self.encode(self.render(chat, answer_prefix))
        return encode_segments(
            chat, lambda c: self.render(c, answer_prefix), self.encode,
            lambda t: self.tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def count_tokens(self, chat: Chat, answer_prefix: str = "") -> int:
        """How many tokens the model reads for this chat (exactly what is encoded)."""
        return len(self.encode_chat(chat, answer_prefix))

    def choice_token_ids(self, chat: Chat, answer_prefix: str,
                         choices: tuple[str, ...]) -> tuple[list[int], list[int]]:
        """Token ids of the prompt and of each choice as the model would see it next.

        Found by tokenizing prompt + choice whole and requiring exactly one extra token, so
        a tokenizer that merges the choice into the prompt's last token is caught.
        """
        if self.is_chat and not (self.protect_data and self.has_control(chat)):
            text = self.render(chat, answer_prefix)  # the common case: render once

            def ids(extra: str) -> list[int]:
                return self.encode(text + extra)
        else:
            def ids(extra: str) -> list[int]:
                return self.encode_chat(chat, answer_prefix + extra)
        base = ids("")
        out = []
        for c in choices:
            full = ids(c)
            if len(full) != len(base) + 1 or full[:len(base)] != base:
                raise CaiError(f"choice {c!r} does not tokenize as one token after the answer "
                               f"prefix ...{answer_prefix[-20:]!r}; change the template's answer "
                               "prefix")
            out.append(full[-1])
        return base, out
