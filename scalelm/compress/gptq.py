"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): quantize a layer column by column and push each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of
the layer's inputs (``H = X X^T``), so that ``||W X - Q X||`` stays small where the inputs are.

Algorithm 1 of the paper with its lazy batch updates: columns in blocks of ``blocksize``; inside
a block every column's error updates the rest of the block at once, the block's errors update
the columns to its right in one matrix product. int4 group parameters (scale, zero point) are
chosen when the loop reaches a group's first column, on the weights as updated so far (the
reference code's ``static_groups=False``). int8 scales are per row, from the whole weight.

Layers go in order: each block is calibrated on what the already-quantized blocks before it
produce, and inside a block each group of linears (q/k/v, o, gate/up, down) on the outputs of the
already-quantized groups before it (the block runner and Hessian sums are shared with pruning).

torchao 0.18 has GPTQ (``torchao.prototype.gptq``) but it asserts CUDA and its int4 path needs
mslk, so it does not run on a CPU; this is the algorithm on top of scalelm's own quantization grid.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..errors import UserError
from ..model.gpt import GPT
from ..model.quant import QuantLinear, dequantize_values, int4_params, int8_params, quantize_values
from .calib import BlockRunner, remove, watch_inputs
from .sparsegpt import inverse_hessian_factor
from .unstructured import GROUPS, InputStats


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, scheme: str, group_size: int = 0,
                  blocksize: int = 128, damp: float = 0.01):
    """``(values, scale, zero)`` of ``weight`` (out, in) for the layer input Hessian ``H`` (in, in):
    int8 values and per-row scales (zero None), or int4 values 0..15 (uint8) with per-group scales/zeros."""
    W = weight.detach().clone().double()
    rows, cols = W.shape
    try:
        U, dead = inverse_hessian_factor(H, damp)  # upper Cholesky factor of the dampened H^-1
    except UserError:
        raise UserError("GPTQ: the calibration Hessian is not positive definite even with heavy dampening: use "
                        "more --calib-samples") from None
    W[:, dead] = 0.0
    if scheme == "int8":
        scale, zero = int8_params(W), None
    else:
        blocksize = max(group_size, blocksize - blocksize % group_size)  # a group never straddles two blocks
        scale = torch.empty(rows, cols // group_size, dtype=torch.float16, device=W.device)
        zero = torch.empty(rows, cols // group_size, dtype=torch.uint8, device=W.device)
    Q = torch.empty(rows, cols, dtype=torch.int8 if scheme == "int8" else torch.uint8, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if scheme == "int8":
                s, z = scale, None
            else:
                g = c // group_size
                if c % group_size == 0:
                    gs, gz = int4_params(W1[:, i:i + group_size], group_size)
                    scale[:, g], zero[:, g] = gs[:, 0], gz[:, 0]
                s, z = scale[:, g:g + 1], zero[:, g:g + 1]
            w = W1[:, i]
            q = quantize_values(w[:, None], s, z)
            Q[:, c] = q[:, 0]
            err = (w - dequantize_values(q, s, z)[:, 0].double()) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q, scale, zero


def gptq_model(model: GPT, names: list[str], scheme: str, group_size: int, windows: torch.Tensor,
               batch_size: int = 8, blocksize: int = 128, damp: float = 0.01,
               log: Optional[Callable[[str], None]] = None) -> dict[str, QuantLinear]:
    """GPTQ every Linear in ``names`` (block linears, and ``lm_head``), layers in order. The float
    Linears get their quantized values written back as they go (later layers see them); returns
    the QuantLinear of each name, for the caller to swap in."""
    if model.cfg.n_shared_blocks not in (None, model.cfg.n_layer):
        raise UserError("--method gptq needs one block per layer (this model shares blocks, model.n_shared_blocks); "
                        "use --method rtn")
    model.eval()
    runner = BlockRunner(model, windows, batch_size)
    out: dict[str, QuantLinear] = {}

    def quantize(name: str, lin: nn.Linear, H: torch.Tensor) -> None:
        q, s, z = gptq_quantize(lin.weight, H, scheme, group_size, blocksize, damp)
        m = QuantLinear(lin.in_features, lin.out_features, scheme, group_size, lin.bias is not None,
                        device=lin.weight.device)
        m.set_values(q, s, z)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        with torch.no_grad():
            lin.weight.copy_(m.dequantized().to(lin.weight.dtype))  # what the next layers are calibrated on
        out[name] = m
        if log is not None:
            log(f"  {name:<28} {tuple(lin.weight.shape)!s:>14}  gptq {scheme}")

    for i, key in enumerate(model.layer_keys):
        block = model.blocks[key]
        for group in GROUPS:
            layers = {n: block.get_submodule(n) for n in group if f"blocks.{key}.{n}" in names}
            if not layers:
                continue
            stats = InputStats(layers, hessian=True)
            handles = watch_inputs(layers, stats.add)
            try:
                runner.run(block, i)
            finally:
                remove(handles)
            for n, lin in layers.items():
                quantize(f"blocks.{key}.{n}", lin, stats.sums[n])
        runner.advance(block, i)
    if "lm_head" in names:
        stats = InputStats({"lm_head": model.lm_head}, hessian=True)
        with torch.no_grad():
            for h in runner.inputs:
                stats.add("lm_head", model.norm_f(h))
        quantize("lm_head", model.lm_head, stats.sums["lm_head"])
    return out
