"""Prefix caching: the keys/values of prompt prefixes that requests share, reused instead of prefilled.

Prompts are cut into blocks of ``block`` tokens. A block's key is a hash of the previous block's
key and this block's tokens, so a key names the whole prefix up to the block's end (two prompts
share a key only if they share every token before it). An entry holds that block's keys/values,
``(n_layer, kv_heads, block, head_dim)`` each, in the engine's cache dtype.

A prefix match always starts at position 0, so the cached keys, rotated (RoPE) or not at their
absolute positions, are exactly what a prefill of the same tokens would write there. Sliding-window
models need nothing special: every cache keeps all slots and masks the band per layer
(model/kv_cache.py), so a block's keys/values do not depend on the window. What changes the
keys/values of the same tokens is part of the first key (``namespace``): a steering vector (the
engine hashes its vector, layer and scale). One cache belongs to one engine, hence one model and
one dtype.

Eviction is LRU by block under a byte budget. A lookup touches the blocks it matched deepest first
and an insert its blocks deepest first, so a prefix's first block is always used more recently than
its later ones and goes last: a cached block's parent is (nearly always) cached too.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Optional, Sequence

import torch

DEFAULT_BLOCK = 16  # tokens per block: a prefix is matched to a multiple of it


def namespace(steer: Optional[tuple]) -> bytes:
    """The first key of a prompt's chain: empty for the plain model; a steering vector's own otherwise."""
    if steer is None:
        return b""
    vec, layer, scale = steer
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((int(layer), float(scale), str(vec.dtype), tuple(vec.shape))).encode())
    h.update(vec.detach().float().cpu().contiguous().numpy().tobytes())
    return h.digest()


class PrefixCache:
    """Keys/values of prompt blocks by chained hash, LRU under ``budget_bytes``."""

    def __init__(self, budget_bytes: int, block: int = DEFAULT_BLOCK):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.budget, self.block = budget_bytes, block
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # oldest first
        self.bytes = 0
        self.hits = self.misses = 0  # lookups that reused at least one block / none
        self.hit_tokens = 0  # prompt tokens not prefilled thanks to the cache
        self.evictions = 0

    def keys(self, ids: Sequence[int], ns: bytes = b"", n_blocks: Optional[int] = None) -> list[bytes]:
        """The chained keys of the first ``n_blocks`` full blocks of ``ids`` (default: all)."""
        B = self.block
        n = len(ids) // B if n_blocks is None else n_blocks
        raw = array("q", ids[:n * B]).tobytes()  # 8 bytes a token: any id fits
        out, prev, w = [], ns, 8 * B
        for i in range(n):
            prev = hashlib.blake2b(prev + raw[i * w:(i + 1) * w], digest_size=16).digest()
            out.append(prev)
        return out

    def lookup(self, ids: Sequence[int], ns: bytes = b"", limit: Optional[int] = None) -> list:
        """The cached blocks of the longest cached block prefix of ``ids`` (at most ``limit`` tokens):
        a list of (k, v), in order; counts a hit or a miss."""
        n = len(ids) if limit is None else min(limit, len(ids))
        found = []
        for key in self.keys(ids, ns, n // self.block):
            kv = self.blocks.get(key)
            if kv is None:
                break
            found.append((key, kv))
        for key, _ in reversed(found):  # deepest first: the first block ends most recently used
            self.blocks.move_to_end(key)
        if found:
            self.hits += 1
            self.hit_tokens += len(found) * self.block
        else:
            self.misses += 1
        return [kv for _, kv in found]

    def insert(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor, ns: bytes = b"") -> None:
        """Store the full blocks of ``ids`` from its keys/values ``k``, ``v``: (n_layer, kv_heads, >= len, head_dim)."""
        if self.budget <= 0:
            return
        B = self.block
        keys = self.keys(ids, ns)
        for i, key in enumerate(keys):
            if key in self.blocks:
                continue
            kb = k[:, :, i * B:(i + 1) * B].clone()  # a copy: the source is a row that will be reused
            vb = v[:, :, i * B:(i + 1) * B].clone()
            size = (kb.numel() * kb.element_size()) * 2
            if size > self.budget:
                return  # one block is over the whole budget: nothing fits
            self.blocks[key] = (kb, vb)
            self.bytes += size
        for key in reversed(keys):  # deepest first, as in lookup
            self.blocks.move_to_end(key)
        while self.bytes > self.budget:
            _, (kb, vb) = self.blocks.popitem(last=False)
            self.bytes -= (kb.numel() * kb.element_size()) * 2
            self.evictions += 1

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0
