"""The SFT step's loss and the validation pass (mean loss over reply tokens)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ...model.loss import IGNORE_INDEX
from ...model.masks import document_mask
from ...train.validation import loss_sums
from .batches import eval_batches
from .encode import Encoded


def sft_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over the supervised targets of a micro-batch: ``(x, y)`` (padded rows)
    or ``(x, y, doc)`` (packed rows: attention stays within each example, positions restart)."""
    if len(batch) == 2:
        x, y = batch
        return model(x, y)[1]
    x, y, doc = batch
    mask, pos = document_mask(doc)
    return model(x, y, attn_mask=mask, pos_ids=pos)[1]


def completion_loss(model, examples: list[Encoded], batch_size: int, device, autocast, fill: int = 0,
                    dp_rank: int = 0, dp_world: int = 1) -> dict:
    """``{"loss", "perplexity", "supervised_tokens"}`` over ``examples``' reply tokens; every rank gets
    the totals (ranks with fewer batches run empty ones: sharded models need every rank in each forward)."""
    batches = eval_batches(examples, batch_size, fill, dp_rank, dp_world)
    replicas = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        n = torch.tensor(len(batches), device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        pad = torch.zeros(1, 1, dtype=torch.long)
        batches += [(pad, torch.full_like(pad, IGNORE_INDEX))] * (int(n) - len(batches))
        replicas = dist.get_world_size() // dp_world
    total, count = loss_sums(model, batches, device, autocast)
    total, count = total / replicas, count // replicas
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if count else float("nan"),
            "supervised_tokens": count}


def make_evaluate_fn(val: list[Encoded], batch_size: int, fill: int = 0):
    def evaluate_fn(trainer) -> dict:
        return completion_loss(trainer.model, val, batch_size, trainer.device, trainer.autocast, fill,
                               trainer.ctx.dp_rank, trainer.ctx.dp_world)
    return evaluate_fn
