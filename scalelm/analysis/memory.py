"""Training memory per device, from the model config and a parallel layout.

Parameter counts are exact (the model is built on the meta device and counted). Activations
follow what autograd saves in ``scalelm.model``, tensor by tensor (see ``layer_saved_bytes``);
``tests/analysis/test_planner.py`` checks them against a saved-tensor count of the real model, and
``benchmarks/bench_memory.py`` checks whole-step peaks against measured RSS.

Mixed precision means what the trainer does: fp32 master weights, gradients and AdamW
state, bf16 autocast for matmuls (or, under FSDP2, bf16 all-gathered parameters).

An encoder (``arch = "encoder"``, masked-LM training) is counted from its own modules: its embedding
norm and token types, and a head that runs on the predicted rows only (``MLM_FRACTION`` of the
tokens: the transform, the decoder's logits and the loss), never full-vocabulary logits at every
position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..config import ModelConfig
from ..distributed.mesh import Layout as MeshLayout

COLWISE = ("q_proj", "k_proj", "v_proj", "up", "gate")  # tensor parallel: output features split
ROWWISE = ("o_proj", "down")  # input features split; the bias stays whole


@dataclass(frozen=True)
class Layout(MeshLayout):
    """A parallel layout (the trainer's mesh shape) plus activation checkpointing."""

    ac: bool = False

    @property
    def world(self) -> int:
        return self.world_size

    @property
    def ddp(self) -> bool:  # (fsdp: as the trainer decides, scalelm.distributed.mesh.Layout.fsdp)
        return self.dp_replicate > 1 and not self.fsdp

    @property
    def name(self) -> str:
        parts = []
        if self.pp > 1:
            parts.append("PP")
        if self.dp_replicate > 1 and self.dp_shard > 1:
            parts.append("HSDP")
        elif self.dp_shard > 1:
            parts.append("FSDP")
        elif self.dp_replicate > 1:
            parts.append("DDP")
        if self.cp > 1:
            parts.append("CP")
        if self.tp > 1:
            parts.append("TP")
        return "+".join(parts) or "single"


@dataclass(frozen=True)
class ParamSplit:
    """Exact parameter counts by place; ``block_tp`` is the part of a block that TP splits."""

    tok_emb: int
    pos_emb: int
    block: int  # one block
    block_tp: int  # its linear weights and column-parallel biases
    block_linear_w: int  # its linear weights (what autocast casts to bf16)
    norm_f: int
    head: int  # 0 when tied to the token embedding
    n_layer: int
    n_blocks: int  # distinct blocks (< n_layer with cross-layer sharing)
    tied: bool

    @property
    def total(self) -> int:
        return self.tok_emb + self.pos_emb + self.n_blocks * self.block + self.norm_f + self.head


def planning_config(cfg: ModelConfig) -> ModelConfig:
    """The GPT the planner models for ``cfg``. An encoder-decoder is planned as a GPT of its
    encoder layers plus 4/3 of its decoder layers (a decoder layer adds cross-attention: 4d^2 of
    weights to the 12d^2 of self-attention and MLP, with activations to match), with the source
    as long as the target: parameters, FLOPs and activations come out within a few percent."""
    if cfg.arch != "encoder-decoder":
        return cfg
    import dataclasses

    from ..model.encdec import n_dec, n_enc

    return dataclasses.replace(cfg, arch="gpt", n_layer=n_enc(cfg) + round(4 * n_dec(cfg) / 3),
                               n_encoder_layer=None, n_decoder_layer=None)


def param_split(cfg: ModelConfig) -> ParamSplit:
    from ..model.build import build_model

    with torch.device("meta"):
        m = build_model(cfg)
    encoder = cfg.arch == "encoder"
    blk = m.blocks[m.layer_keys[-1]] if encoder else m.blocks["0"]  # an encoder's layer 0 may lack its attn norm
    tp_part = lin_w = 0
    for name, p in blk.named_parameters():
        owner = name.split(".")[-2]
        if name.endswith("weight") and owner in COLWISE + ROWWISE:
            tp_part += p.numel()
            lin_w += p.numel()
        elif name.endswith("bias") and owner in COLWISE:
            tp_part += p.numel()
    numel = lambda mod: sum(p.numel() for p in mod.parameters()) if mod is not None else 0  # noqa: E731
    pos, last = numel(m.pos_emb), numel(m.norm_f)
    head = 0 if cfg.tie_embeddings else numel(m.lm_head)
    if encoder:
        # token types and the embedding norm sit with the embeddings (a pre-norm encoder's embedding
        # norm is layer 0's attention norm: the blocks count it, as layer 0 is counted as large as the
        # others); the MLM head's transform and the decoder's bias sit with the final norm (last stage)
        pos += numel(m.type_emb) + numel(m.emb_norm) - (numel(blk) - numel(m.blocks["0"]))
        last += numel(m.head_dense) + numel(m.head_norm) + m.lm_head.bias.numel()
        head = 0 if cfg.tie_embeddings else m.lm_head.weight.numel()
    return ParamSplit(tok_emb=numel(m.tok_emb), pos_emb=pos, block=numel(blk),
                      block_tp=tp_part, block_linear_w=lin_w, norm_f=last,
                      head=head, n_layer=cfg.n_layer,
                      n_blocks=len(m.blocks), tied=cfg.tie_embeddings)


# ----------------------------------------------------------------------------- activations

def _norm_saved(cfg: ModelConfig, width: float) -> float:
    """Bytes per token a norm saves: its fp32 input and statistics (LayerNorm: mean and 1/std;
    RMSNorm: 1/rms and one more fp32 tensor of the input's size)."""
    return 4 * width + 8 if cfg.norm == "layernorm" else 8 * width + 4


def layer_saved_bytes(cfg: ModelConfig, precision: str, tp: int = 1, seq_parallel: bool = False) -> float:
    """Bytes per token that one transformer layer keeps for backward (weights' bf16 copies excluded).

    Under bf16 autocast the norms stay fp32 (input, statistics), their outputs are cast to
    bf16 once (``scalelm.model._autocast_once``) and matmul outputs are bf16.
    """
    low = precision in ("bf16", "fp16")
    a = 2 if low else 4
    d, q = cfg.n_embd, cfg.n_head * cfg.head_dim
    kv, f, H = cfg.kv_heads * cfg.head_dim, cfg.ffn_dim, cfg.n_head
    swiglu = cfg.gated_mlp  # SwiGLU or GeGLU: a gate beside up
    dn = d / tp if seq_parallel else d  # norms run on sequence shards under sequence parallelism
    norms = 2 * _norm_saved(cfg, dn)
    lin_in = 2 * (2 if low else 4) * d  # each norm's output, read by the linears after it
    if cfg.norm_placement == "post_add" and low:  # post-LN (BERT): each linear casts the fp32 norm output itself
        lin_in = 2 * d * (3 + (2 if swiglu else 1))  # q, k, v; up (and gate)
    attn = (a * (2 * q + 2 * kv) + 4 * H) / tp  # q, k, v, output (o_proj reads the same), logsumexp
    mlp = a * f * (4 if swiglu else 2) / tp  # gelu: in, out; swiglu: gate, silu(gate), up, product
    return norms + lin_in + attn + mlp


def predicted_fraction(cfg: ModelConfig) -> float:
    """The share of positions the LM head (and the loss) runs on: all of them, an encoder's masked ones."""
    from ..model.gpt import MLM_FRACTION

    return MLM_FRACTION if cfg.arch == "encoder" else 1.0


def head_saved_bytes(cfg: ModelConfig, precision: str) -> float:
    """Per token: final norm, LM-head input, and what ``scalelm.loss`` keeps: the logits, the
    target and its mask. An encoder's head runs on the gathered predicted rows only (their index
    kept): the transform's dense input, GELU input and norm, then the decoder's input and logits."""
    a = 2 if precision in ("bf16", "fp16") else 4
    d, V = cfg.n_embd, cfg.vocab_size
    if cfg.arch != "encoder":
        return _norm_saved(cfg, d) + a * d + a * V + 8 + 1
    final = _norm_saved(cfg, d) if cfg.norm_placement == "pre" else 0  # post-LN BERT has no final norm
    row = 8 + 2 * a * d + _norm_saved(cfg, d) + a * d + a * V + 8 + 1
    return final + predicted_fraction(cfg) * row


def head_transient_bytes(cfg: ModelConfig, precision: str) -> float:
    """Per token, on top of the saved tensors, in the loss's backward (usually the largest
    moment of the step): the logits' gradient, in the logits' dtype (an encoder: predicted rows only)."""
    return (2 if precision in ("bf16", "fp16") else 4) * cfg.vocab_size * predicted_fraction(cfg)


def loss_workspace_bytes(cfg: ModelConfig, tokens: int, device_type: str) -> float:
    """fp32 chunk buffers of the loss's backward (two chunks of rows, see ``scalelm.loss``)."""
    from ..model.loss import CHUNK_BYTES, DEFAULT_CHUNK_BYTES

    chunk = CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES)
    rows = min(tokens * predicted_fraction(cfg), max(1, chunk // (4 * cfg.vocab_size)))
    return 2 * 4 * rows * cfg.vocab_size


def head_weight_copy_bytes(cfg: ModelConfig) -> float:
    """The bf16 copies autocast saves of the head's weights: the decoder (and an encoder's transform)."""
    return 2 * cfg.n_embd * (cfg.vocab_size + (cfg.n_embd if cfg.arch == "encoder" else 0))


def embedding_saved_bytes(cfg: ModelConfig) -> float:
    """Per token: the token ids the embedding's backward reads (and an encoder's embedding norm)."""
    return 8 + (_norm_saved(cfg, cfg.n_embd) if cfg.arch == "encoder" else 0)


def layer_workspace_bytes(cfg: ModelConfig, precision: str, tp: int = 1) -> float:
    """Per token: what a layer's backward adds at its worst moment, in the MLP: two fp32
    MLP-wide gradients, less the saved input one of them replaces, and two residual-wide ones."""
    return 4 * (cfg.ffn_dim / tp + 2 * cfg.n_embd)


# ----------------------------------------------------------------------------- per device


@dataclass
class MemoryEstimate:
    """Bytes per device on the busiest pipeline stage; ``peak`` is the step's high-water mark."""

    params: float  # fp32 master weights held by this device
    grads: float  # gradient storage (unsharded while micro-batches accumulate)
    optimizer: float  # AdamW moments
    activations: float  # saved for backward at the end of the forward (all in-flight micro-batches)
    transient: float  # what else is alive at the peak: loss backward, gathered FSDP params, buckets
    peak: float  # the step's high-water mark; the parts above do not all peak at the same moment
    phase: str  # "loss backward", "layer backward", "first layer backward", "backward end", "optimizer step"
    stage: int = 0
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def in_flight(layout: Layout, microbatches: int, schedule: str, stage: int) -> int:
    """Micro-batches whose activations a pipeline stage holds at once."""
    if layout.pp == 1:
        return 1
    if schedule == "gpipe":
        return microbatches
    return min(microbatches, layout.pp - stage)  # 1F1B warm-up depth (interleaved: about the same)


def estimate_memory(cfg: ModelConfig, layout: Layout, micro_batch: int, seq_len: int,
                    precision: str = "bf16", grad_accum: int = 1, schedule: str = "1f1b",
                    seq_parallel: bool = False, split: ParamSplit | None = None,
                    fused_adamw: bool | None = None, device_type: str = "cuda") -> MemoryEstimate:
    """Peak training memory per device for ``layout``: the maximum over pipeline stages."""
    split = split or param_split(cfg)
    best = None
    for stage in range(layout.pp):
        est = _stage_memory(cfg, layout, micro_batch, seq_len, precision, grad_accum, schedule,
                            seq_parallel, split, stage, fused_adamw, device_type)
        if best is None or est.peak > best.peak:
            best = est
    return best


def _stage_memory(cfg, layout, B, T, precision, accum, schedule, seq_parallel, split, stage, fused_adamw,
                  device_type):
    low = precision in ("bf16", "fp16")
    t, s, p = layout.tp, layout.dp_shard, layout.pp
    first, last = stage == 0, stage == p - 1
    layers = cfg.n_layer // p
    blocks = split.n_blocks if p == 1 else layers
    block_local = split.block - split.block_tp + split.block_tp / t
    emb = (split.tok_emb + split.pos_emb) if first else 0
    # a tied head is the embedding; on a later pipeline stage it is a second copy
    head = (split.head or (split.tok_emb if p > 1 else 0)) + split.norm_f if last else 0
    P = blocks * block_local + emb + head  # parameters this device computes with (unsharded)
    shard = s * layout.cp if layout.fsdp else 1  # context-parallel ranks shard like data-parallel ones
    params = 4 * P / shard
    optimizer = 8 * P / shard
    # gradients: FSDP2 with gradient sync off (accumulation) keeps them unsharded until the last
    # micro-batch; DDP keeps a bucket copy for its all-reduce
    grads_final = 4 * P / shard
    grads_accum = 4 * P if accum > 1 else 0
    ddp_buckets = 4 * P if layout.ddp else 0
    if fused_adamw is None:
        fused_adamw = not layout.fsdp and t == 1  # DTensor parameters fall back to foreach
    opt_temp = 0 if fused_adamw else 4 * P / shard  # foreach AdamW: one parameter-sized temporary

    tokens = B * T / layout.cp  # context parallelism: this device's part of each sequence
    k = in_flight(layout, max(accum, 1), schedule, stage)
    act_bytes = 2 if (layout.fsdp and low) else 4  # FSDP2 bf16 params make the residual stream bf16
    layer_full = layer_saved_bytes(cfg, precision, t, seq_parallel) * tokens
    # autocast saves a bf16 copy of each weight for backward; FSDP2 computes with bf16 gathers instead
    w_copy = 2 * split.block_linear_w / t if (low and not layout.fsdp) else 0
    if layout.ac:
        per_layer = act_bytes * cfg.n_embd * tokens / (t if seq_parallel else 1)
        recompute = layer_full + w_copy
    else:
        per_layer = layer_full + w_copy
        recompute = 0
    blocks_saved = k * layers * per_layer
    emb_saved = embedding_saved_bytes(cfg) * tokens * k if first else 0
    head_saved = head_transient = head_w_copy = 0
    if last:
        head_saved = head_saved_bytes(cfg, precision) * tokens
        head_transient = head_transient_bytes(cfg, precision) * tokens + loss_workspace_bytes(
            cfg, tokens, device_type)
        if low and not layout.fsdp:
            head_w_copy = head_weight_copy_bytes(cfg)
    # at the end of the backward: FSDP2 has reduce-scattered every block but the root (unless
    # accumulating); everyone else holds the whole local gradient
    grads_end = 4 * P
    fsdp_buf = 0
    if layout.fsdp and accum == 1:
        grads_end = grads_final + 4 * ((split.tok_emb + split.pos_emb if first else 0) + (head if last else 0))
    # the first layer's backward: all but its own and the embedding's gradients exist
    grads_layer0 = max(grads_accum, grads_end - 4 * (emb + (block_local if not layout.fsdp or accum > 1 else 0)))
    if layout.fsdp:
        pb = 2 if low else 4
        root = (split.tok_emb + split.pos_emb if first else 0) + (head if last else 0)
        fsdp_buf = pb * (root + 2 * block_local)  # unsharded root + current and prefetched block
    activations = blocks_saved + emb_saved + head_saved + head_w_copy
    workspace = layer_workspace_bytes(cfg, precision, t) * tokens
    if layout.cp > 1:  # the ring: K and V in hand and arriving, their fp32 gradients travelling with them
        kv = 2 * cfg.kv_heads * cfg.head_dim / t * tokens
        workspace += kv * (2 * (2 if low else 4) + 2 * 4)

    base = dict(params=params, optimizer=optimizer)
    phases = {
        # the loss's backward on the last stage: every activation is still held
        "loss backward": dict(base, grads=grads_accum, activations=activations,
                              transient=head_transient + fsdp_buf + ddp_buckets),
        # a layer's backward: the head is done (its weight gradient exists), one layer recomputed
        "layer backward": dict(base, grads=max(grads_accum, 4 * head), activations=blocks_saved + emb_saved,
                               transient=recompute + workspace + fsdp_buf + ddp_buckets),
        # the first layer's backward: nearly every gradient exists, one layer's activations remain
        "first layer backward": dict(base, grads=grads_layer0, activations=(k - 1) * layers * per_layer
                                     + per_layer + emb_saved,
                                     transient=recompute + workspace + fsdp_buf + ddp_buckets),
        # the embedding's backward: every gradient exists (unsharded), plus a dense V x d one
        "backward end": dict(base, grads=grads_end, activations=0.0,
                             transient=(8 * split.tok_emb if first else 0) + workspace + fsdp_buf
                             + ddp_buckets),
        "optimizer step": dict(base, grads=grads_final, activations=0.0,
                               transient=opt_temp + ddp_buckets),
    }
    totals = {name: sum(c.values()) for name, c in phases.items()}
    phase = max(totals, key=totals.get)
    c = phases[phase]
    return MemoryEstimate(params=params, grads=max(grads_accum, grads_final), optimizer=optimizer,
                          activations=activations, transient=totals[phase] - params - optimizer
                          - c["grads"] - c["activations"], peak=totals[phase],
                          phase=phase, stage=stage,
                          detail=dict(params_unsharded=P, in_flight=k, layer_saved=per_layer,
                                      ddp_buckets=ddp_buckets, fsdp_buffers=fsdp_buf,
                                      head_transient=head_transient, phases=totals))


def forward_saved_bytes(cfg: ModelConfig, batch: int, seq_len: int, precision: str) -> float:
    """Everything one single-device forward with targets saves for backward (no checkpointing):
    what ``tests/analysis/test_planner.py`` compares with autograd's own saved tensors."""
    low = precision in ("bf16", "fp16")
    split = param_split(cfg)
    tokens = batch * seq_len
    total = cfg.n_layer * (layer_saved_bytes(cfg, precision) * tokens + (2 * split.block_linear_w if low else 0))
    total += head_saved_bytes(cfg, precision) * tokens + (head_weight_copy_bytes(cfg) if low else 0)
    total += embedding_saved_bytes(cfg) * tokens + 8  # token ids (embedding backward), the loss's count of targets
    if cfg.pos_embedding == "learned":
        total += 8 * seq_len  # position ids
    else:
        total += 2 * 4 * seq_len * cfg.head_dim  # RoPE cos and sin, shared by all layers
    return total
