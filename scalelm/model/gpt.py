"""The GPT model family: one single-device ``nn.Module``, no distributed code inside.

GPT-2 style (learned positions, LayerNorm, GELU, biases) and Llama style (RoPE, RMSNorm,
SwiGLU, no biases, grouped-query attention) are the same class with different configs, and so are
Llama 3.x's scaled RoPE (``rope_scaling``), Qwen2's q/k/v-only biases (``qkv_bias``) and Qwen3's
per-head q/k norms (``qk_norm``).
Parallelism (DDP, FSDP2, TP, PP), compile and activation checkpointing are applied from
outside (see ``scalelm.distributed``); pipeline stages are made by deleting modules, so
every top-level piece may be ``None`` and blocks live in a ``ModuleDict`` keyed by layer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .kv_cache import LayerKVCache
from .loss import IGNORE_INDEX, cross_entropy  # noqa: F401  (IGNORE_INDEX is re-exported)


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for numerically sensitive steps (fp64 stays fp64, e.g. in exactness tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _autocast_once(h: torch.Tensor) -> torch.Tensor:
    """Under autocast, cast a norm's fp32 output to the autocast dtype once, here, instead of
    once in every linear that reads it (q, k, v; gate, up): the same forward values, fewer casts
    and copies kept for backward (3-13% faster bf16 steps on CPU). The gradients of those
    linears' inputs are then summed in bf16 before the upcast: another rounding, no further
    from fp32 gradients than autocast's own (tests/model/test_fast_paths.py)."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev) and h.dtype == torch.float32:
        return h.to(torch.get_autocast_dtype(dev))
    return h


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FUSED_RMS is not None and x.dtype != torch.float64 and type(x) is torch.Tensor:
            # one kernel with fp32 math inside: bit-identical to the upcast path below on CPU,
            # without its copies (the composite path is several kernels)
            return _FUSED_RMS(x, [x.shape[-1]], self.weight, self.eps)[0]
        # F.rms_norm normalises in the input dtype; upcast so bf16 matches the fp32 reference
        return F.rms_norm(_up(x), (x.shape[-1],), _up(self.weight), self.eps).type_as(x)


_FUSED_RMS = getattr(torch.ops.aten, "_fused_rms_norm", None)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def scale_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """RoPE frequencies under ``cfg.rope_scaling``, as HF's ``rope_parameters`` compute them.

    ``linear`` divides every frequency by the factor (position interpolation). ``llama3`` (Llama
    3.1/3.2) divides only the low frequencies, whose wavelengths exceed the pre-training context /
    low_freq_factor, keeps the high ones (wavelength < context / high_freq_factor), and blends
    linearly between: local order stays sharp while long-range positions stretch."""
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling != "llama3":
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    ctx = cfg.rope_original_block_size
    wavelen = 2 * math.pi / inv_freq
    smooth = ((ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: low band, 1: high band
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_tables(head_dim: int, length: int, theta: float,
                cfg: Optional[ModelConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) in the rotate-half layout used by HF Llama; with ``cfg``,
    its ``rope_scaling`` applies (see :func:`scale_inv_freq`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if cfg is not None:
        inv_freq = scale_inv_freq(inv_freq, cfg)
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B or 1, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (_up(x) * cos + _up(rotated) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias  # Qwen2: biases on q/k/v, none on o
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        # Qwen3: one RMSNorm (weights shared by all heads) over each head's q and k, before RoPE
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, kv_cache: Optional[LayerKVCache] = None, layer: int = 0,
                mask: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        # -1 instead of n_head: under tensor parallelism each rank sees only its local heads
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:  # it stores k, v in its own dtype; attention runs in the input's
            k, v, mask = kv_cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        gqa = self.n_kv_head != self.n_head  # from the config, not shapes: static under compile
        causal = True if mask is None and T > 1 else False  # a Python bool even when T is symbolic
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias) if self.swiglu else None
        self.down = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, kv_cache: Optional[LayerKVCache] = None, layer: int = 0,
                mask: Optional[torch.Tensor] = None):
        h = _autocast_once(self.attn_norm(x))
        # the mask only when there is one: tensor parallelism's input plan names four inputs
        h = self.attn(h, rope, kv_cache, layer) if mask is None else self.attn(h, rope, kv_cache, layer, mask)
        x = x + self.drop(h)
        return x + self.drop(self.mlp(_autocast_once(self.mlp_norm(x))))


def gpt2_init_(model: nn.Module, cfg: ModelConfig, depth: int) -> None:
    """GPT-2 init: N(0, init_std), residual projections scaled by 1/sqrt(2 * depth); RoPE tables
    recomputed (they are buffers: e.g. after meta-device init)."""
    std = cfg.init_std
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * depth))
        else:
            nn.init.normal_(p, 0.0, std)
    if cfg.pos_embedding == "rope":
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb: Optional[nn.Embedding] = (
            nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_embedding == "learned" else None)
        self.drop = nn.Dropout(cfg.dropout)
        # layer i runs block layer_keys[i]; with sharing, several layers run the same block
        k = cfg.n_shared_blocks or cfg.n_layer
        self.layer_keys = [str(i % k) for i in range(cfg.n_layer)]
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(k)})
        self.norm_f: Optional[nn.Module] = make_norm(cfg)
        self.lm_head: Optional[nn.Linear] = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_embedding == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------ init and counts
    def reset_parameters(self) -> None:
        gpt2_init_(self, self.cfg, self.cfg.n_layer)

    def num_params(self, embeddings: bool = True) -> int:
        """Unique parameters; without embeddings drops token/position tables (not an untied head)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel() if self.tok_emb is not None else 0
            n -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        return n

    def flops_per_token(self, seq_len: Optional[int] = None, training: bool = True) -> int:
        return flops_per_token(self.cfg, seq_len, training)

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                kv_cache: Optional[LayerKVCache] = None, pos_ids: Optional[torch.Tensor] = None,
                last_only: bool = False, attn_mask: Optional[torch.Tensor] = None):
        """idx: (B, T) token ids (or hidden states on a later pipeline stage).

        Returns ``(logits, loss)``; loss is the mean cross-entropy over targets that are not
        ``IGNORE_INDEX`` (None without targets). ``last_only`` returns logits of the last
        position only, which is all that sampling needs. ``attn_mask`` (bool, ``(B, 1, T, T)``,
        True = may attend; see :mod:`scalelm.model.masks`) replaces the causal mask, e.g. for
        padding or packed examples, with ``pos_ids`` to match.
        """
        h = self.hidden_states(idx, kv_cache=kv_cache, pos_ids=pos_ids, attn_mask=attn_mask)
        if self.lm_head is None:
            return h, None
        if last_only and targets is None:
            h = h[:, -1:]
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits, targets)  # fp32, chunked: see scalelm/loss.py
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, *, kv_cache: Optional[LayerKVCache] = None,
                      pos_ids: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None):
        """The last block's output after the final norm, ``(B, T, n_embd)`` (what the LM head and a
        task head read); on a pipeline stage without the head, that stage's raw output."""
        if self.tok_emb is not None:
            B, T = idx.shape
            h = self.tok_emb(idx)
        else:
            B, T = idx.shape[:2]
            h = idx
        if kv_cache is not None:
            pos_ids = kv_cache.prepare(T)
        elif pos_ids is None:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
            pos_ids = torch.arange(T, device=h.device)[None]
        if self.pos_emb is not None and self.tok_emb is not None:
            h = h + self.pos_emb(pos_ids)
        rope = None
        if self.cfg.pos_embedding == "rope":
            rope = (self.rope_cos[pos_ids][:, None], self.rope_sin[pos_ids][:, None])
        h = self.drop(h) if self.tok_emb is not None else h
        for i, key in enumerate(self.layer_keys):
            if key in self.blocks:  # a pipeline stage holds only some layers
                h = self.blocks[key](h, rope, kv_cache, i, attn_mask) if attn_mask is not None \
                    else self.blocks[key](h, rope, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        if self.lm_head is None:
            return h
        return self.norm_f(h)


def flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None, training: bool = True) -> int:
    """Matmul FLOPs per token (PaLM appendix B): 2 per weight per token forward, plus attention
    scores and values (2 * 2 * n_layer * T * d_attn forward, full T as in PaLM/nanoGPT).
    Training is 3x forward (backward costs twice the forward)."""
    T = seq_len or cfg.block_size
    if cfg.arch == "encoder-decoder":
        return encdec_flops_per_token(cfg, T, training)
    d, L, hd = cfg.n_embd, cfg.n_layer, cfg.head_dim
    attn_w = d * hd * (cfg.n_head * 2 + cfg.kv_heads * 2)  # q, o and k, v projections
    mlp_w = d * cfg.ffn_dim * (3 if cfg.mlp == "swiglu" else 2)
    head_w = d * cfg.vocab_size
    fwd = 2 * (L * (attn_w + mlp_w) + head_w) + 2 * 2 * L * T * cfg.n_head * hd
    return 3 * fwd if training else fwd


def encdec_flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None, training: bool = True) -> int:
    """The same count for ``arch = "encoder-decoder"`` (scalelm/model/encdec.py), per target token,
    taking the source as long as the target: encoder layers, decoder layers with cross-attention
    (q/o on the target, k/v on the source), the output layer."""
    T = seq_len or cfg.block_size
    d, hd = cfg.n_embd, cfg.head_dim
    attn_w = d * hd * (cfg.n_head * 2 + cfg.kv_heads * 2)
    mlp_w = d * cfg.ffn_dim * (3 if cfg.mlp == "swiglu" else 2)
    n_enc, n_dec = cfg.n_encoder_layer or cfg.n_layer, cfg.n_decoder_layer or cfg.n_layer
    enc = n_enc * (2 * (attn_w + mlp_w) + 4 * T * cfg.n_head * hd)
    dec = n_dec * (2 * (2 * attn_w + mlp_w) + 2 * 4 * T * cfg.n_head * hd)
    fwd = enc + dec + 2 * d * cfg.vocab_size
    return 3 * fwd if training else fwd
