"""Pipeline parallelism over layers with ``torch.distributed.pipelining``.

The model is cut by hand (not traced): a stage is the same ``GPT`` with the other layers'
blocks removed, the embeddings only on the first stage, the final norm and LM head only on
the last. Parameter names therefore stay the full model's names, and checkpoints move between
pipelined and non-pipelined layouts. A tied embedding lives on the first and the last stage;
after each backward the two gradients are summed over a two-rank group so both copies take
identical steps (the traced ``pipeline()`` front end would silently untie them).

Schedules: ``gpipe``, ``1f1b`` (one stage per rank) and ``interleaved_1f1b`` (two stages per
rank, stage ``s`` on pipeline rank ``s % pp``). Each rank's batch of an optimizer step is split
into ``parallel.pp_microbatches`` micro-batches (default ``2 * pp``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..model.gpt import GPT
from ..model.loss import cross_entropy
from .mesh import LayoutError, ParallelContext, virtual_stages


class StageModule(nn.Module):
    """What a ``PipelineStage`` runs: one tensor in (ids or hidden states), one tensor out."""

    def __init__(self, gpt: GPT, seq_shards: int = 1):
        super().__init__()
        self.gpt = gpt
        self.seq_shards = seq_shards  # sequence parallel: hidden states hold 1/tp of the sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos_ids = None
        if self.gpt.tok_emb is None and self.seq_shards > 1:  # RoPE needs the full sequence's positions
            pos_ids = torch.arange(x.shape[1] * self.seq_shards, device=x.device)[None]
        return self.gpt(x, pos_ids=pos_ids)[0]


class TiedHead(nn.Embedding):
    """The last stage's copy of a tied embedding, used as the output projection. It is an
    ``nn.Embedding`` so that everything that treats embeddings specially (no weight decay)
    treats this copy exactly like the first stage's original."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


def split_layers(n_layer: int, n_stages: int) -> list[list[int]]:
    per = n_layer // n_stages
    return [list(range(s * per, (s + 1) * per)) for s in range(n_stages)]


def cut_stage(model: GPT, layers: list[int], first: bool, last: bool) -> GPT:
    """A view of ``model`` holding only ``layers`` (shares the kept modules, copies nothing
    but a tied head, which becomes the last stage's own parameter)."""
    part = GPT.__new__(GPT)
    part.__dict__ = model.__dict__.copy()
    for attr in ("_modules", "_parameters", "_buffers"):
        setattr(part, attr, getattr(model, attr).copy())
    keep = {model.layer_keys[i] for i in layers}
    part.blocks = nn.ModuleDict({k: b for k, b in model.blocks.items() if k in keep})
    if not first:
        part.tok_emb = None
        part.pos_emb = None
    if not last:
        part.norm_f = None
        part.lm_head = None
    elif not first and model.cfg.tie_embeddings:
        w = model.tok_emb.weight
        head = TiedHead(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
        head.weight = nn.Parameter(w.detach().clone())
        part.lm_head = head
    return part


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's own loss (mean token cross-entropy, padding ignored), per micro-batch."""
    return cross_entropy(logits, targets)


def _tie_group(ctx: ParallelContext):
    """A group of the first and the last pipeline rank of this rank's (dp, tp) coordinate.
    Every rank creates every group, in the same order, as ``new_group`` requires."""
    ranks = ctx.mesh.mesh  # (pp, dp_replicate, dp_shard, cp, tp) -> global rank
    mine = None
    for first, last in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist()):
        g = dist.new_group([first, last])
        if ctx.rank in (first, last):
            mine = g
    return mine


class PipelineModel(nn.Module):
    """This rank's pipeline stages and their schedule. ``forward_backward`` trains on a step's
    micro-batches; ``forward`` (evaluation only) returns ``(None, loss)`` on every rank."""

    def __init__(self, roots: list[nn.Module], gpts: list[GPT], stage_ids: list[int], n_stages: int,
                 cfg: Config, ctx: ParallelContext):
        super().__init__()
        from torch.distributed.pipelining import PipelineStage

        self.parts = nn.ModuleList(roots)
        self._gpts = gpts
        self.cfg = cfg.model
        self.ctx = ctx
        self.stage_ids, self.n_stages = stage_ids, n_stages
        self.has_first, self.has_last = 0 in stage_ids, n_stages - 1 in stage_ids
        self.microbatches_cfg = cfg.parallel.pp_microbatches
        self.schedule_kind = cfg.parallel.pp_schedule
        group = ctx.group("pp")
        self.stages = [PipelineStage(r, s, n_stages, ctx.device, group=group) for r, s in zip(roots, stage_ids)]
        self.schedule, self.n_microbatches = None, None  # built at the first step, when rows are known
        self.tied = cfg.model.tie_embeddings
        self.tie_group = _tie_group(ctx) if self.tied else None

    def _build_schedule(self, rows: int) -> None:
        from torch.distributed.pipelining import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        pp = self.ctx.pp
        if self.microbatches_cfg:
            n = self.microbatches_cfg
        else:  # 2 * pp keeps the bubble small; fall back to pp when that does not divide the rows
            n = next((c for c in (2 * pp, pp) if rows % c == 0), 2 * pp)
        if rows % n:
            raise LayoutError(
                f"pipeline parallelism splits each step's {rows} sequences per data-parallel rank into "
                f"{n} micro-batches; set --parallel.pp_microbatches to a divisor of {rows}, or change the "
                f"batch size (train.micro_batch_size x grad_accum_steps)")
        if self.schedule_kind == "interleaved_1f1b":
            self.schedule = ScheduleInterleaved1F1B(self.stages, n, loss_fn=lm_loss)
        else:
            cls = ScheduleGPipe if self.schedule_kind == "gpipe" else Schedule1F1B
            self.schedule = cls(self.stages[0], n, loss_fn=lm_loss)
        self.n_microbatches = n

    def gpt_parts(self) -> list[GPT]:
        return list(self._gpts)

    # ------------------------------------------------------------------ training
    def forward_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Optional[torch.Tensor]:
        """Run the schedule over one optimizer step's batches (forward and backward of every
        micro-batch, gradients accumulated). Returns the mean loss on the last stage, else None."""
        x = torch.cat([b[0] for b in micro_batches]).to(self.ctx.device)
        y = torch.cat([b[1] for b in micro_batches]).to(self.ctx.device)
        if self.schedule is None:
            self._build_schedule(x.shape[0])
        elif x.shape[0] % self.n_microbatches:
            raise LayoutError(f"this step has {x.shape[0]} sequences per data-parallel rank, not divisible "
                              f"into the pipeline's {self.n_microbatches} micro-batches")
        losses: list = []
        args = (x,) if self.has_first else ()
        self.schedule.step(*args, target=y if self.has_last else None, losses=losses if self.has_last else None)
        self.sync_tied_grads()
        return torch.stack([loss.detach() for loss in losses]).mean() if self.has_last else None

    def sync_tied_grads(self) -> None:
        """Sum the embedding's gradient (first stage) and the head's (last stage)."""
        if self.tie_group is None:
            return
        from torch.distributed.tensor import DTensor

        for gpt in self._gpts:
            for mod in ((gpt.tok_emb,) if gpt.tok_emb is not None else ()) + \
                       ((gpt.lm_head,) if gpt.lm_head is not None else ()):
                g = mod.weight.grad
                if g is None:  # keep the collective matched: a rank with no gradient sends zeros
                    g = mod.weight.grad = torch.zeros_like(mod.weight)
                local = g.to_local() if isinstance(g, DTensor) else g
                dist.all_reduce(local, group=self.tie_group)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, **_):
        """Evaluation through the stages in order (no overlap: no schedule, any batch size).
        Returns ``(None, loss)`` with the loss on every rank of the pipeline."""
        if targets is None:
            raise ValueError("a pipelined model only computes losses: pass targets")
        ctx, group = self.ctx, self.ctx.group("pp")
        h, loss = idx.to(ctx.device), None
        for s in range(self.n_stages):
            owner = s % ctx.pp
            if owner != ctx.pp_rank:
                continue
            if s > 0:
                h = _recv(dist.get_global_rank(group, (s - 1) % ctx.pp), ctx.device)
            out = self.parts[self.stage_ids.index(s)](h)
            if s == self.n_stages - 1:
                loss = lm_loss(out, targets.to(ctx.device))
            else:
                _send(out, dist.get_global_rank(group, (s + 1) % ctx.pp))
        t = (loss if loss is not None else torch.zeros((), device=ctx.device)).float().reshape(1)
        dist.broadcast(t, group_src=(self.n_stages - 1) % ctx.pp, group=group)
        return None, t[0]


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _send(t: torch.Tensor, dst: int) -> None:
    t = t.contiguous()
    header = torch.tensor([_DTYPES.index(t.dtype), t.ndim, *t.shape] + [0] * (6 - t.ndim),
                          dtype=torch.int64, device=t.device)
    dist.send(header, dst)
    dist.send(t, dst)


def _recv(src: int, device: torch.device) -> torch.Tensor:
    header = torch.empty(8, dtype=torch.int64, device=device)
    dist.recv(header, src)
    code, ndim, *shape = header.tolist()
    t = torch.empty(shape[:ndim], dtype=_DTYPES[code], device=device)
    dist.recv(t, src)
    return t


def build_pipeline(model: GPT, cfg: Config, ctx: ParallelContext, parallelize_part) -> PipelineModel:
    """Cut ``model`` into ``pp * virtual`` stages, keep this rank's, parallelize each one.

    ``parallelize_part(gpt, cfg, ctx, root=, in_pipeline=True)`` applies TP/AC/compile/FSDP to a
    stage (``parallelize.parallelize_part``); it is passed in so that this module stays below
    ``parallelize``, which calls it."""
    v = virtual_stages(cfg.parallel)
    n_stages = ctx.pp * v
    layers = split_layers(model.cfg.n_layer, n_stages)
    stage_ids = [ctx.pp_rank + i * ctx.pp for i in range(v)]
    seq_shards = ctx.tp if cfg.parallel.sequence_parallel else 1
    roots, gpts = [], []
    for s in stage_ids:
        gpt = cut_stage(model, layers[s], first=s == 0, last=s == n_stages - 1)
        gpt.to(ctx.device)
        root = StageModule(gpt, seq_shards)
        roots.append(parallelize_part(gpt, cfg, ctx, root=root, in_pipeline=True))
        gpts.append(gpt)
    return PipelineModel(roots, gpts, stage_ids, n_stages, cfg, ctx)
