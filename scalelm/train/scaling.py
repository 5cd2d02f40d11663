"""What ``--preset auto`` and ``scalelm sweep`` share about scaling: one model family, the
published laws and the learning rate for a size. Here, below both (``analysis`` imports ``train``).

The family fixes the shape so that size is the only thing that varies: width ``d`` is a multiple
of ``head_dim`` (32) and depth is ``round(d / aspect)`` but at least 2 (aspect 32, so 32 and 64
wide have 2 layers, 128 has 4, 256 has 8). Kaplan et al. (2020, section 3.1) found loss depends
only weakly on the aspect ratio at fixed N; 32 is nanoGPT's CPU "baby" shape (128 wide, 4
layers). Two layers at least, because one-layer models cannot form induction heads and scale
differently.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..config import ModelConfig

HEAD_DIM, ASPECT = 32, 32.0

# Hoffmann et al. (2022), approach 3: L(N, D) = E + A / N^alpha + B / D^beta
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def family_config(base: ModelConfig, width: int, n_layer: Optional[int] = None, aspect: float = ASPECT,
                  head_dim: int = HEAD_DIM) -> ModelConfig:
    """The member ``width`` wide (``n_layer`` deep, default the family's depth for it): every other
    setting of ``base`` kept, the sizes that follow from the width (heads, kv heads, the MLP's width,
    shared blocks, a pruned head size) reset to follow it. Not validated (the caller says how a
    bad shape is reported)."""
    n_layer = n_layer or max(2, round(width / aspect))
    return dataclasses.replace(base, n_embd=width, n_layer=n_layer, n_head=width // head_dim, n_kv_head=None,
                               intermediate_size=None, n_shared_blocks=None, head_size=None)


def kaplan_lr(n_params: float) -> float:
    """Kaplan et al. (2020), eq. D.1: the learning rate that worked best for N non-embedding params."""
    return max(1e-4, 0.003239 - 0.0001395 * math.log(max(n_params, 1.0)))
