"""The GPT model family: one single-device ``nn.Module``, no distributed code inside.

GPT-2 style (learned positions, LayerNorm, GELU, biases) and Llama style (RoPE, RMSNorm,
SwiGLU, no biases, grouped-query attention) are the same class with different configs, and so are
Llama 3.x's scaled RoPE (``rope_scaling``), Qwen2's q/k/v-only biases (``qkv_bias``), Qwen3's
per-head q/k norms (``qk_norm``), OLMo 2's norms after each sub-layer and over the whole q/k
projections (``norm_placement``, ``qk_norm_scope``) and Gemma 2/3's sandwich norms, (1 + w) RMSNorm,
GeGLU, scaled embeddings, attention scale, soft-capping and local-layer RoPE (``norm_unit_offset``,
``mlp="geglu"``, ``embed_scale``, ``attn_scalar``, ``attn_softcap``, ``logit_softcap``,
``rope_local_theta``), and Mistral's, Phi-3's and Gemma's sliding-window attention (``sliding_window``,
``sliding_window_pattern``: each Attention is built knowing its layer's window, see ``layer_is_local``).
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
from .masks import bidirectional_window_mask, window_mask


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
    """RMSNorm; with ``unit_offset`` (Gemma) it scales by ``1 + weight``, computed in fp32 as HF does."""

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:
            return F.rms_norm(_up(x), (x.shape[-1],), 1.0 + _up(self.weight), self.eps).type_as(x)
        if _FUSED_RMS is not None and x.dtype != torch.float64 and type(x) is torch.Tensor:
            # one kernel with fp32 math inside: bit-identical to the upcast path below on CPU,
            # without its copies (the composite path is several kernels)
            return _FUSED_RMS(x, [x.shape[-1]], self.weight, self.eps)[0]
        # F.rms_norm normalises in the input dtype; upcast so bf16 matches the fp32 reference
        return F.rms_norm(_up(x), (x.shape[-1],), _up(self.weight), self.eps).type_as(x)


_FUSED_RMS = getattr(torch.ops.aten, "_fused_rms_norm", None)


def make_norm(cfg: ModelConfig, dim: Optional[int] = None) -> nn.Module:
    """The model's norm over ``dim`` features (default ``n_embd``)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim or cfg.n_embd, cfg.norm_eps, cfg.norm_unit_offset)
    return nn.LayerNorm(dim or cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's soft-capping): about x near 0, never beyond +-cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
           dropout_p: float, gqa: bool, scale: Optional[float] = None, cap: Optional[float] = None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H or kv heads, S, D), with SDPA's arguments (``mask``
    bool, True = may attend; ``causal`` only without a mask). ``cap`` soft-caps the scores, which SDPA
    cannot: then the scores are computed here, as HF's eager attention does (scale, cap, mask, softmax
    in fp32), with the same masks."""
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                              enable_gqa=gqa, scale=scale)
    if gqa:  # each kv head serves the consecutive query heads of its group, as SDPA's enable_gqa
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = softcap((q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale), cap)
    if causal:  # bottom-right aligned, as SDPA's is_causal when there are more keys than queries
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:  # every query may see at least itself: no row is all -inf
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


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


def layer_is_local(cfg: ModelConfig, layer: int) -> bool:
    """Whether layer ``layer`` attends within a sliding window (``cfg.layer_window``), not to everything."""
    return cfg.layer_window(layer) is not None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        # this layer's sliding window (None: full attention). Without a cache the band is built
        # here, from the sequence length; a KV cache returns it for its own slots (kv_cache.py)
        self.window = cfg.layer_window(layer)
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias  # Qwen2: biases on q/k/v, none on o
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        # Qwen3, Gemma 3: one RMSNorm (weights shared by all heads) over each head's q and k, before
        # RoPE; OLMo 2 (qk_norm_scope=all): one over the whole q and k projections, before the heads split
        self.qk_norm_all = cfg.qk_norm and cfg.qk_norm_scope == "all"
        q_dim, k_dim = ((cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim) if self.qk_norm_all
                        else (cfg.head_dim, cfg.head_dim))
        self.q_norm = make_norm(cfg, q_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, k_dim) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.scale = None if cfg.attn_scalar is None else cfg.attn_scalar ** -0.5  # None: SDPA's 1/sqrt(head_dim)
        self.softcap = cfg.attn_softcap
        self.causal = cfg.arch != "encoder"  # an encoder's queries see every key its mask allows

    def forward(self, x, rope=None, kv_cache: Optional[LayerKVCache] = None, layer: int = 0,
                mask: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm_all:
            q, k = self.q_norm(q), self.k_norm(k)
        # -1 instead of n_head: under tensor parallelism each rank sees only its local heads
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and not self.qk_norm_all:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:  # it stores k, v in its own dtype; attention runs in the input's
            k, v, mask = kv_cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        elif self.window is not None and T > (self.window if self.causal else self.window // 2 + 1):
            # a band only where keys fall out of the window: (T, T), the diagonal kept for padding rows;
            # causal, or an encoder's both ways
            pos = torch.arange(T, device=q.device)
            band = (window_mask if self.causal else bidirectional_window_mask)(pos, pos, self.window)
            mask = band if mask is None else mask & band
        gqa = self.n_kv_head != self.n_head  # from the config, not shapes: static under compile
        causal = True if self.causal and mask is None and T > 1 else False  # a Python bool even when T is symbolic
        y = attend(q, k, v, mask, causal, self.dropout if self.training else 0.0, gqa, self.scale, self.softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.gated_mlp  # gated: SwiGLU (silu gate) or GeGLU (tanh-GELU gate, Gemma)
        self.gelu_gate = cfg.mlp == "geglu"
        self.gelu = cfg.gelu if cfg.gelu == "tanh" else "none"  # F.gelu's approximate: "none" is the exact erf
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias) if self.swiglu else None
        self.down = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            g = self.gate(x)
            g = F.gelu(g, approximate=self.gelu) if self.gelu_gate else F.silu(g)
            return self.down(g * self.up(x))
        return self.down(F.gelu(self.up(x), approximate=self.gelu))  # tanh: GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        # norm_placement: norms on each sub-layer's input ("pre", "sandwich") and/or on its output
        # before the residual add ("sandwich", "post") or after it ("post_add": BERT's post-LN, the norm
        # over x + f(x)); the ones a placement lacks are None
        pre, post = cfg.norm_placement in ("pre", "sandwich"), cfg.norm_placement != "pre"
        self.post_add = cfg.norm_placement == "post_add"
        self.attn_norm = make_norm(cfg) if pre else None
        self.attn = Attention(cfg, layer)
        self.attn_post_norm = make_norm(cfg) if post else None
        self.mlp_norm = make_norm(cfg) if pre else None
        self.mlp = MLP(cfg)
        self.mlp_post_norm = make_norm(cfg) if post else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, kv_cache: Optional[LayerKVCache] = None, layer: int = 0,
                mask: Optional[torch.Tensor] = None):
        h = x if self.attn_norm is None else _autocast_once(self.attn_norm(x))
        # the mask only when there is one: tensor parallelism's input plan names four inputs
        h = self.attn(h, rope, kv_cache, layer) if mask is None else self.attn(h, rope, kv_cache, layer, mask)
        if self.post_add:
            x = self.attn_post_norm(x + self.drop(h))
            return self.mlp_post_norm(x + self.drop(self.mlp(x)))
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + self.drop(h)
        h = self.mlp(x if self.mlp_norm is None else _autocast_once(self.mlp_norm(x)))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + self.drop(h)


def gpt2_init_(model: nn.Module, cfg: ModelConfig, depth: int) -> None:
    """GPT-2 init: N(0, init_std), residual projections scaled by 1/sqrt(2 * depth); RoPE tables
    recomputed (they are buffers: e.g. after meta-device init)."""
    std = cfg.init_std
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:  # scale 1: a weight of 1, or of 0 where the norm adds the 1 (Gemma)
            (nn.init.zeros_ if cfg.norm_unit_offset else nn.init.ones_)(p)
        elif name.endswith(("o_proj.weight", "down.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * depth))
        else:
            nn.init.normal_(p, 0.0, std)
    if cfg.pos_embedding == "rope":
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
        if getattr(model, "rope_local_cos", None) is not None:
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_local_theta)
            model.rope_local_cos.copy_(cos)
            model.rope_local_sin.copy_(sin)


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
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(k)})
        self.norm_f: Optional[nn.Module] = make_norm(cfg)
        self.lm_head: Optional[nn.Linear] = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_embedding == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.rope_local_theta is not None:  # Gemma 3: the local layers' own base, without rope_scaling
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_local_theta)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)
        # embed_scale as each dtype holds it: HF multiplies by its scale cast to the weights' dtype
        # (a dict of Python floats: constants under compile; on the CPU even under a meta device)
        scale = torch.tensor(cfg.embed_scale, dtype=torch.float32, device="cpu")
        self._embed_scale = {dt: scale.to(dt).item() for dt in (torch.float32, torch.bfloat16, torch.float16,
                                                              torch.float64)}
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
        logits = self.head_logits(h)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits, targets)  # fp32, chunked: see scalelm/loss.py
        return logits, loss

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states, soft-capped where the model caps its logits (Gemma 2):
        what every caller of ``lm_head`` outside ``forward`` (distillation, ONNX) must use."""
        return softcap(self.lm_head(h), self.cfg.logit_softcap)

    def embed(self, idx: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the first block's input: embeddings (times ``embed_scale``), plus
        learned positions where the model has them."""
        h = self.tok_emb(idx)
        if self.cfg.embed_scale != 1.0:
            h = h * self._embed_scale[h.dtype]
        if self.pos_emb is not None:
            h = h + self.pos_emb(pos_ids)
        return h

    def ropes(self, pos_ids: torch.Tensor) -> tuple[Optional[tuple], Optional[tuple]]:
        """(global, local) RoPE (cos, sin) at ``pos_ids``, each (B or 1, 1, T, head_dim): the same pair
        unless ``rope_local_theta`` gives the sliding-window layers their own; (None, None) without RoPE.
        Layer i takes ``ropes[cfg.layer_window(i) is not None]``."""
        if self.cfg.pos_embedding != "rope":
            return None, None
        rope = (self.rope_cos[pos_ids][:, None], self.rope_sin[pos_ids][:, None])
        if self.cfg.rope_local_theta is None:
            return rope, rope
        return rope, (self.rope_local_cos[pos_ids][:, None], self.rope_local_sin[pos_ids][:, None])

    def hidden_states(self, idx: torch.Tensor, *, kv_cache: Optional[LayerKVCache] = None,
                      pos_ids: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None):
        """The last block's output after the final norm, ``(B, T, n_embd)`` (what the LM head and a
        task head read); on a pipeline stage without the head, that stage's raw output."""
        B, T = idx.shape[:2]  # token ids, or hidden states on a later pipeline stage
        if kv_cache is not None:
            pos_ids = kv_cache.prepare(T)
        elif pos_ids is None:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
            pos_ids = torch.arange(T, device=idx.device)[None]
        h = self.drop(self.embed(idx, pos_ids)) if self.tok_emb is not None else idx
        ropes = self.ropes(pos_ids)
        for i, key in enumerate(self.layer_keys):
            if key in self.blocks:  # a pipeline stage holds only some layers
                rope = ropes[self.cfg.layer_window(i) is not None]
                h = self.blocks[key](h, rope, kv_cache, i, attn_mask) if attn_mask is not None \
                    else self.blocks[key](h, rope, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        if self.lm_head is None:
            return h
        return self.norm_f(h)


def flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None, training: bool = True) -> int:
    """Matmul FLOPs per token (PaLM appendix B): 2 per weight per token forward, plus attention
    scores and values (2 * 2 * n_layer * T * d_attn forward, full T as in PaLM/nanoGPT; a
    sliding-window layer counts min(T, window) keys). Training is 3x forward (backward costs twice
    the forward)."""
    T = seq_len or cfg.block_size
    if cfg.arch == "encoder-decoder":
        return encdec_flops_per_token(cfg, T, training)
    if cfg.arch == "encoder":
        return encoder_flops_per_token(cfg, T, training)
    d, L, hd = cfg.n_embd, cfg.n_layer, cfg.head_dim
    attn_w = d * hd * (cfg.n_head * 2 + cfg.kv_heads * 2)  # q, o and k, v projections
    mlp_w = d * cfg.ffn_dim * (3 if cfg.gated_mlp else 2)
    head_w = d * cfg.vocab_size
    keys = sum(min(T, cfg.layer_window(i) or T) for i in range(L))  # L * T without a window
    fwd = 2 * (L * (attn_w + mlp_w) + head_w) + 2 * 2 * keys * cfg.n_head * hd
    return 3 * fwd if training else fwd


def encdec_flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None, training: bool = True) -> int:
    """The same count for ``arch = "encoder-decoder"`` (scalelm/model/encdec.py), per target token,
    taking the source as long as the target: encoder layers, decoder layers with cross-attention
    (q/o on the target, k/v on the source), the output layer."""
    T = seq_len or cfg.block_size
    d, hd = cfg.n_embd, cfg.head_dim
    attn_w = d * hd * (cfg.n_head * 2 + cfg.kv_heads * 2)
    mlp_w = d * cfg.ffn_dim * (3 if cfg.gated_mlp else 2)
    n_enc, n_dec = cfg.n_encoder_layer or cfg.n_layer, cfg.n_decoder_layer or cfg.n_layer
    enc = n_enc * (2 * (attn_w + mlp_w) + 4 * T * cfg.n_head * hd)
    dec = n_dec * (2 * (2 * attn_w + mlp_w) + 2 * 4 * T * cfg.n_head * hd)
    fwd = enc + dec + 2 * d * cfg.vocab_size
    return 3 * fwd if training else fwd


# the share of tokens masked-LM training predicts (BERT's 15%): the encoder's head runs on those only
MLM_FRACTION = 0.15


def encoder_flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None, training: bool = True) -> int:
    """The same count for ``arch = "encoder"`` (scalelm/model/encoder.py), per input token: every layer
    at every position, attention over the full T (a packed-document mask does not skip work; a local
    layer over its window), and the
    masked-LM head (transform and decoder) on the ``MLM_FRACTION`` of positions that are predicted."""
    T = seq_len or cfg.block_size
    d, L, hd = cfg.n_embd, cfg.n_layer, cfg.head_dim
    attn_w = d * hd * (cfg.n_head * 2 + cfg.kv_heads * 2)
    mlp_w = d * cfg.ffn_dim * (3 if cfg.gated_mlp else 2)
    head_w = MLM_FRACTION * (d * d + d * cfg.vocab_size)
    # a local layer's query sees at most window // 2 keys on either side (ModernBERT's local attention)
    keys = sum(min(T, 2 * (w // 2) + 1) if (w := cfg.layer_window(i)) else T for i in range(L))
    fwd = int(2 * (L * (attn_w + mlp_w) + head_w) + 2 * 2 * keys * cfg.n_head * hd)
    return 3 * fwd if training else fwd
