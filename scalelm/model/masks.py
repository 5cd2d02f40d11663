"""Attention masks and position ids for batches that are not one plain causal sequence.

Each returns ``(attn_mask, pos_ids)`` for ``GPT(idx, attn_mask=..., pos_ids=...)``: a bool
mask ``(B, 1, T, T)`` (True = may attend), causal unless ``causal=False`` (an encoder's), and positions that count from 0 at
each sequence's first real token, so a padded or packed row computes exactly what the
sequence alone would. A query that may see nothing (padding) sees itself: a fully masked row
would give NaN on some kernels.

A model with ``sliding_window`` narrows these masks to the window in its local layers
(:func:`window_mask`, applied inside ``Attention``); KV caches build the same band for their slots.
"""

from __future__ import annotations

import torch


def _finish(allowed: torch.Tensor) -> torch.Tensor:
    T = allowed.shape[-1]
    own = torch.eye(T, dtype=torch.bool, device=allowed.device)
    return (allowed | own)[:, None]


def _order(T: int, causal: bool, device) -> torch.Tensor:
    full = torch.ones(T, T, dtype=torch.bool, device=device)
    return full.tril() if causal else full


def padding_mask(valid: torch.Tensor, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``valid``: (B, T) bool, True at real tokens (left or right padding, or both)."""
    B, T = valid.shape
    allowed = _order(T, causal, valid.device)[None] & valid[:, None, :] & valid[:, :, None]
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    return _finish(allowed), pos


def document_mask(doc_ids: torch.Tensor, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``doc_ids``: (B, T) ints, the example each position belongs to (packing several short
    examples in one window); attention never crosses examples and positions restart at each.
    Padding can be given its own id (it then attends only within itself). ``causal=False``: the
    block-diagonal mask of packed encoder inputs, each document seeing all of itself."""
    B, T = doc_ids.shape
    same = doc_ids[:, None, :] == doc_ids[:, :, None]
    allowed = _order(T, causal, doc_ids.device)[None] & same
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values  # each position's example start
    return _finish(allowed), idx - first


def window_mask(q_slot: torch.Tensor, k_slot: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding-window attention (``model.sliding_window``) as Hugging Face masks it: a query
    at slot q sees the keys at slots q - window < k <= q, itself and the window - 1 before it.
    ``q_slot`` (..., T), ``k_slot`` (S,) -> bool (..., T, S), True = may attend. Slots, not position
    ids: in a left-padded or packed row they differ by a constant per example, and across examples
    the padding or document mask already forbids attention."""
    d = q_slot[..., :, None] - k_slot
    return (d >= 0) & (d < window)


def bidirectional_window_mask(q_slot: torch.Tensor, k_slot: torch.Tensor, window: int) -> torch.Tensor:
    """An encoder's sliding window (ModernBERT's local attention, ``local_attention = window``): a query
    sees the keys at most ``window // 2`` slots away on either side, as Hugging Face masks it. Shapes
    as :func:`window_mask`'s."""
    return (q_slot[..., :, None] - k_slot).abs() <= window // 2
