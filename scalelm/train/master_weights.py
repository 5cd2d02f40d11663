"""Low-precision weights with fp32 master copies: the model computes in bf16, AdamW updates fp32.

Autocast keeps fp32 weights and re-casts every weight and every matmul input to bf16 on each
forward, and keeps the residual stream, norms and their gradients in fp32. Storing the weights
in bf16 instead makes the whole forward and backward bf16 (norm statistics and the loss's
log-softmax are still computed in fp32 inside the model), so there are no per-step casts and
half the memory traffic; the optimizer owns fp32 copies, so small updates are not rounded
away. On this project's CPU it is the fastest setting (README "Performance"). The trainer uses
it by default where it applies: bf16 precision on a CPU, one process, no LoRA, no pipeline stages
(:func:`wants_master_weights`, asked by ``step.TrainStep``; the run's summary says ``"master_weights": true``).
``--train.master_weights=true`` asks for it anywhere it can run (an error where it cannot:
not bf16, or under torchrun), ``false`` keeps fp32 weights with bf16 autocast. The trainer saves
and loads checkpoints through :meth:`MasterWeights.fp32_view`, so they hold the fp32 masters and
a resumed run continues bit for bit.

    mw = MasterWeights(model)                 # casts the model's floating-point params to bf16
    opt = torch.optim.AdamW(mw.params, ...)   # the optimizer sees the fp32 masters
    loss.backward(); mw.grads_to_master(); opt.step(); opt.zero_grad(); mw.master_to_model()

Gradients are produced in bf16 for one micro-batch at a time; with gradient accumulation,
call ``grads_to_master()`` after every backward so the sum is taken in fp32.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def wants_master_weights(cfg, precision: str, device: torch.device, distributed: bool = False,
                         pipelined: bool = False) -> bool:
    """``--train.master_weights``: true/false as given; unset (auto): on where it applies and is
    as exact as autocast, i.e. all of: bf16 precision, a CPU (on GPUs autocast stays the default),
    one process (under torchrun FSDP2 keeps fp32 masters itself), no LoRA (the frozen base has no
    fp32 copy and would be held and run in bf16; its adapters are a sliver of the work anyway) and no
    pipeline stages (a torchrun layout). Task models, encoder-decoders, distillation students (the
    teacher is outside the model, bf16 already), compile and activation checkpointing train with it."""
    if cfg.train.master_weights is not None:
        return cfg.train.master_weights
    return (precision == "bf16" and device.type == "cpu" and not distributed and cfg.lora.r == 0
            and cfg.parallel.pp == 1 and not pipelined)


class MasterWeights:
    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        seen: set[int] = set()
        self.model_params: list[nn.Parameter] = []
        frozen: list[nn.Parameter] = []  # e.g. a LoRA base: cast to bf16 too, but no fp32 copy to keep
        for p in model.parameters():  # tied weights appear once
            if id(p) not in seen and p.is_floating_point():
                seen.add(id(p))
                (self.model_params if p.requires_grad else frozen).append(p)
        self.params = [nn.Parameter(p.detach().clone().float()) for p in self.model_params]
        self.dtype = dtype
        self._master_of = {id(p): m for p, m in zip(self.model_params, self.params)}
        with torch.no_grad():
            for p in self.model_params + frozen:
                p.data = p.data.to(dtype)

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Add the model's low-precision gradients into the masters' fp32 ``.grad``; clear them."""
        for m, p in zip(self.params, self.model_params):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Copy the updated fp32 masters into the model's low-precision weights."""
        torch._foreach_copy_(self.model_params, self.params)

    def master_of(self, p: torch.Tensor) -> nn.Parameter:
        """The fp32 master of one of the model's parameters (for building optimizer groups)."""
        return self._master_of[id(p)]

    @contextlib.contextmanager
    def fp32_view(self, model: nn.Module):
        """Inside this block the model's parameters *are* the fp32 masters (the same objects the
        optimizer holds, so state-dict helpers that key optimizer state by parameter name work):
        saving writes full-precision weights, and loading fills the masters, which are cast back
        into the model's low-precision weights on exit."""
        swapped = []
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and id(p) in self._master_of:
                    swapped.append((mod, name, p))
                    mod._parameters[name] = self._master_of[id(p)]
        try:
            yield
        finally:
            for mod, name, p in swapped:
                mod._parameters[name] = p
            self.master_to_model()
