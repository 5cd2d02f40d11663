"""Validation loss during training (and for ``scalelm eval``): summed cross-entropy over fixed windows.

Bits per byte is ``loss / ln 2 * tokens / bytes``: the cost of the text itself, so models with
different tokenizers compare directly. ``bytes`` per token is the split's average (from
``meta.json``), which is exact for the whole split and an estimate for a capped subset.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.loader import eval_batches
from ..model.loss import IGNORE_INDEX


def loss_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
              ) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of target tokens) over ``batches``."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                with autocast():
                    _, loss = model(x, y)
                n = (y != IGNORE_INDEX).sum()
                # the model returns the mean over counted targets (NaN for none: a padding batch)
                total += torch.where(n > 0, loss.double() * n, torch.zeros_like(total))
                count += n
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return float(total), int(count)


def summarize(loss_sum: float, tokens: int, bytes_per_token: float) -> dict:
    if tokens == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "bits_per_byte": float("nan"), "tokens": 0}
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / math.log(2) / bytes_per_token, "tokens": tokens}


def evaluate(model: nn.Module, data, split: str = "val", batch_size: int = 8, seq_len: Optional[int] = None,
             max_batches: Optional[int] = None, device: Optional[torch.device] = None,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             dp_rank: int = 0, dp_world: int = 1) -> dict:
    """Evaluate on the fixed windows of ``split`` (see ``eval_batches``); every rank gets the totals."""
    seq_len = seq_len or model.cfg.block_size
    device = device or next(model.parameters()).device
    batches = list(eval_batches(data.tokens(split), batch_size, seq_len, max_batches, dp_rank=dp_rank,
                                dp_world=dp_world))
    replicas = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # sharded models (FSDP/TP/PP) run collectives in every forward: every rank must run the
        # same number of batches, so ranks with fewer add padding batches that count nothing
        n = torch.tensor(len(batches), device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        pad = torch.zeros(1, seq_len, dtype=torch.long)
        batches += [(pad, torch.full_like(pad, IGNORE_INDEX))] * (int(n) - len(batches))
        replicas = dist.get_world_size() // dp_world  # tensor/pipeline peers count the same batches
    loss_sum, tokens = loss_sums(model, batches, device, autocast)
    return summarize(loss_sum / replicas, tokens // replicas, data.bytes_per_token(split))
