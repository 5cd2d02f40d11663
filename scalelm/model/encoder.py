"""The encoder-only Transformer (``arch = "encoder"``): BERT and ModernBERT, built from the GPT's blocks.

    idx ─ tok_emb (+ learned positions) (+ token types) ─ emb_norm ─ blocks (bidirectional) ─ [norm_f] ─ h
    h[masked rows] ─ head_dense ─ GELU ─ head_norm ─ lm_head (tied to tok_emb, with a bias) ─ logits

Two configurations of the one class:

* BERT (``norm_placement = "post_add"``, ``pos_embedding = "learned"``, ``mlp = "gelu"``, ``gelu =
  "erf"``, ``type_vocab_size = 2``, biases): each sub-layer's norm sits after its residual add, so the
  last block's output is already normalised and there is no final norm (``norm_f`` is None).
* ModernBERT (``norm_placement = "pre"``, RoPE, GeGLU with the exact GELU, no biases): the embedding
  norm doubles as layer 0's attention norm (which is therefore absent, as in ModernBERT), and a final
  norm closes the stack. Its local layers (``sliding_window``: a query sees the keys at most
  ``sliding_window // 2`` away on either side; layer i global when ``i % sliding_window_pattern == 0``)
  take their own RoPE base (``rope_local_theta``).

The blocks are the GPT's ``Block`` (its ``Attention`` is non-causal for ``arch = "encoder"``); a padding
or packed-document mask is a bool mask over keys (:mod:`scalelm.model.masks`, ``causal=False``). The
masked-LM head runs on the rows that are asked for: ``forward(idx, targets)`` gathers the hidden states
at the positions whose target is not ``IGNORE_INDEX`` and computes the head and the loss there only
(about 15% of a batch under masked-LM training), never full-vocabulary logits at every position.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .gpt import MLM_FRACTION, Block, encoder_flops_per_token, gpt2_init_, make_norm, rope_tables
from .loss import IGNORE_INDEX, cross_entropy
from .masks import document_mask

__all__ = ["MLM_FRACTION", "Encoder", "encoder_flops_per_token"]


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.arch != "encoder":
            raise ValueError(f"Encoder needs model.arch='encoder', got {cfg.arch!r}")
        self.cfg = cfg
        d = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.block_size, d) if cfg.pos_embedding == "learned" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.layer_keys = [str(i) for i in range(cfg.n_layer)]  # the GPT's layout (parallelize walks it)
        self.blocks = nn.ModuleDict({k: Block(cfg, i) for i, k in enumerate(self.layer_keys)})
        if cfg.norm_placement == "pre":  # the embedding norm already normalises layer 0's input (ModernBERT)
            self.blocks["0"].attn_norm = None
        self.norm_f: Optional[nn.Module] = make_norm(cfg) if cfg.norm_placement == "pre" else None
        # BERT's prediction-head transform (ModernBERT's head): dense, GELU, norm; then the tied decoder
        self.head_dense = nn.Linear(d, d, bias=cfg.bias)
        self.head_norm = make_norm(cfg)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_embedding == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.rope_local_theta is not None:  # ModernBERT: the local layers' own RoPE base
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_local_theta)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)
        self._gelu = "tanh" if cfg.gelu == "tanh" else "none"
        self.reset_parameters()

    # ------------------------------------------------------------------ init and counts
    def reset_parameters(self) -> None:
        gpt2_init_(self, self.cfg, self.cfg.n_layer)

    def num_params(self, embeddings: bool = True) -> int:
        """Unique parameters; without embeddings drops the token, position and token-type tables."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= sum(e.weight.numel() for e in (self.tok_emb, self.pos_emb, self.type_emb) if e is not None)
        return n

    def flops_per_token(self, seq_len: Optional[int] = None, training: bool = True) -> int:
        return encoder_flops_per_token(self.cfg, seq_len, training)

    # ------------------------------------------------------------------ forward
    def _mask(self, attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """SDPA's bool mask (True = may attend) from (B, T) real-token flags (HF's ``attention_mask``),
        a (B, 1, T|1, T) bool mask, or an additive one (0 where allowed, very negative where not)."""
        if attn_mask is None:
            return None
        if attn_mask.dim() == 2:  # which keys are real: every query may see those (padding masked)
            return attn_mask.bool()[:, None, None, :]
        if attn_mask.dtype != torch.bool:
            return attn_mask > torch.finfo(attn_mask.dtype).min / 2
        return attn_mask

    def hidden_states(self, idx: torch.Tensor, *, pos_ids: Optional[torch.Tensor] = None,
                      attn_mask: Optional[torch.Tensor] = None,
                      token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final hidden states ``(B, T, n_embd)`` of token ids ``(B, T)``, every position seeing every
        other that ``attn_mask`` allows (all of them without one)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        if pos_ids is None:
            pos_ids = torch.arange(T, device=idx.device)[None]
        h = self.tok_emb(idx)
        if self.pos_emb is not None:
            h = h + self.pos_emb(pos_ids)
        if self.type_emb is not None:  # BERT adds type 0 when no types are given
            h = h + (self.type_emb(token_type_ids) if token_type_ids is not None else self.type_emb.weight[0])
        h = self.drop(self.emb_norm(h))
        ropes = (None, None)  # (global, local) layers' RoPE (cos, sin) at pos_ids
        if self.cfg.pos_embedding == "rope":
            rope = (self.rope_cos[pos_ids][:, None], self.rope_sin[pos_ids][:, None])
            ropes = (rope, rope if self.cfg.rope_local_theta is None else
                     (self.rope_local_cos[pos_ids][:, None], self.rope_local_sin[pos_ids][:, None]))
        mask = self._mask(attn_mask)
        for i, key in enumerate(self.layer_keys):
            rope = ropes[self.cfg.layer_window(i) is not None]
            h = self.blocks[key](h, rope, None, i) if mask is None else self.blocks[key](h, rope, None, i, mask)
        return h if self.norm_f is None else self.norm_f(h)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The masked-LM head on hidden states ``(..., n_embd)`` -> ``(..., vocab_size)``."""
        return self.lm_head(self.head_norm(F.gelu(self.head_dense(h), approximate=self._gelu)))

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                pos_ids: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None):
        """Without ``targets``: ``(logits (B, T, vocab), None)``. With ``targets`` (B, T), ``IGNORE_INDEX``
        everywhere but the positions to predict: ``(logits (N, vocab), loss)`` over those N positions
        only, in row-major order (the head never sees the others). ``doc_ids`` (B, T): packed documents,
        each attending only within itself, positions restarting at each (replaces attn_mask/pos_ids)."""
        if doc_ids is not None:
            attn_mask, pos_ids = document_mask(doc_ids, causal=False)
        h = self.hidden_states(idx, pos_ids=pos_ids, attn_mask=attn_mask, token_type_ids=token_type_ids)
        if targets is None:
            return self.head_logits(h), None
        flat = targets.reshape(-1)
        rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        logits = self.head_logits(h.reshape(-1, h.shape[-1]).index_select(0, rows))
        if rows.numel() == 0:  # nothing to predict: a zero loss that still reaches every parameter
            return logits, (h.sum() + self.head_logits(h[:1, :1]).sum()) * 0.0
        return logits, cross_entropy(logits, flat.index_select(0, rows))

