"""transformers backend (CPU or GPU): length-sorted batched generation and exact choice
log-probabilities that compute every shared token prefix once.

Why the prefix sharing: the feedback stage scores each pair K principles × 2 orders times,
and every judge prompt starts with the same template head, so most of the tokens it would
run are repeats; on CPU, batching does little for scoring, while a repeated token skipped
is compute saved outright. Prompts are tokenized whole and arranged in a token trie; each
shared run of tokens is run through the model once, its KV cache is reused by everything
below it, and only the short distinct suffixes are batched. Prefixes are found on token
ids, never by splitting strings, because tokenizing a prefix and a suffix apart changes the
tokens at the seam.
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
    trim_at_stop,
)
from cai.backends.chat import ChatFormat, check_fits, context_length, load_tokenizer
from cai.backends.options import bind_spec, check_chat
from cai.backends.prefix import (
    PrefixCache,
    cache_from,
    cache_layers,
    carry,
    chunk_mask,
    common_prefix,
    plan_chunks,
)
from cai.core import usage
from cai.core.errors import CaiError
from cai.core.models import ResolvedSpec
from cai.core.seeds import derive_seed

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class HFOptions:
    """Options of the transformers backend (spec `?key=value` pairs)."""

    dtype: str = "float32"
    """Weights dtype; fp32 is the default because bf16 is too coarse for log-prob labels."""
    batch_size: int = 16
    """Requests per forward, for generation and for the suffixes of one shared prefix."""
    scoring: str = "packed"
    """"packed": the token trie of all prompts in long single-row forwards (see
    `cai.backends.prefix`); "trie": one shared prefix at a time with its suffixes batched
    (the older schedule, used for attention kernels that take no custom mask)."""
    pack_tokens: int = 512
    """Tokens fed per packed scoring forward; larger uses more memory for the mask."""
    min_shared_tokens: int = 16
    """Trie schedule: a shared prefix is computed once when it saves this many positions."""
    prefix_cache_mb: int = 2048
    """KV of finished generations kept for reuse by later requests with the same start
    (few-shot turns, earlier SL steps); 0 turns generation prefix reuse off. The cache
    assumes fixed weights: code that updates `backend.model` in place must clear it
    (`backend.prefix_cache.clear()`)."""
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
        if self.scoring not in ("packed", "trie"):
            raise CaiError("hf option scoring: use packed or trie", field="model")
        if self.pack_tokens < 16:
            raise CaiError("hf option pack_tokens: must be at least 16", field="model")
        if self.prefix_cache_mb < 0:
            raise CaiError("hf option prefix_cache_mb: must be >= 0", field="model")
        check_chat("hf", self.chat)


def load_causal_lm(path: str | Path, dtype: torch.dtype):
    """A causal LM from a local folder, safely (see `load_pretrained`)."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, dtype=dtype)


def load_pretrained(auto_cls, path: str | Path, **kwargs):
    """`auto_cls.from_pretrained(path, **kwargs)`, safely: safetensors weights only (a pickled
    `pytorch_model.bin` can run code when loaded) and never code from the folder; a folder
    that cannot be loaded is one `CaiError` naming it."""
    try:
        return auto_cls.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False,
                                        **kwargs)
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

    def __init__(self, spec: str | ResolvedSpec, path: str | Path | None = None,
                 options: HFOptions | None = None, model=None, tokenizer=None):
        self.resolved, self.options = bind_spec(spec, HFOptions, options)
        self.spec, self.identity = self.resolved.raw, self.resolved.identity
        device = self.options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            path = path or self.resolved.path
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
        self.prefix_cache = None
        if self.options.prefix_cache_mb > 0 and self._reuse_ok():
            self.prefix_cache = PrefixCache(self.options.prefix_cache_mb * 2**20)

    def _reuse_ok(self) -> bool:
        """KV reuse needs an attention kernel that takes any padding mask, and full
        attention in every layer (a sliding-window cache keeps only its window)."""
        cfg = self.model.config
        return (getattr(cfg, "_attn_implementation", "eager") in ("sdpa", "eager")
                and not getattr(cfg, "sliding_window", None)
                and "sliding_attention" not in (getattr(cfg, "layer_types", None) or ()))

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
            # Each request samples from its own generator (see `_PerRequestSampler`), so its
            # text depends on its seed and inputs only, never on its batch neighbours.
            processors = None
            if config.temperature > 0:
                processors = LogitsProcessorList([_PerRequestSampler(
                    [derive_seed(config.seed, requests[i].seed) for i in chunk],
                    config.temperature, config.top_p, self.device)])
            rows = [ids[i] for i in chunk]
            if self.prefix_cache is not None:
                new = self._generate_reusing(rows, config.max_new_tokens, processors)
            else:
                new = self._generate_plain(rows, config.max_new_tokens, processors)
            for i, toks in zip(chunk, new):
                stopped = next((j for j, t in enumerate(toks) if t in self.stop_ids), None)
                body = toks if stopped is None else toks[:stopped]
                text = self.tok.decode(body, skip_special_tokens=True)
                reason = "stop" if stopped is not None else "length"
                if not self.is_chat:
                    text, cut = trim_at_stop(text)
                    reason = "stop" if cut else reason
                out[i] = Generation(text.strip(), reason, len(body))
            bar.update(len(chunk))
        bar.close()
        usage.add(self.identity, sum(len(x) for x in ids),
                  sum(g.tokens for g in out if g is not None), len(ids))
        return out  # type: ignore[return-value]

    def _generate(self, input_ids, mask, max_new: int, processors, past=None):
        return self.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
            temperature=None, top_p=None, top_k=None, pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.stop_ids, logits_processor=processors, past_key_values=past,
            return_dict_in_generate=True)

    def _generate_plain(self, rows: list[list[int]], max_new: int, processors) -> list[list[int]]:
        """Left-padded batch, every prompt token computed."""
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        gen = self._generate(input_ids, mask, max_new, processors)
        return [gen.sequences[k, width:].tolist() for k in range(len(rows))]

    def _generate_reusing(self, rows: list[list[int]], max_new: int, processors) -> list[list[int]]:
        """Start each row from the longest prefix it has in `prefix_cache`.

        A prefix every row shares (the few-shot turns) is computed once first. The batch
        cache holds each row's cached part left-padded to the longest; the rest of each
        row follows after a second run of padding, so every real token keeps its own
        position (positions come from the mask). Afterwards each row's prompt and
        generated tokens are stored for the next request that extends them.
        """
        cache = self.prefix_cache
        pad = self.tok.pad_token_id
        # Sorted order: the prefix all rows share is that of the smallest and the largest.
        shared = common_prefix(min(rows), max(rows), limit=min(len(r) for r in rows) - 1)
        hits = [cache.longest(r, len(r) - 1) for r in rows]
        if len(rows) > 1 and shared - max(n for n, _ in hits) >= self.options.min_shared_tokens:
            self._prefill(rows[0][:shared])
            hits = [cache.longest(r, len(r) - 1) for r in rows]
        c = max(n for n, _ in hits)
        width = max(len(r) - n for r, (n, _) in zip(rows, hits))
        input_ids, mask, past = [], [], None
        for r, (n, _) in zip(rows, hits):
            rest = len(r) - n
            input_ids.append([pad] * (c - n) + r[:n] + [pad] * (width - rest) + r[n:])
            mask.append([0] * (c - n) + [1] * n + [0] * (width - rest) + [1] * rest)
        if c:
            per_row = [cache.layers(e, n) if n else None for n, e in hits]
            past = cache_from(self._stack_left_padded(per_row, c), self.model.config)
        mask_t = torch.tensor(mask, device=self.device)
        gen = self._generate(torch.tensor(input_ids, device=self.device), mask_t, max_new,
                             processors, past)
        kv = cache_layers(gen.past_key_values)
        span = c + width
        new_rows = []
        for k, (r, (n, entry)) in enumerate(zip(rows, hits)):
            toks = gen.sequences[k, span:].tolist()
            new_rows.append(toks)
            stop = next((j for j, t in enumerate(toks) if t in self.stop_ids), len(toks) - 1)
            fed = min(stop + 1, len(toks) - 1, kv[0][0].shape[2] - span)  # tokens whose KV exists
            real = torch.cat([mask_t[k, c:span].nonzero().flatten() + c,
                              torch.arange(span, span + fed, device=self.device)])
            own = [(kk[k].index_select(1, real), vv[k].index_select(1, real)) for kk, vv in kv]
            cache.put(r + toks[:fed], entry, n, own)
        return new_rows

    def _prefill(self, tokens: list[int]) -> None:
        """Compute `tokens` once (from its longest cached prefix) and store them."""
        n, entry = self.prefix_cache.longest(tokens, len(tokens))
        past = cache_from([(k[None], v[None]) for k, v in self.prefix_cache.layers(entry, n)]
                          if n else [], self.model.config)
        ids = torch.tensor([tokens[n:]], device=self.device)
        self.model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1,
                   position_ids=torch.arange(n, len(tokens), device=self.device)[None])
        own = [(k[0, :, n:], v[0, :, n:]) for k, v in cache_layers(past)]
        self.prefix_cache.put(tokens, entry, n, own)

    def _stack_left_padded(self, per_row, width: int):
        """Per-layer [batch, heads, width, dim] from each row's cached KV, left-padded."""
        ref = next(x for x in per_row if x is not None)
        out = []
        for layer in range(len(ref)):
            ks, vs = [], []
            for x in per_row:
                k0, v0 = ref[layer]
                k, v = (x[layer] if x is not None else (k0[:, :0], v0[:, :0]))
                padding = width - k.shape[1]
                if padding:
                    zk = k0.new_zeros((k0.shape[0], padding, k0.shape[2]))
                    k, v = torch.cat([zk, k], dim=1), torch.cat([zk, v], dim=1)
                ks.append(k)
                vs.append(v)
            out.append((torch.stack(ks), torch.stack(vs)))
        return out

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
        usage.add(self.identity, sum(len(x) for x in seqs), 0, len(seqs))
        tokens = self.tok.convert_ids_to_tokens(targets[0]) if targets else []
        return ScoreResult(logprobs, tokens)

    @torch.no_grad()
    def score_token_ids(self, seqs: list[list[int]], targets: list[list[int]]) -> np.ndarray:
        """log_softmax(next-token logits)[target] at the end of each sequence, [n, k] fp64."""
        out = np.zeros((len(seqs), len(targets[0]) if targets else 0), dtype=np.float64)
        if not seqs:
            return out
        check_fits([len(x) for x in seqs], 0, self.max_context, "scoring")
        bar = tqdm(total=len(seqs), desc="score", unit="prompt", leave=False,
                   disable=not self.options.progress or len(seqs) < 2)
        order = sorted(range(len(seqs)), key=lambda i: seqs[i])
        if self._can_pack(max(len(s) for s in seqs)):
            self._score_packed(order, seqs, targets, out, bar)
        else:
            self._solve(order, 0, None, seqs, targets, out, bar)
        bar.close()
        return out

    def _can_pack(self, longest: int) -> bool:
        """Packing needs a kernel that takes a custom mask, and no sliding window the
        prompts outgrow (a custom mask would override it)."""
        window = getattr(self.model.config, "sliding_window", None)
        return (self.options.scoring == "packed"
                and getattr(self.model.config, "_attn_implementation", "eager") in ("sdpa", "eager")
                and not (window and longest > window))

    def _score_packed(self, order: list[int], seqs, targets, out, bar) -> None:
        """Score through packed chunks (`cai.backends.prefix.plan_chunks`), carrying the
        prefix the next chunk starts from as a single-row KV cache."""
        dtype = next(self.model.parameters()).dtype
        sorted_seqs = [seqs[i] for i in order]
        chunks = plan_chunks(sorted_seqs, self.options.pack_tokens)
        layers = None  # the carried prefix, per layer, [1, heads, ctx, dim]
        for n, ch in enumerate(chunks):
            past = cache_from(layers if ch.ctx else [], self.model.config)
            ends = sorted({row.path[-1] for row in ch.rows if row.path})
            logits = self.model(
                input_ids=torch.tensor([ch.tokens], device=self.device),
                position_ids=torch.tensor([ch.positions], device=self.device),
                attention_mask=chunk_mask(ch, dtype, self.device),
                past_key_values=past,
                use_cache=True, logits_to_keep=torch.tensor(ends, device=self.device))
            col = {t: j for j, t in enumerate(ends)}
            lp = torch.log_softmax(logits.logits[0].float(), dim=-1)
            for row in ch.rows:
                i = order[row.index]
                if row.path:
                    out[i] = lp[col[row.path[-1]], targets[i]].double().cpu().numpy()
                else:  # identical to the last prompt of the previous chunk
                    out[i] = out[order[row.index - 1]]
            bar.update(len(ch.rows))
            if n + 1 < len(chunks):
                nxt = chunks[n + 1].ctx
                last = ch.rows[-1]
                layers = carry(cache_layers(logits.past_key_values), ch.ctx, last.reach,
                               last.path, nxt)

    def _solve(self, idxs: list[int], depth: int, cache, seqs, targets, out, bar) -> None:
        """Score the sequences `idxs`, which share `seqs[i][:depth]` held in `cache`.

        Extends the shared prefix as far as all of them agree, then splits them by the next
        token: a branch whose members share enough further tokens recurses with the cache
        extended (and cropped back afterwards); the rest are scored as suffixes in batches.
        """
        first, last = seqs[idxs[0]], seqs[idxs[-1]]  # sorted: the LCP of all = LCP(first, last)
        limit = min(len(seqs[i]) for i in idxs) - 1  # leave every sequence a token to score
        lcp = common_prefix(first, last, depth, limit)
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
        limit = min(len(seqs[i]) for i in group) - 1
        n = common_prefix(seqs[group[0]], seqs[group[-1]], depth, limit)
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
