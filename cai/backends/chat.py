"""How a tokenizer turns chats into model input: one implementation for every backend.

The hf, vLLM and OpenAI-compatible backends must feed a model the exact same token ids,
or their log-probs would not agree; so rendering, encoding and the choice-token lookup
live here once.
"""

from __future__ import annotations

from cai.backends.base import Chat, render_plain
from cai.errors import CaiError

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


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

    def render(self, chat: Chat, answer_prefix: str = "") -> str:
        """The exact text the model sees; the assistant turn is opened by `answer_prefix`."""
        if not self.is_chat:
            return render_plain(chat, answer_prefix)
        text = self.tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return text + answer_prefix

    def encode(self, text: str) -> list[int]:
        # A chat template already holds its special tokens; plain text gets the BOS, if any.
        return self.tok(text, add_special_tokens=not self.is_chat)["input_ids"]

    def choice_token_ids(self, text: str, choices: tuple[str, ...]) -> tuple[list[int], list[int]]:
        """Token ids of the prompt and of each choice as the model would see it next.

        Found by tokenizing prompt + choice whole and requiring exactly one extra token, so
        a tokenizer that merges the choice into the prompt's last token is caught.
        """
        base = self.encode(text)
        out = []
        for c in choices:
            full = self.encode(text + c)
            if len(full) != len(base) + 1 or full[:len(base)] != base:
                raise CaiError(f"choice {c!r} does not tokenize as one token after the answer "
                               f"prefix ...{text[-20:]!r}; change the template's answer prefix")
            out.append(full[-1])
        return base, out
