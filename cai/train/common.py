"""What every trainer shares: how a (prompt, response) is shown to a reward model, LoRA
settings, device choice and the saved-folder manifest.

The preference model, the reward used in RL and best-of-k must read a response exactly
the same way, or a reward model scores text it was never trained on; so the rendering
lives here once.
"""

from __future__ import annotations

from typing import Any

Chat = list[dict[str, str]]


def as_chat(prompt: Chat | str) -> Chat:
    """A prompt given as text or as a chat, as a chat."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def pm_text(tokenizer: Any, prompt: Chat | str, response: str) -> str:
    """The text a preference model scores: the conversation ending in the response.

    Uses the tokenizer's chat template when it has one, plain "Human:/Assistant:" text
    otherwise. The score is read at the last non-pad token of this text.
    """
    chat = as_chat(prompt) + [{"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False)
    from cai.backends.base import render_plain

    return render_plain(chat[:-1], response)


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["pm_text", "as_chat", "use_cuda"]
