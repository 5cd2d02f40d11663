"""One optimizer step as ``scalelm train`` takes it, without the run around it.

:class:`TrainStep` holds what a step needs: the model that runs (plain, parallelised, or a
pipeline's stages), its precision (autocast, or bf16 weights with fp32 masters where those are
the default: ``master_weights.wants_master_weights``), AdamW, fp16's gradient scaler, and the
clipping. Calling it with a step's micro-batches accumulates their gradients (synchronised across
data-parallel ranks on the last one only), clips, steps and clears them.

The ``Trainer`` composes one. The probes that time or measure a step (``scalelm demo``,
``--preset auto``, the sweep's calibration, the memory probe) build one with
:func:`scalelm.train.probe.probe_step`, so what they time is the step a run takes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..config import Config, ConfigError
from ..distributed.mesh import ParallelContext
from ..distributed.parallelize import clip_grad_norm, grad_sync
from ..distributed.pipeline import PipelineModel
from ..precision import autocast_context, pick_device, resolve_precision
from .optim import build_optimizer


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy: ``batch`` is ``(inputs, targets)``."""
    x, y = batch
    return model(x, y)[1]


class TrainStep:
    """``step(micro_batches) -> (mean loss, gradient norm before clipping)``; both detached tensors."""

    def __init__(self, cfg: Config, model: nn.Module, *, raw_model: Optional[nn.Module] = None,
                 ctx: Optional[ParallelContext] = None, loss_fn: Callable = default_loss):
        """``model`` is what runs; ``raw_model`` the plain module under it whose weights master
        weights cast and checkpoints save (default: ``model``). ``ctx``: the process's place in the
        layout (default: one process on ``cfg.train.device``). ``cfg.train`` gives the precision and
        master weights, ``cfg.optim`` AdamW and the clipping."""
        from . import master_weights

        self.cfg = cfg
        self.ctx = ctx or ParallelContext(device=pick_device(cfg.train.device))
        self.device = self.ctx.device
        self.model, self.loss_fn = model, loss_fn
        self.raw_model = model if raw_model is None else raw_model
        self.pipelined = isinstance(model, PipelineModel)  # its schedule runs every micro-batch itself
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.autocast = autocast_context(self.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.master = None
        if master_weights.wants_master_weights(cfg, self.precision, self.device, self.ctx.distributed,
                                               pipelined=self.pipelined):
            self.master = self._master_weights()
        self.optimizer = build_optimizer(model, cfg.optim, master=self.master)

    def _master_weights(self):
        """bf16 weights with fp32 masters (``--train.master_weights``): checks, then casts the model."""
        from . import master_weights

        if self.precision != "bf16":
            raise ConfigError(f"--train.master_weights=true keeps bf16 weights: it needs --train.precision=bf16 "
                              f"(or auto on hardware with bf16), not {self.precision}")
        if self.ctx.distributed:
            raise ConfigError("--train.master_weights=true is for one process; under torchrun FSDP2 keeps fp32 "
                              "masters and computes in bf16 already (--parallel.dp_shard with "
                              "--parallel.fsdp_param_dtype=bf16)")
        self.autocast = autocast_context("fp32", self.device)  # the weights are bf16: nothing to cast
        return master_weights.MasterWeights(self.raw_model, torch.bfloat16)

    def full_precision(self):
        """Inside: the model's parameters are the fp32 masters (for saving and loading checkpoints)."""
        return self.master.fp32_view(self.raw_model) if self.master is not None else contextlib.nullcontext()

    def forward_backward(self, micro_batches: list) -> torch.Tensor:
        """Accumulate gradients over the step's micro-batches; returns their mean loss (detached).

        Each micro-loss is divided by the number of micro-batches, so k micro-batches of size
        b give the gradient of one batch of size k*b.
        """
        if self.pipelined:
            return self._pipeline_forward_backward(micro_batches)
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            with grad_sync(self.model, enabled=i == n - 1):
                with self.autocast():
                    loss = self.loss_fn(self.model, batch)
                scaled = loss / n
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if self.master is not None:  # sum the micro-batches' bf16 gradients in fp32
                self.master.grads_to_master()
            total += loss.detach().float()
        return total / n

    def _pipeline_forward_backward(self, micro_batches: list) -> torch.Tensor:
        """The schedule (GPipe / 1F1B / interleaved) runs forward and backward of every micro-batch;
        stages before the last have no loss and return 0 (the logged loss is reduced from the last)."""
        if self.loss_fn is not default_loss or self.scaler is not None:
            raise ConfigError("pipeline parallelism (--parallel.pp > 1) trains the language-model loss in "
                              "bf16 or fp32; use --parallel.pp=1 for other objectives or fp16")
        with self.autocast():
            loss = self.model.forward_backward(micro_batches)
        return loss.float() if loss is not None else torch.zeros((), device=self.device)

    def __call__(self, micro_batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.forward_backward(micro_batches)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip
        if self.master is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.master.params if p.grad is not None],
                                                  clip if clip > 0 else math.inf)
        else:
            norm = clip_grad_norm(self.model, clip if clip > 0 else math.inf, self.ctx)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            self.master.master_to_model()
        return loss, norm
