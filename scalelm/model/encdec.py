"""The encoder-decoder Transformer of "Attention Is All You Need", built from the GPT's blocks.

    src ─ tok_emb (+ positions) ─ encoder blocks (self-attention over the source, padding masked) ─ enc_norm ─┐
    tgt ─ tok_emb (+ positions) ─ decoder blocks (causal self-attention, cross-attention, MLP) ─ norm_f ─ lm_head

One shared vocabulary: the encoder's input embedding, the decoder's input embedding and the output
layer are one matrix (``tie_embeddings``, as in the paper). Attention goes through SDPA, the norms
and MLPs are the GPT's, positions are learned or RoPE (``pos_embedding``). All blocks live in one
``ModuleDict`` (``e0..``, ``d0..``) so activation checkpointing, compile and FSDP2 apply to them
from outside exactly as to a GPT's. Source padding is never attended: not in the encoder, not in
cross-attention (``src_valid``). Decoding keeps a self-attention KV cache and computes the
cross-attention keys/values of every layer once (:class:`Seq2SeqCache`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .gpt import MLP, Attention, Block, _autocast_once, encdec_flops_per_token, gpt2_init_, make_norm, rope_tables
from .kv_cache import LayerKVCache, PreallocatedKVCache
from .loss import IGNORE_INDEX, cross_entropy


def n_enc(cfg: ModelConfig) -> int:
    return cfg.n_encoder_layer or cfg.n_layer


def n_dec(cfg: ModelConfig) -> int:
    return cfg.n_decoder_layer or cfg.n_layer


class CrossAttention(nn.Module):
    """Queries from the decoder, keys/values from the encoder's output (computed once per source)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.gqa = cfg.kv_heads != cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = memory.shape
        k = self.k_proj(memory).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(B, S, -1, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x, kv: tuple[torch.Tensor, torch.Tensor], src_mask: Optional[torch.Tensor]):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k, v = kv
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=src_mask,
                                           dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.cross_norm = make_norm(cfg)
        self.cross = CrossAttention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory, src_mask, rope=None, kv_cache: Optional[LayerKVCache] = None, layer: int = 0,
                cross_kv=None):
        x = x + self.drop(self.attn(_autocast_once(self.attn_norm(x)), rope, kv_cache, layer))
        kv = cross_kv if cross_kv is not None else self.cross.kv(memory)
        x = x + self.drop(self.cross(_autocast_once(self.cross_norm(x)), kv, src_mask))
        return x + self.drop(self.mlp(_autocast_once(self.mlp_norm(x))))


def source_mask(src_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, S) bool -> (B, 1, 1, S): every query may see every real source token, no padding."""
    return None if src_valid is None else src_valid[:, None, None, :]


class Seq2SeqCache(PreallocatedKVCache):
    """The decoder's self-attention cache plus, per layer, the cross-attention keys/values of
    the encoded source and its padding mask (computed once, reordered with the beams). A
    :class:`~scalelm.model.kv_cache.GeneratorKVCache`, so ``Generator``'s decoding and beam
    search drive it as they drive the GPT's."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: Optional[int] = None, device=None,
                 dtype=torch.float32):
        super().__init__(dataclasses.replace(cfg, n_layer=n_dec(cfg)), batch_size, max_len, device, dtype)
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.src_mask: Optional[torch.Tensor] = None

    def index_rows(self, order: torch.Tensor) -> None:
        super().index_rows(order)
        self.cross = [(k.index_select(0, order), v.index_select(0, order)) for k, v in self.cross]
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, order)


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_embedding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({f"e{i}": Block(cfg) for i in range(n_enc(cfg))})
        self.blocks.update({f"d{i}": DecoderBlock(cfg) for i in range(n_dec(cfg))})
        self.enc_norm = make_norm(cfg)
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_embedding == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gpt2_init_(self, self.cfg, n_enc(self.cfg) + n_dec(self.cfg))

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    # ------------------------------------------------------------------ pieces
    def _embed(self, idx: torch.Tensor, pos_ids: torch.Tensor):
        h = self.tok_emb(idx)
        if self.pos_emb is not None:
            h = h + self.pos_emb(pos_ids)
        rope = None
        if self.cfg.pos_embedding == "rope":
            rope = (self.rope_cos[pos_ids][:, None], self.rope_sin[pos_ids][:, None])
        return self.drop(h), rope

    def _check_len(self, T: int, what: str) -> None:
        if T > self.cfg.block_size:
            raise ValueError(f"{what} of {T} tokens exceeds block_size {self.cfg.block_size}")

    def encode(self, src: torch.Tensor, src_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S) source ids (right-padded; ``src_valid`` marks real tokens) -> (B, S, n_embd)."""
        self._check_len(src.shape[1], "a source")
        h, rope = self._embed(src, torch.arange(src.shape[1], device=src.device)[None])
        mask = source_mask(src_valid)
        for i in range(n_enc(self.cfg)):
            # a bool mask makes SDPA non-causal: the encoder sees the whole source
            m = mask if mask is not None else torch.ones(1, 1, 1, src.shape[1], dtype=torch.bool, device=src.device)
            h = self.blocks[f"e{i}"](h, rope, None, i, m)
        return self.enc_norm(h)

    def decode(self, tgt: torch.Tensor, memory: Optional[torch.Tensor], src_valid: Optional[torch.Tensor] = None,
               kv_cache: Optional[Seq2SeqCache] = None) -> torch.Tensor:
        """Decoder hidden states after the final norm; with ``kv_cache``, incremental."""
        T = tgt.shape[1]
        if kv_cache is not None:
            pos_ids = kv_cache.prepare(T)
            src_mask = kv_cache.src_mask
        else:
            self._check_len(T, "a target")
            pos_ids = torch.arange(T, device=tgt.device)[None]
            src_mask = source_mask(src_valid)
        h, rope = self._embed(tgt, pos_ids)
        for i in range(n_dec(self.cfg)):
            cross = kv_cache.cross[i] if kv_cache is not None else None
            h = self.blocks[f"d{i}"](h, memory, src_mask, rope, kv_cache, i, cross)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm_f(h)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                src_valid: Optional[torch.Tensor] = None, label_smoothing: float = 0.0):
        """Teacher forcing: logits for every target position, and the mean cross-entropy over
        targets that are not ``IGNORE_INDEX`` (with optional label smoothing)."""
        logits = self.lm_head(self.decode(tgt, self.encode(src, src_valid), src_valid))
        loss = None
        if targets is not None:
            if label_smoothing > 0:
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                       label_smoothing=label_smoothing)
            else:
                loss = cross_entropy(logits, targets)
        return logits, loss

    # ------------------------------------------------------------------ cached decoding
    def start(self, src: torch.Tensor, src_valid: Optional[torch.Tensor], max_len: int, dtype=None) -> Seq2SeqCache:
        """Encode once and return a decoding cache holding every layer's cross-attention k/v."""
        memory = self.encode(src, src_valid)
        cache = Seq2SeqCache(self.cfg, src.shape[0], max_len=max_len, device=src.device,
                             dtype=dtype or memory.dtype)
        cache.cross = [self.blocks[f"d{i}"].cross.kv(memory) for i in range(n_dec(self.cfg))]
        cache.src_mask = source_mask(src_valid)
        return cache

    def step(self, tgt: torch.Tensor, cache: Seq2SeqCache, last_only: bool = True) -> torch.Tensor:
        h = self.decode(tgt, None, kv_cache=cache)
        return self.lm_head(h[:, -1:] if last_only else h)


flops_per_token = encdec_flops_per_token  # (defined beside the GPT's count, which dispatches to it)
