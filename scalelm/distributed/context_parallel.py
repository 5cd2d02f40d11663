"""Context parallelism: each sequence split over the ``cp`` ranks, attention computed as a ring.

What grows with the sequence is activation memory: every saved activation is per token. TP
without sequence parallelism divides only those inside attention and the MLP; splitting the
sequence divides all of them, and moves only keys and values (not the whole residual stream).

PyTorch's ``torch.distributed.tensor.experimental.context_parallel`` dispatches only CUDA's
attention kernels (flash, efficient, cuDNN). On CPU (torch 2.13, gloo) it fails with
"Operator aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding
strategy registered". So this is a ring attention of our own, applied from outside the model
like the other dimensions (``apply_cp``):

* **The split** is load-balanced ("zigzag"): a sequence is cut into ``2*cp`` chunks and cp rank
  ``r`` holds chunks ``r`` and ``2*cp-1-r`` (:func:`cp_positions`). Under the causal mask every
  rank then does the same attention work; contiguous halves would give the last rank ``cp``
  times the first one's.
* **The model** gets a forward pre-hook that keeps this rank's chunks of ``idx`` and ``targets``
  and passes their positions as ``pos_ids``: learned positions (GPT-2) and RoPE (Llama) both
  index by them. The loss is the mean over this rank's tokens; ranks hold equal numbers of them,
  so the mean over the cp ranks, which the gradient reduction over ``dp_shard x cp`` takes, is
  the mean over the sequence.
* **Attention**: each ``Attention`` module's forward runs inside a ``TorchFunctionMode`` that sends
  its ``F.scaled_dot_product_attention`` call to :class:`RingAttention`. K and V travel around
  the cp ranks (sent to the next, received from the previous, while the block in hand is
  computed); the partial results of this rank's queries are combined with the log-sum-exp rule
  (flash attention's online softmax). The backward runs the ring again: K and V travel with
  their gradient accumulators, which are home after ``cp`` hops. A block is one kernel: on CPU,
  ATen's flash kernel and its backward (which takes the global output and log-sum-exp, so the
  block gradients add up to the exact ones); on other devices a matmul kernel with the same
  contract (:func:`math_block_forward`), which holds a block's scores in memory.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .mesh import LayoutError

# ----------------------------------------------------------------------------- the split


def cp_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks (of ``2*cp``) that cp rank ``rank`` holds: one early, one late."""
    return rank, 2 * cp - 1 - rank


def cp_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The positions of a ``seq_len`` sequence that cp rank ``rank`` holds, in order."""
    if seq_len % (2 * cp):
        raise LayoutError(f"context parallelism splits a sequence into 2 x cp = {2 * cp} chunks: a sequence "
                          f"of {seq_len} tokens does not divide; use a length divisible by {2 * cp}")
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in cp_chunks(cp, rank)])


def _pairs(q_chunks, k_chunks):
    """(i, j, causal) for each query chunk i and key chunk j with anything unmasked: a later
    chunk sees an earlier one whole, a chunk sees itself causally, an earlier one nothing."""
    for i, qc in enumerate(q_chunks):
        for j, kc in enumerate(k_chunks):
            if qc >= kc:
                yield i, j, qc == kc


# ----------------------------------------------------------------------------- one block


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    acc = _acc(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, -math.inf)
    return s


def math_block_forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, logsumexp) of one block, by matmuls (any device; the block's scores in memory)."""
    s = _scores(q, k, causal, scale)
    lse = s.logsumexp(-1)
    return (torch.exp(s - lse[..., None]) @ v.to(s.dtype)).to(q.dtype), lse


def math_block_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) of one block, given the *global* output and log-sum-exp of its queries:
    the softmax of the whole row is ``exp(s - lse)``, and ``D = rowsum(dout * out)`` is the row's
    term of the softmax gradient, so the blocks' gradients sum to the full attention's."""
    acc = _acc(q.dtype)
    p = torch.exp(_scores(q, k, causal, scale) - lse.to(acc)[..., None])
    dout = dout.to(acc)
    dv = p.transpose(-1, -2) @ dout
    ds = p * (dout @ v.to(acc).transpose(-1, -2) - (dout * out.to(acc)).sum(-1, keepdim=True))
    return (ds @ k.to(acc)) * scale, (ds.transpose(-1, -2) @ q.to(acc)) * scale, dv


def block_forward(q, k, v, causal: bool, scale: float):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return math_block_forward(q, k, v, causal, scale)


def block_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    return math_block_backward(dout, q, k, v, out, lse, causal, scale)


# ----------------------------------------------------------------------------- the ring


class _Ring:
    """Point-to-point passes around the cp group: send to the next rank, receive from the previous."""

    def __init__(self, group, cp: int, rank: int):
        self.group, self.cp, self.rank = group, cp, rank

    def start(self, t: torch.Tensor, tag: int):
        recv = torch.empty_like(t)
        works = [dist.isend(t, group=self.group, group_dst=(self.rank + 1) % self.cp, tag=tag),
                 dist.irecv(recv, group=self.group, group_src=(self.rank - 1) % self.cp, tag=tag)]
        return works, recv

    @staticmethod
    def finish(pending) -> torch.Tensor:
        works, recv = pending
        for w in works:
            w.wait()
        return recv


def _chunk(t: torch.Tensor, i: int) -> torch.Tensor:
    c = t.shape[2] // 2
    return t[:, :, i * c:(i + 1) * c]


def _expand(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head serves ``groups`` query heads (as SDPA's
    ``enable_gqa``: ``repeat_interleave`` over heads)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold(g: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of :func:`_expand`: sum over the query heads that shared a key/value head."""
    if groups == 1:
        return g
    B, H, T, D = g.shape
    return g.view(B, H // groups, groups, T, D).sum(2)


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's query chunks over the whole sequence's keys and values,
    which arrive one cp rank at a time. Inputs ``(B, H, T_local, D)``, keys/values
    ``(B, H_kv, T_local, D)``; ``T_local`` is this rank's two chunks (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, ring: _Ring):
        cp, rank = ring.cp, ring.rank
        groups = q.shape[1] // k.shape[1]
        acc = _acc(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()  # what travels
        mine = cp_chunks(cp, rank)
        for step in range(cp):
            pending = ring.start(kv, tag=0) if step < cp - 1 else None
            for i, j, causal in _pairs(mine, cp_chunks(cp, (rank - step) % cp)):
                o, l = block_forward(_chunk(q, i).contiguous(), _expand(_chunk(kv[0], j), groups).contiguous(),
                                     _expand(_chunk(kv[1], j), groups).contiguous(), causal, scale)
                acc_o, acc_l = _chunk(out, i), _chunk(lse[..., None], i)[..., 0]
                new = torch.logaddexp(acc_l, l.to(acc))  # online softmax: rescale both to the new total
                acc_o.mul_(torch.exp(acc_l - new)[..., None]).add_(o.to(acc) * torch.exp(l.to(acc) - new)[..., None])
                acc_l.copy_(new)
            if pending is not None:
                kv = ring.finish(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.ring = scale, ring
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = ctx.ring, ctx.scale
        cp, rank = ring.cp, ring.rank
        groups = q.shape[1] // k.shape[1]
        acc = _acc(q.dtype)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # travels with kv, fp32 on the way
        mine = cp_chunks(cp, rank)
        for step in range(cp):
            pending = ring.start(kv, tag=0) if step < cp - 1 else None
            for i, j, causal in _pairs(mine, cp_chunks(cp, (rank - step) % cp)):
                g_q, g_k, g_v = block_backward(
                    _chunk(dout, i).contiguous(), _chunk(q, i).contiguous(),
                    _expand(_chunk(kv[0], j), groups).contiguous(), _expand(_chunk(kv[1], j), groups).contiguous(),
                    _chunk(out, i).contiguous(), _chunk(lse[..., None], i)[..., 0].contiguous(), causal, scale)
                _chunk(dq, i).add_(g_q.to(acc))
                _chunk(dkv[0], j).add_(_fold(g_k.to(acc), groups))
                _chunk(dkv[1], j).add_(_fold(g_v.to(acc), groups))
            dkv = ring.finish(ring.start(dkv, tag=1))  # after cp hops each accumulator is home
            if pending is not None:
                kv = ring.finish(pending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


# ----------------------------------------------------------------------------- installing it


class _RingSDPA(TorchFunctionMode):
    """Inside one attention module's forward: ``F.scaled_dot_product_attention`` -> the ring."""

    def __init__(self, ring: _Ring):
        super().__init__()
        self.ring, self.calls = ring, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        return ring_sdpa(*args, ring=self.ring, **kwargs)


def ring_sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: Optional[float] = None, enable_gqa: bool = False, *, ring: _Ring) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s signature, for the causal, unmasked call the GPT makes."""
    if attn_mask is not None:
        raise LayoutError("context parallelism runs plain causal attention: batches with an attention "
                          "mask (padding, packed documents) need --parallel.cp=1")
    if dropout_p > 0:
        raise LayoutError("context parallelism runs attention without dropout: set --model.dropout=0")
    if not is_causal:
        raise LayoutError("context parallelism splits causal attention; this call is not causal")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return RingAttention.apply(query, key, value, scale, ring)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    from ..model.gpt import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def apply_cp(model: nn.Module, cp_group, cp: int, cp_rank: int) -> None:
    """Split every sequence ``model`` sees over the cp group and make its attention a ring.

    ``model`` is a GPT (before FSDP2/DDP wrap it: their hooks and this one are independent).
    Its ``forward(idx, targets)`` then computes on this rank's chunks: the logits returned are
    those chunks' and the loss is their mean.
    """
    ring = _Ring(cp_group, cp, cp_rank)
    block_size = model.cfg.block_size
    cache: dict[tuple, torch.Tensor] = {}

    def shard_inputs(_module, args, kwargs):
        names = ("idx", "targets")
        given = dict(zip(names, args), **kwargs)
        for k in ("kv_cache", "attn_mask", "pos_ids"):
            if given.get(k) is not None:
                raise LayoutError(f"context parallelism splits whole training sequences; a forward with "
                                  f"{k} (generation, packed or padded batches) needs --parallel.cp=1")
        idx, targets = given.get("idx"), given.get("targets")
        if targets is None:
            raise LayoutError("context parallelism computes the language-model loss inside the model "
                              "(model(idx, targets)): this objective needs --parallel.cp=1")
        T = idx.shape[1]
        if T > block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {block_size}")
        key = (T, idx.device)
        if key not in cache:
            cache[key] = cp_positions(T, cp, cp_rank, idx.device)
        pos = cache[key]
        given.update(idx=idx.index_select(1, pos), targets=targets.index_select(1, pos), pos_ids=pos[None])
        return (given.pop("idx"), given.pop("targets")), given

    model.register_forward_pre_hook(shard_inputs, with_kwargs=True)
    for attn in _attention_modules(model):
        attn.forward = _ring_forward(attn.forward, ring)


def _ring_forward(forward, ring: _Ring):
    def run(*args, **kwargs):
        mode = _RingSDPA(ring)
        with mode:
            y = forward(*args, **kwargs)
        if mode.calls != 1:  # a model change that computes attention another way must not pass silently
            raise LayoutError(f"context parallelism expected one F.scaled_dot_product_attention call in "
                              f"an attention layer, saw {mode.calls}; use --parallel.cp=1 for this model")
        return y

    return run
