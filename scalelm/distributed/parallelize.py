"""Parallelism applied to a plain ``GPT`` from outside, always in this order:

1. tensor parallel (heads and MLP width over the ``tp`` mesh dimension; optional sequence
   parallel for the norms),
2. context parallel (each sequence split over the ``cp`` ranks, attention as a ring:
   ``context_parallel``),
3. activation checkpointing (each block recomputes its activations in the backward),
4. ``torch.compile`` (per block when sharded, so FSDP's hooks stay outside compiled code;
   the whole model in place otherwise),
5. FSDP2 (``fully_shard`` per block, then the root, over ``dp_shard x cp``; HSDP when
   ``dp_replicate > 1`` too),
6. DDP (``dp_replicate > 1`` with nothing sharded).

Pipeline parallelism (``scalelm.distributed.pipeline``) first cuts the model into stages and
then applies 1-6 to each stage (CP is refused there). FQNs never change except under DDP
(``module.`` prefix, see :func:`unwrap_model`) and activation checkpointing (whose wrapper hides
its prefix from ``state_dict``), so checkpoints load into any layout.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config
from ..model.gpt import GPT
from .mesh import LayoutError, ParallelContext

# ----------------------------------------------------------------------------- the pieces

def apply_tp(model: GPT, tp_mesh, sequence_parallel: bool = False) -> None:
    """Column-parallel q/k/v and MLP up/gate, row-parallel o_proj and MLP down: each rank holds
    ``n_head/tp`` query heads and ``n_kv_head/tp`` key/value heads. Embeddings, final norm and
    LM head stay replicated. With sequence parallel the residual stream between the column and
    row projections is split along the sequence, so norms and dropout run on 1/tp of it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    sp = sequence_parallel
    out = Shard(1) if sp else Replicate()
    for block in model.blocks.values():
        plan = {
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(output_layouts=out),
            "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(output_layouts=out),
        }
        if block.mlp.gate is not None:
            plan["mlp.gate"] = ColwiseParallel()
        # attention and MLP take their input as ONE replicated DTensor (gathered from the
        # sequence shards under SP) shared by q/k/v (up/gate): the backward then sums their
        # input gradients locally and reduces once, instead of once per projection
        src = Shard(1) if sp else Replicate()
        plan["attn"] = PrepareModuleInput(input_layouts=(src, None, None, None),
                                          desired_input_layouts=(Replicate(), None, None, None))
        plan["mlp"] = PrepareModuleInput(input_layouts=(src,), desired_input_layouts=(Replicate(),))
        if sp:
            plan.update({"attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel()})
        parallelize_module(block, tp_mesh, plan)
    if sp:
        keys = [k for k in model.layer_keys if k in model.blocks]
        if model.tok_emb is not None and keys:  # embeddings are full: keep this rank's chunk
            parallelize_module(model.blocks[keys[0]], tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(), None, None, None), desired_input_layouts=(Shard(1), None, None, None),
                use_local_output=True))
        if model.norm_f is not None:  # the head is replicated: gather the sequence first
            parallelize_module(model.norm_f, tp_mesh, PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
    _replicate_rest(model, tp_mesh, skip_block_norms=sp)  # after the hooks above: they run first


def _replicate_rest(model: GPT, tp_mesh, skip_block_norms: bool) -> None:
    """Make every remaining parameter (embeddings, norms, head) a replicated DTensor that
    computes on plain tensors. Then each optimizer group holds only DTensors, which the
    multi-tensor (foreach) AdamW needs, and FSDP2 on top sees one 2-D mesh for all params."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def to_dtensor(_mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def to_local(_mod, out, _mesh):
        return out.to_local() if isinstance(out, DTensor) else out

    mods = [model.tok_emb, model.pos_emb, model.norm_f, model.lm_head]
    if not skip_block_norms:
        mods += [m for b in model.blocks.values() for m in (b.attn_norm, b.mlp_norm)]
    tied = model.cfg.tie_embeddings and model.tok_emb is not None and model.lm_head is not None
    for mod in mods:
        if mod is None:
            continue
        if mod is model.lm_head and tied:  # re-tie to the embedding's new DTensor parameter
            mod.weight = model.tok_emb.weight
        distribute_module(mod, tp_mesh, input_fn=to_dtensor, output_fn=to_local)


def apply_ac(model: GPT) -> None:
    """Recompute each block's activations in the backward (memory for compute)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    for key in list(model.blocks.keys()):
        model.blocks[key] = checkpoint_wrapper(model.blocks[key])


def apply_compile(model: GPT, per_block: bool) -> None:
    """Compile in place (``Module.compile``), so parameter names stay the same."""
    if per_block:
        for block in model.blocks.values():
            block.compile()
    else:
        model.compile()


def fsdp_mp_policy(cfg: Config, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from ..precision import resolve_precision

    want = cfg.parallel.fsdp_param_dtype
    if want == "auto":
        want = "bf16" if resolve_precision(cfg.train.precision, device) == "bf16" else "fp32"
    if want == "bf16":  # compute in bf16, reduce gradients in fp32 (sharded master weights stay fp32)
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: GPT, dp_mesh, mp_policy=None, reshard_after_forward: bool = True,
               root: Optional[nn.Module] = None) -> None:
    """``fully_shard`` each block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = mp_policy or MixedPrecisionPolicy()
    for block in model.blocks.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(root if root is not None else model, mesh=dp_mesh, mp_policy=mp,
                reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids, process_group=ctx.group("dp_replicate"))


def uses_fsdp(ctx: ParallelContext) -> bool:
    """FSDP2 when sharding (over ``dp_shard x cp``: context-parallel ranks reduce gradients like
    data-parallel ones), and for replication next to TP (DDP cannot hold DTensors)."""
    return ctx.layout.fsdp


def fsdp_mesh(ctx: ParallelContext):
    """The mesh FSDP2 shards (and, with ``dp_replicate``, replicates) over."""
    shard = "dp_shard_cp" if ctx.cp > 1 else "dp_shard"
    return ctx.submesh("dp_replicate", shard) if ctx.dp_replicate > 1 else ctx.submesh(shard)


def check_cp(model: nn.Module, cfg: Config, root: Optional[nn.Module]) -> None:
    if not isinstance(model, GPT) or (root is not None and root is not model):
        raise LayoutError("context parallelism (--parallel.cp) trains a plain GPT language model; use "
                          "--parallel.cp=1 for this model or task")
    if cfg.train.compile:
        raise LayoutError("--train.compile with context parallelism is not supported yet (the ring runs in "
                          "Python around each attention call): use one of them")


# ----------------------------------------------------------------------------- entry point

def parallelize_part(model: GPT, cfg: Config, ctx: ParallelContext, *, root: Optional[nn.Module] = None,
                     in_pipeline: bool = False) -> nn.Module:
    """Apply TP, AC, compile, FSDP2, DDP (in that order) to one model or pipeline stage.

    ``root`` is the module the outer wrappers (FSDP2's root, DDP) go around: a pipeline
    stage's :class:`~scalelm.distributed.pipeline.StageModule` around ``model``. Returns the
    module to run (the root, possibly wrapped).
    """
    if ctx.cp > 1:
        check_cp(model, cfg, root)
    root = model if root is None else root
    sharded = ctx.tp > 1 or uses_fsdp(ctx) or in_pipeline
    if ctx.tp > 1:
        apply_tp(model, ctx.submesh("tp"), cfg.parallel.sequence_parallel)
    if ctx.cp > 1:
        from .context_parallel import apply_cp

        apply_cp(model, ctx.group("cp"), ctx.cp, ctx.cp_rank)
    if cfg.train.activation_checkpointing:
        apply_ac(model)
    if cfg.train.compile:
        apply_compile(model, per_block=sharded)
    if uses_fsdp(ctx):
        # inside a pipeline every micro-batch would re-gather parameters: keep them gathered
        apply_fsdp(model, fsdp_mesh(ctx), fsdp_mp_policy(cfg, ctx.device),
                   reshard_after_forward=not in_pipeline, root=root)
    elif ctx.dp_replicate > 1:
        return apply_ddp(root, ctx)
    return root


def parallelize(model: GPT, cfg: Config, ctx: ParallelContext, root: Optional[nn.Module] = None) -> nn.Module:
    """The model to train under ``ctx``. In one process only AC and compile apply; with
    ``pp > 1`` the result is a :class:`~scalelm.distributed.pipeline.PipelineModel` holding this
    rank's stages (its ``forward_backward`` runs the schedule). ``root``: a module around
    ``model`` (e.g. a classifier) that FSDP2's root and DDP wrap instead of the GPT alone."""
    if ctx.pp > 1:
        from .pipeline import build_pipeline

        return build_pipeline(model, cfg, ctx, parallelize_part)
    return parallelize_part(model, cfg, ctx, root=root)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain ``GPT`` inside DDP / compile wrappers (FSDP2 and TP work in place)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_parts(model: nn.Module) -> list[nn.Module]:
    """The plain GPT (stage) modules this rank holds: one, or a pipeline's stages."""
    if hasattr(model, "gpt_parts"):
        return model.gpt_parts()
    return [unwrap_model(model)]


# ----------------------------------------------------------------------------- the training step

@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Wrap a micro-step's forward AND backward: with ``enabled=False`` gradients accumulate
    locally (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``); the last micro-step
    of an optimizer step runs with ``enabled=True`` and reduces them. A no-op in one process."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    if enabled or hasattr(model, "gpt_parts"):  # a pipeline schedule syncs by itself
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _tied_copy(part: nn.Module) -> Optional[nn.Parameter]:
    """On a pipeline's last stage, the LM head's copy of a tied embedding (counted once)."""
    if getattr(part, "cfg", None) is not None and part.cfg.tie_embeddings and hasattr(part, "tok_emb") \
            and part.tok_emb is None and part.lm_head is not None:  # (a task model around a GPT has no tok_emb)
        return part.lm_head.weight
    return None


def grad_norm(model: nn.Module, ctx: ParallelContext) -> torch.Tensor:
    """The L2 norm of all gradients of the whole (unsharded) model, on every rank.

    Each rank sums the squares of the gradient it holds, divided by the number of ranks that
    hold the same values (replicas over dp/tp, a tied weight on two stages counts once); one
    all-reduce over the world then gives the norm. Works for plain tensors and DTensors on any
    sub-mesh, with pipeline stages.
    """
    from torch.distributed.tensor import DTensor, Replicate

    copies_all = ctx.world_size // ctx.pp  # ranks that hold the same stage
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for part in model_parts(model):
        skip = _tied_copy(part)
        for p in part.parameters():
            if p.grad is None or p is skip:
                continue
            g = p.grad
            copies = copies_all
            if isinstance(g, DTensor):
                if any(pl.is_partial() for pl in g.placements):
                    g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl
                                                       for pl in g.placements])
                # every non-replicated dim splits the tensor (Shard, and FSDP x TP's _StridedShard,
                # which is not a Shard subclass)
                shards = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements)
                                   if not pl.is_replicate())
                copies = copies_all // shards
                g = g.to_local()
            total += g.detach().double().pow(2).sum() / copies
    if ctx.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.sqrt()


def clip_grad_norm(model: nn.Module, max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """Clip all gradients to a global L2 norm of ``max_norm``; returns the norm before clipping."""
    from torch.distributed.tensor import DTensor

    params = [p for part in model_parts(model) for p in part.parameters() if p.grad is not None]
    if not ctx.distributed:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = grad_norm(model, ctx)
    coef = max_norm / (norm.item() + 1e-6)  # a Python float: exact enough for fp64 runs
    if max_norm > 0 and coef < 1.0:
        plain = [p.grad for p in params if not isinstance(p.grad, DTensor)]
        if plain:
            torch._foreach_mul_(plain, coef)
        for p in params:  # DTensors on different meshes cannot share one foreach call
            if isinstance(p.grad, DTensor):
                p.grad.mul_(coef)
    return norm.float()
