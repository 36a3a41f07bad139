"""OpenAI-compatible backend: `vllm serve`, TGI, or a hosted API, over HTTP.

With a tokenizer (spec option `tokenizer=SPEC`, or a served model name that is itself a
local model spec) prompts are rendered locally exactly as the transformers backend renders
them and sent as text to `/v1/completions`, so scores agree across backends. Without one,
generation goes through `/v1/chat/completions` and scoring asks the chat endpoint for the
first answer token's top log-probs (approximate: the server's template decides the text).

Choice log-probs come from the top log-probs the server returns (up to `top_logprobs`); a
choice missing from them gets the smallest returned value as an upper bound and is counted
in `truncated_choices`. A server that returns no log-probs at all is a clear error.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from cai.backends.base import (
    Chat,
    Generation,
    GenerationConfig,
    GenRequest,
    ScoreRequest,
    ScoreResult,
    render_plain,
)
from cai.backends.chat import check_fits
from cai.backends.options import bind_spec, check_chat
from cai.core import usage
from cai.core.errors import CaiError
from cai.core.models import ResolvedSpec, local_path
from cai.core.seeds import derive_seed


@dataclass
class OpenAIOptions:
    """Options of the OpenAI-compatible backend (spec `?key=value` pairs)."""

    tokenizer: str = ""
    """Model spec or folder whose tokenizer renders prompts locally (exact scoring)."""
    concurrency: int = 8
    """Requests in flight at once."""
    retries: int = 4
    """Retries on connection errors, 429 and 5xx, with exponential backoff."""
    timeout: float = 120.0
    """Seconds per request."""
    top_logprobs: int = 20
    """How many top log-probs to ask for when scoring."""
    api_key: str = ""
    """Bearer token; default: $OPENAI_API_KEY."""
    chat: str = "auto"
    """"auto" uses the tokenizer's chat template when it has one; "0" forces plain text."""

    def check(self) -> None:
        if self.concurrency < 1:
            raise CaiError("openai option concurrency: must be at least 1", field="model")
        if self.retries < 0 or self.timeout <= 0 or not 1 <= self.top_logprobs <= 100:
            raise CaiError("openai options: retries >= 0, timeout > 0, top_logprobs in [1, 100]",
                           field="model")
        check_chat("openai", self.chat)


def _local_config(path) -> dict | None:
    """The model config beside a local tokenizer, if there is one (for its context length)."""
    import json
    from pathlib import Path

    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return data.get("text_config") if isinstance(data.get("text_config"), dict) else data


class OpenAIBackend:
    """A model behind an OpenAI-compatible HTTP API. Implements the `Backend` protocol."""

    def __init__(self, spec: str | ResolvedSpec, options: OpenAIOptions | None = None):
        import os

        self.resolved, self.options = bind_spec(spec, OpenAIOptions, options)
        self.spec, self.identity = self.resolved.raw, self.resolved.identity
        self.base_url = self.resolved.target
        self.model = self.resolved.served_name or ""
        self.api_key = self.options.api_key or os.environ.get("OPENAI_API_KEY", "")
        self.max_context: int | None = None
        self.fmt = self._local_format()
        self.truncated_choices = 0

    def _local_format(self):
        candidates = [self.options.tokenizer] if self.options.tokenizer else []
        if self.model:
            candidates.append(self.model)
        for cand in candidates:
            try:
                path = local_path(cand)
            except CaiError:
                if cand == self.options.tokenizer:
                    raise
                continue
            from cai.backends.chat import ChatFormat, context_length, load_tokenizer

            tok = load_tokenizer(path)
            self.max_context = context_length(_local_config(path), tok)
            return ChatFormat(tok, self.options.chat)
        return None

    def context_length(self) -> int | None:
        """Known only with a local tokenizer (its folder's config or `model_max_length`);
        without one nothing can be counted, so the stages do not check lengths."""
        return self.max_context if self.fmt else None

    def count_tokens(self, chat: Chat, answer_prefix: str = "") -> int | None:
        return self.fmt.count_tokens(chat, answer_prefix) if self.fmt else None

    def render(self, chat: Chat, answer_prefix: str = "") -> str:
        return self.fmt.render(chat, answer_prefix) if self.fmt else render_plain(chat, answer_prefix)

    def _prompt(self, chat: Chat, answer_prefix: str) -> str | list[int]:
        """The prompt for /completions: text, or token ids when message text holds control-
        token strings, so the server cannot parse them into real control tokens."""
        assert self.fmt is not None
        if self.fmt.has_control(chat) or not self.fmt.is_chat:
            return self.fmt.encode_chat(chat, answer_prefix)
        return self.render(chat, answer_prefix)

    # ------------------------------------------------------------------ HTTP

    def _run(self, payloads: list[tuple[str, dict]]) -> list[dict]:
        results = asyncio.run(self._gather(payloads))
        for (_, body), res in zip(payloads, results):
            self._count(body, res)
        return results

    def _count(self, body: dict, res: dict) -> None:
        """Tokens of one call: the server's `usage`, else counted with the local tokenizer
        (prompt only), else nothing is known and only the call is counted."""
        used = res.get("usage") if isinstance(res, dict) else None
        if isinstance(used, dict) and isinstance(used.get("prompt_tokens"), int):
            usage.add(self.identity, used["prompt_tokens"], int(used.get("completion_tokens") or 0))
            return
        prompt = body.get("prompt")
        n = len(prompt) if isinstance(prompt, list) else (
            len(self.fmt.tok(prompt, add_special_tokens=False)["input_ids"])
            if isinstance(prompt, str) and self.fmt is not None else 0)
        usage.add(self.identity, n, 0)

    async def _gather(self, payloads: list[tuple[str, dict]]) -> list[dict]:
        import httpx

        sem = asyncio.Semaphore(self.options.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(timeout=self.options.timeout, headers=headers) as client:
            async def one(path: str, body: dict) -> dict:
                async with sem:
                    return await self._post(client, path, body)

            return await asyncio.gather(*(one(p, b) for p, b in payloads))

    async def _post(self, client, path: str, body: dict) -> dict:
        import httpx

        url = f"{self.base_url}{path}"
        for attempt in range(self.options.retries + 1):
            try:
                r = await client.post(url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                err = f"cannot reach {url}: {exc.__class__.__name__}"
            else:
                if r.status_code == 200:
                    return r.json()
                err = f"{url} answered {r.status_code}: {r.text[:300]}"
                if r.status_code != 429 and r.status_code < 500:
                    raise CaiError(err, field="model")
            if attempt < self.options.retries:
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        raise CaiError(f"{err} (after {self.options.retries} retries)", field="model")

    # ------------------------------------------------------------------ protocol

    def _check_fits(self, requests: list, extra: int, what: str) -> None:
        if self.fmt is not None and self.max_context is not None:
            check_fits([self.fmt.count_tokens(r.chat, r.answer_prefix) for r in requests], extra,
                       self.max_context, what)

    def generate(self, requests: list[GenRequest], config: GenerationConfig) -> list[Generation]:
        self._check_fits(requests, config.max_new_tokens, "generation")
        payloads = []
        for r in requests:
            body: dict[str, Any] = {"model": self.model, "max_tokens": config.max_new_tokens,
                                    "temperature": config.temperature, "top_p": config.top_p,
                                    "seed": derive_seed(config.seed, r.seed) % 2**31}
            if self.fmt:
                body["prompt"] = self._prompt(r.chat, r.answer_prefix)
                if not self.fmt.is_chat:
                    body["stop"] = ["\nHuman:"]
                payloads.append(("/completions", body))
            else:
                msgs = list(r.chat) + ([{"role": "assistant", "content": r.answer_prefix}]
                                       if r.answer_prefix else [])
                payloads.append(("/chat/completions", {**body, "messages": msgs}))
        out = []
        for res in self._run(payloads):
            choice = res["choices"][0]
            text = choice.get("text") if "text" in choice else choice["message"]["content"]
            tokens = (res.get("usage") or {}).get("completion_tokens", 0)
            out.append(Generation((text or "").strip(),
                                  "length" if choice.get("finish_reason") == "length" else "stop",
                                  tokens))
        return out

    def choice_logprobs(self, requests: list[ScoreRequest],
                        choices: tuple[str, ...] = ("A", "B")) -> ScoreResult:
        self._check_fits(requests, 1, "scoring")
        k = self.options.top_logprobs
        payloads = []
        for r in requests:
            base = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
            if self.fmt:
                payloads.append(("/completions", {**base, "prompt": self._prompt(r.chat, r.answer_prefix),
                                                  "logprobs": k}))
            else:
                msgs = list(r.chat) + [{"role": "user", "content":
                                        f"Answer with the letter only. {r.answer_prefix}".strip()}]
                payloads.append(("/chat/completions", {**base, "messages": msgs, "logprobs": True,
                                                       "top_logprobs": k}))
        out = np.zeros((len(requests), len(choices)))
        truncated = np.zeros((len(requests), len(choices)), dtype=bool)
        for i, res in enumerate(self._run(payloads)):
            top = self._top_logprobs(res)
            floor = min(top.values())
            for j, c in enumerate(choices):
                if c in top:
                    out[i, j] = top[c]
                else:
                    out[i, j] = floor
                    truncated[i, j] = True
                    self.truncated_choices += 1
        return ScoreResult(out, list(choices), truncated if truncated.any() else None)

    def _top_logprobs(self, res: dict) -> dict[str, float]:
        """{token string: log-prob} of the first generated token, from either endpoint."""
        choice = (res.get("choices") or [{}])[0]
        lp = choice.get("logprobs")
        top: dict[str, float] = {}
        if lp and isinstance(lp.get("top_logprobs"), list) and lp["top_logprobs"]:
            top = dict(lp["top_logprobs"][0] or {})  # completions: [{token: logprob}, ...]
        elif lp and isinstance(lp.get("content"), list) and lp["content"]:
            top = {t["token"]: t["logprob"] for t in lp["content"][0].get("top_logprobs", [])}
        if not top:
            raise CaiError(f"{self.base_url} returned no log-probabilities; choice scoring needs a "
                           "server that returns them (e.g. `vllm serve --max-logprobs 20`)",
                           field="model")
        return top
