"""Unstructured and N:M weight pruning of a ``GPT``'s block linears: magnitude, Wanda, SparseGPT.

Masks are boolean tensors shaped like the weight, ``True`` where a weight is removed (set to 0).

- magnitude: the smallest ``|W|`` of each layer as a whole.
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  ``|W_ij| * ||X_j||_2`` (``X_j``: input feature j over all calibration tokens), compared within
  each output row.
- SparseGPT (Frantar & Alistarh 2023): see :mod:`scalelm.compress.sparsegpt`.

N:M (``--pattern 2:4``) keeps at most N nonzero weights in every M consecutive inputs of a row
(NVIDIA's and ``torch.sparse``'s convention: 2:4 is 50%), choosing by the method's score.

Layers are pruned in order (Wanda's and SparseGPT's reference code work block by block): each
block sees the outputs of the pruned blocks before it, and inside a block each group of linears
(q/k/v, then o, then gate/up, then down) is pruned on the inputs its already-pruned
predecessors produce.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError
from ..model.gpt import GPT
from .calib import BlockRunner, check_prunable, remove, watch_inputs

METHODS = ("magnitude", "wanda", "sparsegpt")
# one block's linears in the order their inputs are computed
GROUPS = (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.o_proj",), ("mlp.gate", "mlp.up"), ("mlp.down",))


def parse_pattern(pattern: Optional[str]) -> Optional[tuple[int, int]]:
    """``"2:4"`` -> (2, 4): at most 2 nonzero weights in every 4 consecutive inputs."""
    if pattern is None:
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise UserError(f"--pattern {pattern!r} is not N:M (e.g. 2:4: 2 nonzero weights in every 4)") from None
    if not 0 < n < m:
        raise UserError(f"--pattern {pattern}: N:M needs 0 < N < M (2:4 keeps 2 weights of every 4)")
    return n, m


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest entries in each row of ``score`` (2-D)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``m - n`` lowest scores in every group of ``m`` consecutive columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise UserError(f"the {n}:{m} pattern needs layer inputs in multiples of {m}; a layer has {cols}")
    return _lowest(score.reshape(-1, m), m - n).reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]] = None) -> torch.Tensor:
    score = weight.abs().float()
    if nm is not None:
        return nm_mask(score, *nm)
    return _lowest(score.reshape(1, -1), int(weight.numel() * sparsity)).reshape(weight.shape)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float,
               nm: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``input_norm[j]`` = ``||X_j||_2`` of input feature j over the calibration tokens."""
    score = weight.abs().float() * input_norm.float()[None, :]
    if nm is not None:
        return nm_mask(score, *nm)
    return _lowest(score, int(weight.shape[1] * sparsity))


class InputStats:
    """Per linear: the sum of squared inputs per feature (Wanda) or ``sum x x^T`` (SparseGPT)."""

    def __init__(self, layers: dict[str, nn.Linear], hessian: bool):
        self.hessian = hessian
        self.sums = {n: torch.zeros((m.in_features,) * (2 if hessian else 1), device=m.weight.device)
                     for n, m in layers.items()}
        self.tokens = 0

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.hessian:
            self.sums[name].addmm_(x.T, x)
        else:
            self.sums[name] += x.square().sum(0)


def prune_layer(layer: nn.Linear, method: str, sparsity: float, nm, stats: Optional[torch.Tensor],
                blocksize: int = 128, damp: float = 0.01) -> None:
    """Prune one linear in place from its calibration statistics."""
    w = layer.weight
    with torch.no_grad():
        if method == "magnitude":
            w.masked_fill_(magnitude_mask(w, sparsity, nm), 0.0)
        elif method == "wanda":
            w.masked_fill_(wanda_mask(w, stats.sqrt(), sparsity, nm), 0.0)
        else:
            from .sparsegpt import sparsegpt_prune

            new, _ = sparsegpt_prune(w, stats, sparsity, nm, blocksize=blocksize, damp=damp)
            w.copy_(new.to(w.dtype))


def prune_unstructured(model: GPT, method: str, sparsity: float, nm: Optional[tuple[int, int]] = None,
                       windows: Optional[torch.Tensor] = None, batch_size: int = 8, blocksize: int = 128,
                       damp: float = 0.01, log=None) -> dict[str, float]:
    """Prune every block linear of ``model`` in place; returns the achieved sparsity per layer."""
    if method not in METHODS:
        raise UserError(f"unknown pruning method {method!r}: one of {', '.join(METHODS)} or structured")
    if nm is not None:
        sparsity = 1 - nm[0] / nm[1]
    if not 0 <= sparsity < 1:
        raise UserError(f"--sparsity must be in [0, 1), got {sparsity}")
    check_prunable(model)
    model.eval()
    runner = None
    if method != "magnitude":
        if windows is None:
            raise UserError(f"--method {method} needs calibration data: --calib DATA_DIR")
        runner = BlockRunner(model, windows, batch_size)
    achieved: dict[str, float] = {}
    for i, key in enumerate(model.layer_keys):
        block = model.blocks[key]
        for group in GROUPS:
            layers = {n: block.get_submodule(n) for n in group if _has(block, n)}
            stats = None
            if runner is not None:
                stats = InputStats(layers, hessian=method == "sparsegpt")
                handles = watch_inputs(layers, stats.add)
                try:
                    runner.run(block, i)
                finally:
                    remove(handles)
            for n, layer in layers.items():
                prune_layer(layer, method, sparsity, nm, None if stats is None else stats.sums[n], blocksize, damp)
                name = f"blocks.{key}.{n}"
                achieved[name] = float((layer.weight == 0).float().mean())
                if log is not None:
                    log(f"  {name:<28} {tuple(layer.weight.shape)!s:>14}  sparsity {achieved[name]:.4f}")
        if runner is not None:
            runner.advance(block, i)
    return achieved


def _has(block: nn.Module, name: str) -> bool:
    try:
        return block.get_submodule(name) is not None
    except AttributeError:
        return False


def sparsity_report(model: GPT, per_layer: dict[str, float]) -> dict:
    """Overall figures: over the pruned linears and over all parameters (zeros counted once).

    ``prunable_weights``: the weights of the linears pruning looked at; ``pruned_weights``: how
    many of them are zero now (``linear_sparsity`` is the one over the other)."""
    prunable = sum(model.get_parameter(f"{n}.weight").numel() for n in per_layer)
    zeros_pruned = sum(int((model.get_parameter(f"{n}.weight") == 0).sum()) for n in per_layer)
    params = model.num_params()
    zeros_all = sum(int((p == 0).sum()) for p in model.parameters())
    return {"linear_sparsity": zeros_pruned / max(1, prunable), "prunable_weights": prunable,
            "pruned_weights": zeros_pruned, "model_sparsity": zeros_all / max(1, params), "params": params,
            "nonzero_params": params - zeros_all}


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


__all__ = ["METHODS", "magnitude_mask", "wanda_mask", "nm_mask", "parse_pattern", "prune_unstructured",
           "sparsity_report"]
