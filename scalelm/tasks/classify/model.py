"""``Classifier``: a GPT (still a language model) or an encoder with a linear head on a pooled hidden state.

The backbone is unchanged (its ``lm_head`` stays, so the fine-tuned weights are still an LM that
generate/eval/convert read); the head reads ``hidden_states``. Padded batches get a
:func:`~scalelm.model.masks.padding_mask`, whose positions count from each text's first real
token, so a text gives the same logits alone, right-padded or left-padded. An encoder reads
right-padded batches with its padding masked as keys (bidirectional), and may pool its first
token (``--pooling first``: BERT's ``[CLS]``, through BERT's pooler) or the mean.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...model.gpt import GPT
from ...model.masks import padding_mask

POOLINGS = ("last", "mean", "first")


def hidden_states(backbone: nn.Module, idx: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, T, C)`` of a padded batch: a GPT reads it through :func:`padding_mask` (causal, positions
    from each text's first real token); an encoder (``cfg.arch == "encoder"``) attends both ways
    over the real tokens (padding on the right: positions count from slot 0, as Hugging Face's)."""
    if valid is None:
        return backbone.hidden_states(idx)
    if getattr(backbone.cfg, "arch", "gpt") == "encoder":
        return backbone.hidden_states(idx, attn_mask=valid)
    mask, pos = padding_mask(valid)
    return backbone.hidden_states(idx, pos_ids=pos, attn_mask=mask)


def freeze_lm_head(backbone: nn.Module) -> None:
    """The LM head (an encoder's masked-LM head too: dense, norm, bias) is frozen: a task head does
    not train it, and DDP would find it unused. A tied weight is the embedding, which trains."""
    emb = getattr(getattr(backbone, "tok_emb", None), "weight", None)
    for name in ("lm_head", "head_dense", "head_norm"):
        module = getattr(backbone, name, None)
        for p in module.parameters() if module is not None else ():
            if p is not emb:
                p.requires_grad_(False)


def pool(h: torch.Tensor, valid: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C): the last real token's, the first's, or the mean over real tokens."""
    if valid is None:
        return h[:, -1] if how == "last" else h[:, 0] if how == "first" else h.mean(1)
    if how == "first":  # the leftmost real position (an encoder's [CLS])
        return h[torch.arange(h.shape[0], device=h.device), valid.long().argmax(1)]
    if how == "last":  # the rightmost real position: works for left, right or no padding
        pos = torch.arange(h.shape[1], device=h.device)
        last = (valid.long() * pos).argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    w = valid.to(h.dtype)[..., None]
    return (h * w).sum(1) / w.sum(1).clamp(min=1)


class PoolerHead(nn.Module):
    """BERT's sequence-classification head: the pooler (``pool``: dense + tanh on the first token)
    and the classifier (``out``, with a bias): ``BertForSequenceClassification``'s, tensor for tensor."""

    def __init__(self, n_embd: int, n_labels: int, init_std: float):
        super().__init__()
        self.pool, self.out = nn.Linear(n_embd, n_embd), nn.Linear(n_embd, n_labels)
        for m in (self.pool, self.out):
            nn.init.normal_(m.weight, 0.0, init_std)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.pool(x)))


class TransformHead(nn.Module):
    """ModernBERT's classification head: dense, exact GELU, LayerNorm (``ModernBertPredictionHead``),
    then the classifier (``out``, with a bias): ``ModernBertFor{Sequence,Token}Classification``'s,
    tensor for tensor. The dense and the norm have biases when the encoder has them."""

    def __init__(self, cfg, n_labels: int):
        super().__init__()
        d = cfg.n_embd
        self.dense = nn.Linear(d, d, bias=cfg.bias)
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias)
        self.out = nn.Linear(d, n_labels)
        for m in (self.dense, self.out):
            nn.init.normal_(m.weight, 0.0, cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(F.gelu(self.dense(x))))


def modern_encoder(cfg) -> bool:
    """A pre-norm encoder (ModernBERT's shape), whose task heads are :class:`TransformHead` s."""
    return getattr(cfg, "arch", "gpt") == "encoder" and cfg.norm_placement == "pre"


class Classifier(nn.Module):
    """``gpt`` (the backbone: a GPT, or an encoder) + ``head``: ``nn.Linear(n_embd, n_labels,
    bias=False)`` like HF's ``score``; on a BERT-shaped encoder with first-token pooling BERT's pooler
    and classifier (:class:`PoolerHead`: ``BertForSequenceClassification``); on a ModernBERT-shaped
    one with first or mean pooling ModernBERT's head (:class:`TransformHead`).

    State-dict keys are ``gpt.*`` and ``head.*``. An untied LM head is frozen: classification
    does not train it (and DDP would find it unused)."""

    def __init__(self, gpt: GPT, n_labels: int, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.gpt, self.pooling, self.n_labels = gpt, pooling, n_labels
        if modern_encoder(gpt.cfg) and pooling in ("first", "mean"):
            self.head = TransformHead(gpt.cfg, n_labels)
        elif pooling == "first" and getattr(gpt.cfg, "arch", "gpt") == "encoder":
            self.head = PoolerHead(gpt.cfg.n_embd, n_labels, gpt.cfg.init_std)
        else:
            self.head = nn.Linear(gpt.cfg.n_embd, n_labels, bias=False)
            nn.init.normal_(self.head.weight, 0.0, gpt.cfg.init_std)
        freeze_lm_head(gpt)

    @property
    def cfg(self):
        return self.gpt.cfg

    def forward(self, idx: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``idx`` (B, T) token ids, ``valid`` (B, T) bool (True at real tokens; None: no padding)
        -> logits (B, n_labels)."""
        if valid is not None and bool(valid.all()):
            valid = None  # no padding in this batch: the plain path
        return self.head(pool(hidden_states(self.gpt, idx, valid), valid, self.pooling))
