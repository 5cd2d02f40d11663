"""Calibration data for pruning, and running a ``GPT`` one block at a time on it.

Pruning looks at the inputs each layer sees on a few sequences of real text (SparseGPT and Wanda
use 128 windows of C4). The windows here are drawn from a DATA_DIR's train split with a fixed
seed; the model must have been trained with the data's tokenizer.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from ..model.gpt import GPT


def calibration_windows(data_dir: str | Path, n: int, seq_len: int, seed: int = 0, split: str = "train",
                        tokenizer_json: Optional[str] = None, what: str = "the model") -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from ``split`` of a DATA_DIR: (n, seq_len) int64."""
    from ..data.loader import TokenData
    from ..data.tokenizer import check_same_tokenizer

    if n < 1 or seq_len < 1:
        raise UserError(f"--calib-samples and --seq-len must be positive, got {n} and {seq_len}")
    data = TokenData(data_dir)
    check_same_tokenizer(data.dir, tokenizer_json, what=what)
    if split not in data.splits:
        split = "val" if "val" in data.splits else data.splits[0]
    tokens = data.tokens(split)
    if len(tokens) < seq_len + 1:
        raise UserError(f"--calib {data_dir}: split '{split}' has {len(tokens)} tokens, fewer than one window of "
                        f"{seq_len}: lower --seq-len or prepare more text")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len, size=n)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))


def check_prunable(model: GPT) -> None:
    if not isinstance(model, GPT) or getattr(model.cfg, "arch", "gpt") != "gpt":
        raise UserError(f"pruning works on decoder-only language models (model.arch=gpt), not "
                        f"{getattr(model.cfg, 'arch', type(model).__name__)}")
    if model.cfg.n_shared_blocks is not None and model.cfg.n_shared_blocks != model.cfg.n_layer:
        raise UserError(f"the model shares {model.cfg.n_shared_blocks} blocks across {model.cfg.n_layer} layers "
                        f"(model.n_shared_blocks): pruning needs one block per layer")


class BlockRunner:
    """The calibration activations between blocks, advanced one block at a time.

    ``inputs`` holds, per calibration batch, the hidden states entering the current block;
    :meth:`run` applies a block to them (optionally with hooks watching its layers) and
    :meth:`advance` replaces them with that block's outputs, computed with its current (already
    pruned) weights: each block is pruned on what the pruned blocks before it produce.
    """

    def __init__(self, model: GPT, windows: torch.Tensor, batch_size: int = 8):
        self.model = model
        dev = next(model.parameters()).device
        self.batches = [windows[i:i + batch_size].to(dev) for i in range(0, len(windows), batch_size)]
        T = windows.shape[1]
        pos = torch.arange(T, device=dev)[None]
        self.ropes = model.ropes(pos)  # (global, local): local layers may have their own (Gemma 3)
        with torch.no_grad():
            self.inputs = [model.embed(x, pos) for x in self.batches]  # (scaled where the model scales them)

    def run(self, block: nn.Module, layer: int) -> list[torch.Tensor]:
        rope = self.ropes[self.model.cfg.layer_window(layer) is not None]
        with torch.no_grad():
            return [block(h, rope, None, layer) for h in self.inputs]

    def advance(self, block: nn.Module, layer: int) -> None:
        self.inputs = self.run(block, layer)


def watch_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Forward pre-hooks calling ``fn(name, input)`` for each module; returns the handles to remove."""
    def hook(mod, args, name):
        fn(name, args[0].detach())  # returns None: a value would replace the module's input

    return [m.register_forward_pre_hook(functools.partial(hook, name=name)) for name, m in modules.items()]


def remove(handles) -> None:
    for h in handles:
        h.remove()
