"""Prefix reuse for the transformers backend: tree-packed scoring and a KV prefix cache.

Why: the label stage scores each pair under K principles in two orders, and every SL step
re-reads a conversation that only grew. Most of those tokens were already computed.

Scoring packs the token trie of all prompts into long single-row forwards. Every distinct
token is fed once, at its depth as position id, under a mask that lets it see only its own
ancestors. Siblings of many pairs then share one large matmul instead of running as tiny
batches, so CPU matmuls stay as efficient as a plain long forward. The ancestors a chunk
needs from earlier chunks are always one contiguous prefix (chunks follow the sorted order,
which is the trie's depth-first order), so they are carried as an ordinary KV cache.

Generation keeps a token-keyed cache of the KV of finished requests. The next request that
starts with the same tokens (the few-shot turns, or the previous SL step's whole
conversation) resumes from the longest cached prefix instead of recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class PackedRow:
    """One sequence's place in a packed chunk."""

    index: int
    """Its index in the sorted list."""
    reach: int
    """How many positions of the carried cache it shares (it sees those and no more)."""
    path: list[int]
    """Chunk indices of its tokens at positions reach.., in order; the last one is its end."""
    new: int
    """How many of those tokens it feeds (the rest were fed by an earlier row)."""


@dataclass
class PackedChunk:
    """One packed forward: the carried cache holds the first `ctx` tokens of its first
    row; `tokens`/`positions` are the fed tokens and their depths in the trie."""

    ctx: int
    rows: list[PackedRow]
    tokens: list[int]
    positions: list[int]


def common_prefix(a: list[int], b: list[int], start: int = 0, limit: int | None = None) -> int:
    """Length of the common prefix of token lists a and b, known to be at least `start`
    and counted no further than `limit` (default: the shorter length)."""
    n = min(len(a), len(b)) if limit is None else limit
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_chunks(seqs: list[list[int]], max_tokens: int) -> list[PackedChunk]:
    """Split sorted sequences into packed chunks of at most `max_tokens` fed tokens (a row
    longer than that gets a chunk of its own). A row identical to the previous one feeds
    nothing and ends where it ends."""
    lcps = [0] + [common_prefix(seqs[i - 1], seqs[i]) for i in range(1, len(seqs))]
    chunks: list[PackedChunk] = []
    i = 0
    while i < len(seqs):
        ch = PackedChunk(lcps[i], [], [], [])
        reach, path = ch.ctx, []
        j = i
        while j < len(seqs):
            s = seqs[j]
            shared = ch.ctx if j == i else lcps[j]
            new = len(s) - shared
            if j > i and new > 0 and len(ch.tokens) + new > max_tokens:
                break
            if shared < reach:  # left the carried prefix: nothing of the branch is shared
                reach, path = shared, []
            else:  # keep the branch up to the shared point
                path = path[: shared - reach]
            start = len(ch.tokens)
            ch.tokens.extend(s[shared:])
            ch.positions.extend(range(shared, len(s)))
            path = path + list(range(start, len(ch.tokens)))
            ch.rows.append(PackedRow(j, reach, path, new))
            j += 1
        chunks.append(ch)
        i = j
    return chunks


def chunk_mask(ch: PackedChunk, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive [1, 1, n, ctx + n] mask: each fed token sees the carried positions its row
    shares and its own ancestors in the chunk (itself included), nothing else."""
    n = len(ch.tokens)
    allow = torch.zeros((n, ch.ctx + n), dtype=torch.bool)
    for row in ch.rows:
        if not row.new:
            continue
        path = torch.tensor(row.path, dtype=torch.long)
        fed = path[-row.new:]
        allow[fed, : row.reach] = True
        # The q-th fed token sees the path up to and including itself.
        block = torch.ones((row.new, len(row.path)), dtype=torch.bool).tril(len(row.path) - row.new)
        sub = allow[fed][:, ch.ctx + path] | block
        allow[fed.unsqueeze(1), (ch.ctx + path).unsqueeze(0)] = sub
    mask = torch.zeros((n, ch.ctx + n), dtype=dtype)
    mask.masked_fill_(~allow, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]], config):
    """A DynamicCache holding these per-layer (keys, values)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) of a DynamicCache, each [batch, heads, tokens, dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def carry(layers, chunk_start: int, reach: int, path: list[int], length: int):
    """The first `length` tokens of a row: positions below `reach` from the carried cache,
    the rest from the chunk's own tokens (which begin at `chunk_start` in `layers`)."""
    if length <= reach:
        return [(k[:, :, :length], v[:, :, :length]) for k, v in layers]
    idx = torch.tensor([chunk_start + t for t in path[: length - reach]], dtype=torch.long,
                       device=layers[0][0].device)
    return [(torch.cat([k[:, :, :reach], k.index_select(2, idx)], dim=2),
             torch.cat([v[:, :, :reach], v.index_select(2, idx)], dim=2)) for k, v in layers]


Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""Per-layer (keys, values) of one sequence, each [kv_heads, tokens, head_dim]."""


@dataclass(eq=False)
class _Entry:
    tokens: np.ndarray
    base: _Entry | None
    base_len: int
    own: Layers
    """KV of positions base_len.. (the part not held by `base`)."""
    children: int = 0
    bytes: int = 0


@dataclass
class PrefixCache:
    """Token-keyed KV of finished requests, stored as a tree of segments.

    An entry that extends an earlier one keeps only its own new positions and points at
    the earlier entry for the rest, so a few-shot head shared by every prompt, and each SL
    step's conversation that extends the previous step's, are held once. Least recently
    used leaves are dropped first when `max_bytes` is exceeded; an entry other entries
    build on stays until they are gone.
    """

    max_bytes: int
    entries: OrderedDict = field(default_factory=OrderedDict)
    bytes: int = 0

    def longest(self, tokens: list[int], limit: int) -> tuple[int, _Entry | None]:
        """The entry sharing the longest prefix with `tokens`, and that length (≤ limit)."""
        best, best_n = None, 0
        arr = np.asarray(tokens[:limit], dtype=np.int64)
        for e in self.entries.values():
            n = min(len(arr), len(e.tokens))
            if n <= best_n:
                continue
            diff = np.flatnonzero(arr[:n] != e.tokens[:n])
            m = int(diff[0]) if diff.size else n
            if m > best_n:
                best, best_n = e, m
        return best_n, best

    def layers(self, entry: _Entry, n: int) -> Layers:
        """KV of the first n positions of `entry` (and marks its chain recently used)."""
        parts: list[tuple[_Entry, int, int]] = []
        e: _Entry | None = entry
        while e is not None and n > 0:
            hi = min(n, len(e.tokens))
            if hi > e.base_len:
                parts.append((e, 0, hi - e.base_len))
            n = min(n, e.base_len)
            self.entries.move_to_end(id(e))
            e = e.base
        parts.reverse()
        if len(parts) == 1:
            ent, lo, hi = parts[0]
            return [(k[:, lo:hi], v[:, lo:hi]) for k, v in ent.own]
        return [(torch.cat([ent.own[i][0][:, lo:hi] for ent, lo, hi in parts], dim=1),
                 torch.cat([ent.own[i][1][:, lo:hi] for ent, lo, hi in parts], dim=1))
                for i in range(len(parts[0][0].own))]

    def put(self, tokens: list[int], base: _Entry | None, base_len: int, own: Layers) -> _Entry:
        """Store `tokens`, whose first `base_len` positions are those of `base`."""
        if base is None:
            base_len = 0
        if base is not None and base_len == len(base.tokens) == len(tokens):
            return base
        entry = _Entry(np.asarray(tokens, dtype=np.int64), base, base_len,
                       [(k.contiguous(), v.contiguous()) for k, v in own])
        entry.bytes = sum(k.numel() * k.element_size() * 2 for k, _ in entry.own)
        if base is not None:
            self._adopt(base)
            base.children += 1
        self.entries[id(entry)] = entry
        self.bytes += entry.bytes
        self._evict(keep=entry)
        return entry

    def _adopt(self, e: _Entry | None) -> None:
        """Re-admit an evicted entry (and its evicted bases) that something builds on again."""
        while e is not None and id(e) not in self.entries:
            self.entries[id(e)] = e
            self.bytes += e.bytes
            if e.base is not None:
                e.base.children += 1
            e = e.base

    def _evict(self, keep: _Entry) -> None:
        while self.bytes > self.max_bytes:
            victim = next((e for e in self.entries.values() if e.children == 0 and e is not keep),
                          None)
            if victim is None:
                return
            del self.entries[id(victim)]
            self.bytes -= victim.bytes
            if victim.base is not None:
                victim.base.children -= 1

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
