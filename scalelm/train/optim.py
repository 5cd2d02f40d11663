"""AdamW with decay / no-decay parameter groups, and learning-rate schedules.

Weight decay applies to the weights of linear layers only: never to norms, biases or
embeddings (a tied LM head is the embedding, so it is not decayed either). The schedule is a
pure function of the step, so resuming needs nothing but the step and a changed
``max_steps`` reshapes the rest of the curve as the user expects.
"""

from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn as nn

from ..config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (linear weights) and ``no_decay`` (everything else).

    Works on wrapped models (compile, DDP, activation checkpointing, FSDP2/TP DTensors):
    it looks at which module owns each parameter, not at names or shapes.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_weight_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in linear_weight_ids and id(p) not in embedding_ids:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def _fused_available(params: list[torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return all(p.device.type in ("cuda", "cpu") and not isinstance(p, DTensor) for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig, master=None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused kernels where available (5x faster than foreach
    on this CPU for a 4-layer 256-wide model), else the multi-tensor ``foreach`` path. With
    ``master`` (:class:`~scalelm.master_weights.MasterWeights`) it updates the fp32 masters."""
    # an empty group (e.g. no decayed weights when only LoRA adapters train) breaks DCP's
    # flattened optimizer state dicts, which the sharded checkpoints use
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if master is not None:
        for g in groups:
            g["params"] = [master.master_of(p) for p in g["params"]]
    params = [p for g in groups for p in g["params"]]
    fused = _fused_available(params) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, cfg: OptimConfig, max_steps: int, warmup: Optional[int] = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    ``cosine``: linear warmup, then cosine from ``lr`` down to ``min_lr`` at ``max_steps``.
    ``wsd`` (warmup-stable-decay): warmup, flat at ``lr``, then a linear decay to ``min_lr``
    over the last ``decay_fraction`` of the steps. ``constant``: warmup, then flat. ``warmup``
    replaces ``cfg.warmup_steps`` (a time-budgeted run scales it to its projected length).
    """
    warmup = max(0, cfg.warmup_steps if warmup is None else warmup)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * max_steps))
        decay_start = max(warmup, max_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        frac = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    # cosine
    if step >= max_steps:
        return cfg.min_lr
    frac = (step - warmup) / max(1, max_steps - warmup)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
