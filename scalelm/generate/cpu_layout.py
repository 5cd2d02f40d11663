"""Inference-only preparation of a ``GPT``, applied from outside like any other wrapper.

Decoding one token is a matrix-vector product per weight, bound by memory bandwidth, and on
CPU how fast the BLAS streams a weight depends on how the weight is laid out:

* fp32: MKL reads a weight much faster when its long side is contiguous. A wide ``nn.Linear``
  (more outputs than inputs: the LM head, the MLP's up and gate projections) stored as
  ``(out, in)`` ran up to several times slower than the same weight stored ``(in, out)``; a
  narrow one (the down projection) is faster as it is. So every Linear with
  ``out_features >= in_features`` gets its weight stored transposed.
* bf16: PyTorch's eager bf16 product is no faster than fp32 at batch 1; oneDNN with the weight
  reordered once into its blocked layout (what Inductor's freezing does) was about 2x faster
  on the LM head at batch 1 and 4x at batch 8. So every Linear gets a oneDNN-packed weight.
* fp32 with several rows at once (batched decoding) on the LM head: MKL's matrix product packs
  the 50257-wide weight on every call; the oneDNN-reordered copy (made on first use, so batch-1
  decoding does not pay its memory) was 2x faster.

Both live in a structural copy of the model that shares every other tensor (:func:`pack_linears`);
the trained model and its weight names are untouched. ``benchmarks/bench_generate.py --plain``
measures the gain against plain ``nn.Linear`` in the same run. ``compile_decode_step`` compiles
the one-token step with freezing instead: not faster than these packed eager paths in our runs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..model.gpt import GPT


def onednn_bf16_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """Same result as the ``nn.Linear`` it replaces, with the weight laid out for fast decoding:
    transposed (``y = x @ W.T``, for fp32) or oneDNN-reordered (for bf16)."""

    def __init__(self, lin: nn.Linear, onednn: bool = False):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        self.onednn = onednn
        self.packed = None  # an opaque oneDNN tensor: kept out of state_dict()/to() on purpose
        if onednn:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        else:
            self.register_buffer("weight_t", w.t().contiguous())
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if (not self.onednn and x2.shape[0] > 1 and self.out_features >= 8 * self.in_features
                and self.weight_t.dtype == torch.float32):  # (oneDNN's bf16 reorder needs AVX512 / AVX-NE-CONVERT)
            if self.packed is None and torch.backends.mkldnn.is_available():  # the LM head, batched
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight_t.t(), x2.shape[0])
            if self.packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.packed, self.bias, "none",
                                                          [], "").view(*x.shape[:-1], self.out_features)
        if self.onednn:
            y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.packed, self.bias, "none", [], "")
        elif self.bias is None:
            y = torch.mm(x2, self.weight_t)
        else:
            y = torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)


def shallow_copy(model: nn.Module) -> nn.Module:
    """New module objects, same parameter and buffer tensors (no weight memory is duplicated)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def pack_linears(model: GPT) -> GPT:
    """A copy of ``model`` for CPU decoding with its Linear weights laid out as explained above."""
    out = shallow_copy(model).eval()
    for mod in list(out.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is not nn.Linear:
                continue
            if child.weight.dtype == torch.bfloat16 and onednn_bf16_available():
                setattr(mod, name, PackedLinear(child, onednn=True))
            elif child.weight.dtype == torch.float32 and child.out_features >= child.in_features:
                setattr(mod, name, PackedLinear(child))
    return out


def param_count(cfg) -> int:
    """The model's unique parameters (``GPT.num_params``: a tied head once) from its config alone.
    Counting a decoding model's ``parameters()`` falls short: a packed copy holds its Linear weights
    as buffers, a quantized model its int weights, and an ONNX session none of them. A bare model
    built on the meta device allocates nothing."""
    from ..model.build import build_model

    with torch.device("meta"):
        return build_model(cfg).num_params()


def should_pack(device: torch.device) -> bool:
    """Only CPU BLAS shows the layout gap; cuBLAS is as fast with either layout."""
    return device.type == "cpu"


def compile_decode_step(model: GPT):
    """``torch.compile`` for the decode step: dynamic shapes (one graph for every cache
    position), weights frozen as constants. Compilation happens on the first call."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, dynamic=True)

    def step(*args, **kwargs):
        with inductor_config.patch(freezing=True):  # read when (re)compiling, not per call
            return compiled(*args, **kwargs)

    return step
