"""``Classifier``: a GPT (still a language model) with a linear head on a pooled hidden state.

The GPT is unchanged (its ``lm_head`` stays, so the fine-tuned weights are still an LM that
generate/eval/convert read); the head reads :meth:`GPT.hidden_states`. Padded batches get a
:func:`~scalelm.model.masks.padding_mask`, whose positions count from each text's first real
token, so a text gives the same logits alone, right-padded or left-padded.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...model.gpt import GPT
from ...model.masks import padding_mask

POOLINGS = ("last", "mean")


def pool(h: torch.Tensor, valid: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C): the last real token's, or the mean over real tokens."""
    if valid is None:
        return h[:, -1] if how == "last" else h.mean(1)
    if how == "last":  # the rightmost real position: works for left, right or no padding
        pos = torch.arange(h.shape[1], device=h.device)
        last = (valid.long() * pos).argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    w = valid.to(h.dtype)[..., None]
    return (h * w).sum(1) / w.sum(1).clamp(min=1)


class Classifier(nn.Module):
    """``gpt`` + ``head`` (``nn.Linear(n_embd, n_labels, bias=False)``, like HF's ``score``).

    State-dict keys are ``gpt.*`` and ``head.*``. An untied LM head is frozen: classification
    does not train it (and DDP would find it unused)."""

    def __init__(self, gpt: GPT, n_labels: int, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.gpt, self.pooling, self.n_labels = gpt, pooling, n_labels
        self.head = nn.Linear(gpt.cfg.n_embd, n_labels, bias=False)
        nn.init.normal_(self.head.weight, 0.0, gpt.cfg.init_std)
        if gpt.lm_head is not None and not gpt.cfg.tie_embeddings:
            gpt.lm_head.weight.requires_grad_(False)

    @property
    def cfg(self):
        return self.gpt.cfg

    def forward(self, idx: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``idx`` (B, T) token ids, ``valid`` (B, T) bool (True at real tokens; None: no padding)
        -> logits (B, n_labels)."""
        if valid is not None and bool(valid.all()):
            valid = None  # no padding in this batch: the plain causal path
        if valid is None:
            h = self.gpt.hidden_states(idx)
        else:
            mask, pos = padding_mask(valid)
            h = self.gpt.hidden_states(idx, pos_ids=pos, attn_mask=mask)
        return self.head(pool(h, valid, self.pooling))
