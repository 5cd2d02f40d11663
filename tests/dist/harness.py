"""Shared by the torchrun worker scripts: a tiny model, a parallel training loop driven by the
real engine (init_parallel / parallelize / grad_sync / clip_grad_norm / BatchLoader), and a
single-process reference run on the same global batches."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from scalelm.config import Config, ModelConfig
from scalelm.data import BatchLoader
from scalelm.distributed import (all_reduce_mean_loss, clip_grad_norm, destroy_parallel, grad_sync, init_parallel,
                                 model_parts, parallelize)
from scalelm.model import GPT
from scalelm.train.optim import build_optimizer

STYLES = {
    "gpt2": dict(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=32, pos_embedding="learned",
                 norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, dropout=0.0),
    "llama": dict(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
                  pos_embedding="rope", norm="rmsnorm", mlp="swiglu", intermediate_size=64, bias=False,
                  tie_embeddings=True, dropout=0.0),
}
# Llama with a sliding window shorter than the 16-token sequences: layers 0 and 2 local, 1 and 3 global
STYLES["window"] = dict(STYLES["llama"], sliding_window=4, sliding_window_pattern=2)
TOKENS = np.random.default_rng(0).integers(0, 64, 20_000).astype(np.uint16)
MICRO, MICROS_PER_STEP, CLIP = 2, 4, 0.5  # micro batch rows; micro-batches per step over all dp ranks


def make_cfg(style: str = "gpt2", **parallel) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(**STYLES[style])
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip = 1e-2, 0.1, CLIP
    cfg.optim.fused = False
    cfg.parallel.timeout_s = 60
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def fresh_model(cfg: Config) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg.model)
    if cfg.lora.r > 0:  # adapters on a frozen base (seeded: the same A on every rank and in the reference)
        from scalelm.lora import apply_lora

        apply_lora(model, cfg.lora)
    return model


def train_steps(model, opt, loader, ctx, steps: int, accum: int) -> list[float]:
    """One optimizer step = ``accum`` micro-batches per rank (or one pipeline schedule)."""
    losses = []
    for _ in range(steps):
        if hasattr(model, "forward_backward"):
            local = model.forward_backward([loader.next_batch() for _ in range(accum)])
        else:
            local = torch.zeros(())
            for m in range(accum):
                x, y = loader.next_batch()
                with grad_sync(model, enabled=m == accum - 1):
                    loss = model(x, y)[1] / accum
                    loss.backward()
                local += loss.detach()
        clip_grad_norm(model, CLIP, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(all_reduce_mean_loss(local, ctx)))
    return losses


def reference(cfg: Config, steps: int):
    """The same training on one process: the global batch as MICROS_PER_STEP micro-batches."""
    from scalelm.distributed import ParallelContext

    model = fresh_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    loader = BatchLoader(TOKENS, MICRO, cfg.model.block_size, grad_accum_steps=MICROS_PER_STEP, seed=1)
    losses = train_steps(model, opt, loader, ParallelContext(), steps, MICROS_PER_STEP)
    return model, losses


def full_params(model) -> dict[str, torch.Tensor]:
    """This rank's parameters as full tensors under the plain model's names (a tied head on a
    pipeline's last stage is reported as the embedding it copies)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for part in model_parts(model):
        for name, p in part.named_parameters():
            name = name.replace("_checkpoint_wrapped_module.", "")
            if name == "lm_head.weight" and part.cfg.tie_embeddings:
                name = "tok_emb.weight"
            out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
    return out


def max_param_diff(model, ref) -> float:
    ref_p = dict(ref.named_parameters())
    mine = full_params(model)
    diff = max((mine[n] - ref_p[n]).abs().max().item() for n in mine)
    t = torch.tensor(diff, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def setup(cfg: Config):
    """(ctx, model, optimizer, loader, accum): the same global batch on any layout."""
    ctx = init_parallel(cfg)
    model = parallelize(fresh_model(cfg), cfg, ctx)
    opt = build_optimizer(model, cfg.optim)
    accum = MICROS_PER_STEP // ctx.dp_world
    loader = BatchLoader(TOKENS, MICRO, cfg.model.block_size, grad_accum_steps=accum,
                         dp_rank=ctx.dp_rank, dp_world=ctx.dp_world, seed=1)
    return ctx, model, opt, loader, accum


def report(**row) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(row), flush=True)


def main_guard(fn) -> None:
    fn()
    destroy_parallel()  # only after success: a failing rank must not wait for the others
    # The work is done and reported. Skip interpreter finalization: gloo's worker threads can
    # still hold tensors then, and freeing them without a live interpreter aborts the process
    # ("terminate called without an active exception"; see pytorch/pytorch PR 179291), which
    # made a finished worker fail about one full-suite run in two under load.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
