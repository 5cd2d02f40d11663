"""``Tagger``: a GPT or an encoder with a linear head on every position's hidden state.

The backbone is unchanged (a GPT stays a language model that generate/eval/convert read; an
encoder keeps its masked-LM head, frozen); the head reads ``hidden_states``, through the same
padding masks as the classifier's (:func:`scalelm.tasks.classify.model.hidden_states`). A GPT is
causal, so position t's tag is predicted from the words up to t only (the first subword of a
word sees that word's start and everything to its left, never what follows); an encoder's
every position sees the whole window. The head is a linear layer with a bias, like Hugging Face's
``*ForTokenClassification`` heads (``classifier`` / ``score``); on a ModernBERT-shaped (pre-norm)
encoder it is ModernBERT's (dense, GELU, norm, then the classifier), as
``ModernBertForTokenClassification`` has it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..classify.model import TransformHead, freeze_lm_head, hidden_states, modern_encoder


class Tagger(nn.Module):
    """``gpt`` (the backbone: a GPT or an Encoder; named as the classifier's, so state-dict keys,
    LoRA and the Trainer treat both alike) + ``head`` (``nn.Linear(n_embd, n_labels)``, or a
    :class:`~scalelm.tasks.classify.model.TransformHead`)."""

    def __init__(self, backbone: nn.Module, n_labels: int):
        super().__init__()
        self.gpt, self.n_labels = backbone, n_labels
        if modern_encoder(backbone.cfg):  # ModernBERT's head: dense, GELU, norm, then the classifier
            self.head = TransformHead(backbone.cfg, n_labels)
        else:
            self.head = nn.Linear(backbone.cfg.n_embd, n_labels)
            nn.init.normal_(self.head.weight, 0.0, backbone.cfg.init_std)
            nn.init.zeros_(self.head.bias)
        freeze_lm_head(backbone)

    @property
    def cfg(self):
        return self.gpt.cfg

    def forward(self, idx: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``idx`` (B, T) token ids, ``valid`` (B, T) bool (True at real tokens; None: no padding)
        -> logits (B, T, n_labels)."""
        if valid is not None and bool(valid.all()):
            valid = None
        return self.head(hidden_states(self.gpt, idx, valid))
