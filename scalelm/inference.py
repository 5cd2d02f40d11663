"""Inference-only preparation of a ``GPT``, applied from outside like any other wrapper.

Decoding one token is a matrix-vector product per weight, bound by memory bandwidth. On CPU,
MKL's product with an ``nn.Linear`` weight as stored, ``(out, in)``, reaches a fraction of the
bandwidth that the same product reaches with the weight laid out ``(in, out)`` (measured in
``benchmarks/bench_generate.py``: several times faster for a 50257-wide LM head). So for CPU
decoding every ``Linear`` is swapped for a :class:`PackedLinear` holding its weight transposed,
in a structural copy of the model that shares every other tensor; the trained model and its
weight names are untouched.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .model import GPT


class PackedLinear(nn.Module):
    """``y = x @ W_t + b`` with ``W_t = W.T`` stored contiguously: same result as ``nn.Linear``."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_buffer("weight_t", lin.weight.detach().t().contiguous())
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.mm(x2, self.weight_t) if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)


def shallow_copy(model: nn.Module) -> nn.Module:
    """New module objects, same parameter and buffer tensors (no weight memory is duplicated)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def pack_linears(model: GPT) -> GPT:
    """A copy of ``model`` for decoding whose Linear weights are stored ``(in, out)``."""
    out = shallow_copy(model).eval()
    for name, mod in list(out.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                setattr(mod, child_name, PackedLinear(child))
    return out


def should_pack(device: torch.device) -> bool:
    """Only CPU BLAS shows the layout gap; cuBLAS is as fast with either layout."""
    return device.type == "cpu"
