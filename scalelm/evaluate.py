"""Loss, perplexity and bits per byte of a model on a data split (``scalelm eval``).

Bits per byte is ``loss / ln 2 * tokens / bytes``: the cost of the text itself, so models with
different tokenizers compare directly. ``bytes`` per token is the split's average (from
``meta.json``), which is exact for the whole split and an estimate for a capped subset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .model import IGNORE_INDEX


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
    from .data.loader import eval_batches

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


# ----------------------------------------------------------------------------- CLI

def add_eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="a model directory, or a RUN_DIR (its latest checkpoint)")
    p.add_argument("--data", required=True, help="a DATA_DIR written by `scalelm prepare`")
    p.add_argument("--split", default="val", help="which split to score (default: val)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's block_size)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="cap the number of batches (spread evenly over the split); default: the whole split")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 where the hardware has it, else fp32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def run_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_model_dir, read_tokenizer_json, resolve_checkpoint
    from .data.loader import DataError, TokenData
    from .data.tokenizer import check_same_tokenizer
    from .errors import UserError
    from .precision import autocast_context, pick_device, resolve_precision

    ckpt = resolve_checkpoint(args.ckpt)
    data = TokenData(args.data)
    if args.split not in data.splits:
        raise DataError(f"{args.data} has no split '{args.split}' (it has: {', '.join(data.splits)})")
    device = pick_device(args.device)
    model = load_model_dir(ckpt, device=device)
    if data.vocab_size > model.cfg.vocab_size:
        raise DataError(f"{args.data} has a vocabulary of {data.vocab_size} tokens but the model in {ckpt} "
                        f"knows only {model.cfg.vocab_size}: evaluate on data prepared with the model's tokenizer")
    check_same_tokenizer(data.dir, read_tokenizer_json(ckpt), what=f"the checkpoint {ckpt}")
    seq_len = args.seq_len or model.cfg.block_size
    if seq_len > model.cfg.block_size or seq_len < 1:
        raise UserError(f"--seq-len must be between 1 and the model's block_size {model.cfg.block_size}")
    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise UserError("--batch-size and --max-batches must be positive")
    data.check_window(args.split, seq_len)
    precision = resolve_precision(args.precision, device)
    print(f"evaluating {ckpt} on {args.data} [{args.split}] with {precision} on {device}", file=sys.stderr)
    res = evaluate(model, data, args.split, args.batch_size, seq_len, args.max_batches, device,
                   autocast_context(precision, device))
    print(json.dumps(res))
    return 0
