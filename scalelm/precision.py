"""Devices and mixed precision: which device, which autocast dtype, shared by train/eval/demo.

``auto`` precision is bf16 where the hardware multiplies bf16 natively (CUDA GPUs with bf16, CPUs
with AVX512-BF16 or AMX), else fp32. fp16 is for CUDA only (with a gradient scaler); CPUs have no
fast fp16 matmul. How the trainer runs bf16 (``--train.master_weights``): on a CPU in one process,
by default, bf16 weights with fp32 master copies in the optimizer and no autocast
(:mod:`scalelm.train.master_weights`: 1.8-2.3x the speed of HF fp32 per step on this project's
CPU); elsewhere, with LoRA or with ``--train.master_weights=false``, fp32 weights under bf16
autocast (:func:`autocast_context`: 1.1-1.2x).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable

import torch

from .config import ConfigError


def pick_device(spec: str = "auto", option: str = "--train.device") -> torch.device:
    """``auto``: CUDA when there is one, else CPU; ``option`` names the flag in the error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec} requested but CUDA is not available; use {option}=cpu")
    return dev


def _cpu_has_bf16() -> bool:
    from .hardware import cpu_has_bf16

    return cpu_has_bf16()


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast where the hardware multiplies bf16 natively, else fp32."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 on a CPU is very slow (no fp16 matmul units): use --train.precision=bf16 "
                          "(bf16 autocast) or fp32")
    return requested


def autocast_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts: weights stay fp32, matmuls run in the chosen dtype."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return partial(torch.autocast, device_type=device.type, dtype=dtype)
    return contextlib.nullcontext


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
