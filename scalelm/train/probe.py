"""The training step of a config, on a fresh model, with no run around it: for the probes.

``scalelm demo`` and ``--preset auto`` time a step to size a run for the minutes given, the
sweep's calibration times one per model size, and the memory probe measures one's peak. Each
builds the step :class:`~scalelm.train.step.TrainStep` the trainer would take for the config
(its precision, master weights, AdamW, clipping, activation checkpointing and compile), so the
time or memory measured is the run's. No run directory and no ``Trainer``: nothing is written.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Optional

import torch
import torch.nn as nn

from ..config import Config, ModelConfig
from .step import TrainStep


def probe_step(cfg: Config, model: Optional[nn.Module] = None) -> TrainStep:
    """The step the trainer takes for ``cfg``, in one process on ``cfg.train.device``, for ``model``
    (default: a freshly initialised ``cfg.model``; the caller seeds it)."""
    from ..distributed.mesh import ParallelContext
    from ..distributed.parallelize import parallelize
    from ..model.build import build_model
    from ..precision import pick_device

    ctx = ParallelContext(device=pick_device(cfg.train.device))
    model = (build_model(cfg.model) if model is None else model).to(ctx.device)
    return TrainStep(cfg, parallelize(model, cfg, ctx), raw_model=model, ctx=ctx)


def random_batch(step: TrainStep, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, x)``: random token windows as the language-model loss takes them (their values do not
    change the work)."""
    m = step.cfg.model
    x = torch.randint(0, m.vocab_size, (micro_batch, m.block_size), device=step.device)
    return x, x


def time_steps(cfg: Config, model_cfg: Optional[ModelConfig] = None, *, micro_batch: int, accum: int = 1,
               repeats: int = 2) -> float:
    """Median wall seconds of one optimizer step (``accum`` micro-batches of ``micro_batch`` x
    block_size tokens) of a fresh model, over ``repeats`` steps after one warm-up step (the
    allocator, kernels, the optimizer's state). The caller's random state is left as it was."""
    if model_cfg is not None:
        cfg = dataclasses.replace(cfg, model=model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        step = probe_step(cfg)
        micro_batches = [random_batch(step, micro_batch)] * accum
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            step(micro_batches)
            if step.device.type == "cuda":
                torch.cuda.synchronize(step.device)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)
