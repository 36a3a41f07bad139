"""transformers backend (CPU or GPU): length-sorted batched generation and exact choice
log-probabilities that compute every shared token prefix once.

Why the prefix sharing: the feedback stage scores each pair K principles × 2 orders times,
and every judge prompt starts with the same template head. Measured on two CPU cores,
batching barely helps scoring while skipping repeated prefix tokens is nearly free speed.
Prompts are tokenized whole and arranged in a token trie; each shared run of tokens is run
through the model once, its KV cache is reused by everything below it, and only the short
distinct suffixes are batched. Prefixes are found on token ids, never by splitting strings,
because tokenizing a prefix and a suffix apart changes the tokens at the seam.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from cai.backends.base import (
    Generation,
    GenerationConfig,
    GenRequest,
    ScoreRequest,
    ScoreResult,
    parse_options,
    trim_at_stop,
)
from cai.backends.chat import ChatFormat, check_fits, context_length, load_tokenizer
from cai.constitution import derive_seed
from cai.errors import CaiError
from cai.models import ModelSpec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class HFOptions:
    """Options of the transformers backend (spec `?key=value` pairs)."""

    dtype: str = "float32"
    """Weights dtype; fp32 is the default because bf16 is too coarse for log-prob labels."""
    batch_size: int = 16
    """Requests per forward, for generation and for the suffixes of one shared prefix."""
    min_shared_tokens: int = 16
    """A shared prefix is computed once when it saves at least this many token positions."""
    device: str = ""
    """"cuda", "cpu", ...; empty picks cuda when available."""
    chat: str = "auto"
    """"auto" uses the chat template when the tokenizer has one; "0" forces plain text."""
    progress: bool = True
    """Show progress bars."""

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise CaiError(f"hf option dtype: unknown {self.dtype!r}; use one of {sorted(DTYPES)}",
                           field="model")
        if self.batch_size < 1:
            raise CaiError("hf option batch_size: must be at least 1", field="model")
        if self.min_shared_tokens < 1:
            raise CaiError("hf option min_shared_tokens: must be at least 1", field="model")
        if self.chat not in ("auto", "0", "1"):
            raise CaiError("hf option chat: use auto, 0 or 1", field="model")


def load_causal_lm(path: str | Path, dtype: torch.dtype):
    """A causal LM from a local folder, safely: safetensors weights only (a pickled
    `pytorch_model.bin` can run code when loaded) and never code from the folder."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=False)
    except OSError as exc:
        if not any(Path(path).glob("*.safetensors")):
            raise CaiError("no safetensors weights in the model folder (pickled .bin weights are "
                           "not loaded: they can run code); convert them with `save_pretrained("
                           "..., safe_serialization=True)`", str(path), "model") from None
        raise CaiError(f"cannot load the model: {str(exc).splitlines()[0][:300]}", str(path),
                       "model") from None
    except ValueError as exc:  # an unknown architecture or a folder without a config
        raise CaiError(f"cannot load the model: {str(exc).splitlines()[0][:300]}", str(path),
                       "model") from None


class _PerRequestSampler(LogitsProcessor):
    """Sampling with one random stream per request, inside greedy decoding.

    Temperature and top-p are applied, then Gumbel noise drawn from the row's own
    generator is added; the arg-max of that is an exact sample from the tempered nucleus.
    `generate` is run greedy, so the only randomness is these per-row streams: a request
    draws the same noise at the same step whatever its batch, position or batch size.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        self.gens = [torch.Generator(device="cpu").manual_seed(s % 2**63) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.device = device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the mass before it already reaches top_p (keep at least one).
            drop_sorted = probs.cumsum(dim=-1) - probs >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        vocab = logits.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.gens])
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        return (logits.double() + gumbel.to(logits.device)).to(scores.dtype)


class HFBackend:
    """A causal LM run with transformers. Implements `cai.backends.base.Backend`."""

    def __init__(self, spec: str | ModelSpec, path: str | Path | None = None,
                 options: HFOptions | None = None, model=None, tokenizer=None):
        from cai.models import local_path, model_identity, parse_spec

        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        self.spec = parsed.raw
        self.identity = model_identity(parsed)
        self.options = options or parse_options(HFOptions, parsed.options, "hf")
        device = self.options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            path = path or local_path(parsed)
            model = load_causal_lm(path, DTYPES[self.options.dtype])
            model.to(device)
        if tokenizer is None:
            tokenizer = load_tokenizer(path or model.config._name_or_path)
        self.model = model.eval()
        self.tok = tokenizer
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        extra = tuple(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.fmt = ChatFormat(tokenizer, self.options.chat, extra)
        self.is_chat = self.fmt.is_chat
        self.stop_ids = self.fmt.stop_ids
        self.device = next(self.model.parameters()).device
        self.render = self.fmt.render
        self.encode = self.fmt.encode
        self.encode_chat = self.fmt.encode_chat
        self.count_tokens = self.fmt.count_tokens
        self.max_context = context_length(self.model.config, tokenizer)

    def context_length(self) -> int | None:
        """The model's position limit (config), else its tokenizer's `model_max_length`."""
        return self.max_context

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, requests: list[GenRequest], config: GenerationConfig) -> list[Generation]:
        ids = [self.encode_chat(r.chat, r.answer_prefix) for r in requests]
        check_fits([len(x) for x in ids], config.max_new_tokens, self.max_context, "generation")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[Generation | None] = [None] * len(ids)
        bs = self.options.batch_size
        bar = tqdm(total=len(ids), desc="generate", unit="resp", leave=False,
                   disable=not self.options.progress or len(ids) < 2)
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            width = max(len(ids[i]) for i in chunk)
            pad = self.tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in chunk],
                                     device=self.device)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in chunk],
                                device=self.device)
            sample = config.temperature > 0
            # Each request samples from its own generator (see `_PerRequestSampler`), so its
            # text depends on its seed and inputs only, never on its batch neighbours.
            processors = None
            if sample:
                processors = LogitsProcessorList([_PerRequestSampler(
                    [derive_seed(config.seed, requests[i].seed) for i in chunk],
                    config.temperature, config.top_p, self.device)])
            gen = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=config.max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                eos_token_id=self.stop_ids, logits_processor=processors,
            )
            for row, i in enumerate(chunk):
                new = gen[row, width:].tolist()
                stopped = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
                body = new if stopped is None else new[:stopped]
                text = self.tok.decode(body, skip_special_tokens=True)
                reason = "stop" if stopped is not None else "length"
                if not self.is_chat:
                    text, cut = trim_at_stop(text)
                    reason = "stop" if cut else reason
                out[i] = Generation(text.strip(), reason, len(body))
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def choice_logprobs(self, requests: list[ScoreRequest],
                        choices: tuple[str, ...] = ("A", "B")) -> ScoreResult:
        seqs, targets = [], []
        for r in requests:
            ids, tgt = self.fmt.choice_token_ids(r.chat, r.answer_prefix, choices)
            seqs.append(ids)
            targets.append(tgt)
        logprobs = self.score_token_ids(seqs, targets)
        tokens = self.tok.convert_ids_to_tokens(targets[0]) if targets else []
        return ScoreResult(logprobs, tokens)

    def score_token_ids(self, seqs: list[list[int]], targets: list[list[int]]) -> np.ndarray:
        """log_softmax(next-token logits)[target] at the end of each sequence, [n, k] fp64."""
        out = np.zeros((len(seqs), len(targets[0]) if targets else 0), dtype=np.float64)
        if not seqs:
            return out
        check_fits([len(x) for x in seqs], 0, self.max_context, "scoring")
        bar = tqdm(total=len(seqs), desc="score", unit="prompt", leave=False,
                   disable=not self.options.progress or len(seqs) < 2)
        order = sorted(range(len(seqs)), key=lambda i: seqs[i])
        self._solve(order, 0, None, seqs, targets, out, bar)
        bar.close()
        return out

    def _solve(self, idxs: list[int], depth: int, cache, seqs, targets, out, bar) -> None:
        """Score the sequences `idxs`, which share `seqs[i][:depth]` held in `cache`.

        Extends the shared prefix as far as all of them agree, then splits them by the next
        token: a branch whose members share enough further tokens recurses with the cache
        extended (and cropped back afterwards); the rest are scored as suffixes in batches.
        """
        first, last = seqs[idxs[0]], seqs[idxs[-1]]  # sorted: the LCP of all = LCP(first, last)
        limit = min(len(seqs[i]) for i in idxs) - 1  # leave every sequence a token to score
        lcp = depth
        while lcp < limit and first[lcp] == last[lcp]:
            lcp += 1
        if len(idxs) > 1 and (len(idxs) - 1) * (lcp - depth) >= self.options.min_shared_tokens:
            cache = self._extend(cache, first[depth:lcp])
            self._solve_below(idxs, lcp, cache, seqs, targets, out, bar)
            if depth > 0:  # hand the parent its own prefix back; a root cache is dropped
                cache.crop(depth - cache.get_seq_length())  # negative: drop that many tokens
            return
        self._solve_below(idxs, depth, cache, seqs, targets, out, bar)

    def _solve_below(self, idxs, depth, cache, seqs, targets, out, bar) -> None:
        leaves: list[int] = []
        start = 0
        while start < len(idxs):  # runs of equal next token (idxs are sorted)
            end = start + 1
            key = seqs[idxs[start]][depth] if len(seqs[idxs[start]]) > depth else None
            while end < len(idxs) and len(seqs[idxs[end]]) > depth and seqs[idxs[end]][depth] == key:
                end += 1
            group = idxs[start:end]
            if len(group) > 1 and self._shared_gain(group, depth, seqs) >= self.options.min_shared_tokens:
                self._solve(group, depth, cache, seqs, targets, out, bar)
            else:
                leaves.extend(group)
            start = end
        bs = self.options.batch_size
        for s in range(0, len(leaves), bs):
            self._score_suffixes(leaves[s:s + bs], depth, cache, seqs, targets, out)
            bar.update(len(leaves[s:s + bs]))

    @staticmethod
    def _shared_gain(group: list[int], depth: int, seqs) -> int:
        first, last = seqs[group[0]], seqs[group[-1]]
        limit = min(len(seqs[i]) for i in group) - 1
        n = depth
        while n < limit and first[n] == last[n]:
            n += 1
        return (len(group) - 1) * (n - depth)

    def _extend(self, cache, tokens: list[int]):
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        past = cache.get_seq_length()
        ids = torch.tensor([tokens], device=self.device)
        mask = torch.ones((1, past + len(tokens)), dtype=torch.long, device=self.device)
        self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
        return cache

    def _score_suffixes(self, rows: list[int], depth: int, cache, seqs, targets, out) -> None:
        """Right-padded suffixes after a shared cached prefix; logits read at each row's end."""
        suffixes = [seqs[i][depth:] for i in rows]
        width = max(len(s) for s in suffixes)
        pad = self.tok.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=self.device)
        mask = torch.tensor([[1] * (depth + len(s)) + [0] * (width - len(s)) for s in suffixes],
                            device=self.device)
        past = None
        if cache is not None and depth > 0:
            past = copy.deepcopy(cache)
            if len(rows) > 1:
                past.batch_repeat_interleave(len(rows))
        ends = [len(s) - 1 for s in suffixes]
        keep = sorted(set(ends))
        logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=past,
                            use_cache=past is not None,
                            logits_to_keep=torch.tensor(keep, device=self.device)).logits
        col = {p: j for j, p in enumerate(keep)}
        for r, i in enumerate(rows):
            lp = torch.log_softmax(logits[r, col[ends[r]]].float(), dim=-1)
            out[i] = lp[targets[i]].double().cpu().numpy()
