"""A prompt on its way into a batch row: prefilled into a one-row cache, whole or in chunks.

The engine admits a sequence by making a :class:`Prefill`: a one-row
:class:`~scalelm.model.kv_cache.PreallocatedKVCache` the length of the prompt, starting with the
blocks the prefix cache (prefix_cache.py) had for it. Each engine step then runs :meth:`Prefill.run`
over the next tokens, at most the step's chunk budget, so a long prompt is prefilled over several
steps and the running rows decode one token between its chunks (chunked prefill). When the last
chunk is in, the engine copies the cache into a free row and samples the first token from the last
logits.

Prompts admitted together (a burst of requests, or clients whose requests end on the same step)
are prefilled in one forward (:func:`run_group`): right-padded to the longest, which changes none
of their real positions' keys/values or logits but in the last float bits (attention is causal: a
token never sees the padding after it), instead of one forward each, whose small matrix products
and LM head (a (vocab x width) product per prompt) use the CPU poorly: 16 prompts of 32 tokens
took about 2.2x less time together than one after another (6L-384 model, one thread).

A chunk after the first attends to the slots before it through the cache's explicit mask (causal
over slots), where a prompt prefilled in one forward uses SDPA's ``is_causal``; both compute the
same attention, but through different kernels, so logits may differ in the last bits of float32
(tests compare greedy tokens exactly and logprobs to 1e-4).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..model.kv_cache import PreallocatedKVCache


class Prefill:
    """One sequence's prompt being prefilled: ``done`` of its tokens are in ``cache``."""

    def __init__(self, seq, cfg, device, dtype, cached: list = (), want_all: bool = False):
        self.seq, self.ids, self.want_all, self.cfg = seq, seq.prompt, want_all, cfg
        self.ns = b""  # the prefix cache's namespace of this prompt (prefix_cache.namespace)
        self.cache = PreallocatedKVCache(cfg, 1, max_len=len(self.ids), device=device, dtype=dtype)
        done = 0
        for k, v in cached:  # the prefix cache's blocks: (n_layer, kv_heads, block, head_dim)
            n = k.shape[2]
            self.cache.k[:, 0, :, done:done + n] = k
            self.cache.v[:, 0, :, done:done + n] = v
            done += n
        self.cache.pos = self.reused = self.done = done
        self.chunks: list[torch.Tensor] = []  # want_all: each chunk's (T, V) logits (prompt logprobs)
        self.last: Optional[torch.Tensor] = None  # (1, V): the logits after the last prompt token
        self.forwards = 0

    @property
    def left(self) -> int:
        return len(self.ids) - self.done

    def run(self, model, n: int) -> bool:
        """Prefill the next ``n`` tokens (at most what is left); True when the whole prompt is in."""
        n = min(n, self.left)
        x = torch.tensor([self.ids[self.done:self.done + n]], device=self.cache.k.device)
        self.forwards += 1
        if n < self.left and not self.want_all and hasattr(model, "hidden_states"):
            # a chunk before the last: only its keys/values are needed, not the LM head's logits
            # (a (vocab x width) product, as long as several layers for a small model's chunk)
            model.hidden_states(x, kv_cache=self.cache)
            self.done += n
            return False
        logits = model(x, kv_cache=self.cache, last_only=not self.want_all)[0][0]  # (n or 1, V)
        self.done += n
        if self.want_all:
            self.chunks.append(logits)
        self.last = logits[-1:]
        return self.left == 0

    def all_logits(self) -> torch.Tensor:
        """(prompt length, V): every prompt position's logits (``want_all``)."""
        return self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks)


MAX_PADDING = 1.5  # a group's padded tokens (rows x longest) at most this times its real ones
# and at most this many (unless one prompt is longer): a burst of long prompts would otherwise be one
# forward whose activations grow with all of them at once, where alone each needs its own only
MAX_GROUP_TOKENS = 2048


def groups(plan: list[tuple[Prefill, int]]) -> list[list[tuple[Prefill, int]]]:
    """Split this step's (job, tokens) into forwards: jobs that start at the same slot and want only
    their last logits share one while the padding stays under MAX_PADDING and the padded tokens
    under MAX_GROUP_TOKENS; the rest run alone."""
    out, batchable = [], {}
    for job, n in plan:
        if job.want_all:
            out.append([(job, n)])
        else:
            batchable.setdefault(job.done, []).append((job, n))
    for same_start in batchable.values():
        group: list = []
        for job, n in sorted(same_start, key=lambda jn: -jn[1]):  # longest first: group[0] sets the width
            padded = (len(group) + 1) * group[0][1] if group else n
            if group and (padded > MAX_PADDING * (sum(m for _, m in group) + n) or padded > MAX_GROUP_TOKENS):
                out.append(group)
                group = []
            group.append((job, n))
        out.append(group)
    return out


def run_group(model, group: list[tuple[Prefill, int]]) -> list[bool]:
    """Prefill each job's next ``n`` tokens, all in one forward; per job, True when its prompt is in."""
    if len(group) == 1 or not hasattr(model, "head_logits") or getattr(model, "lm_head", None) is None:
        return [job.run(model, n) for job, n in group]  # (a model without GPT's split of body and head)
    first = group[0][0]
    start, T, dev = first.done, max(n for _, n in group), first.cache.k.device
    cache = PreallocatedKVCache(first.cfg, len(group), max_len=start + T, device=dev, dtype=first.cache.k.dtype)
    x = torch.zeros(len(group), T, dtype=torch.long)  # right padding: token 0, seen by no real position
    for b, (job, n) in enumerate(group):
        x[b, :n] = torch.tensor(job.ids[start:start + n])
        if start:  # the blocks the prefix cache gave (the same number of slots for every job here)
            cache.k[:, b, :, :start] = job.cache.k[:, 0, :, :start]
            cache.v[:, b, :, :start] = job.cache.v[:, 0, :, :start]
    cache.pos = start
    h = model.hidden_states(x.to(dev), kv_cache=cache)  # (B, T, width)
    last = [b for b, (job, n) in enumerate(group) if n == job.left]
    logits = None
    if last:  # the LM head only on the last prompt token of the prompts that are all in now
        idx = torch.tensor([group[b][1] - 1 for b in last], device=dev)
        logits = model.head_logits(h[last, idx][:, None])[:, 0]  # (len(last), V)
    done = []
    for b, (job, n) in enumerate(group):
        job.cache.k[:, 0, :, start:start + n] = cache.k[:, b, :, start:start + n]
        job.cache.v[:, 0, :, start:start + n] = cache.v[:, b, :, start:start + n]
        job.done += n
        job.cache.pos = job.done
        job.forwards += 1
        if b in last:
            job.last = logits[last.index(b)][None]
        done.append(job.left == 0)
    return done
