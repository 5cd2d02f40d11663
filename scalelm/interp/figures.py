"""The PNGs of ``scalelm inspect`` (attention maps: one figure per layer, one panel per head) and of
``scalelm trace`` (the activation-patching heatmaps). matplotlib with the Agg backend: files only."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..fileio import atomic_write_bytes

MAX_LABELS = 48  # tokens named on the axes up to this many; beyond, the ticks would overlap


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, path: Optional[Path]) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # (not bbox_inches="tight": that draws the figure twice)
    _plt().close(fig)
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(Path(path), data)
    return data


def token_label(piece: str, width: int = 10) -> str:
    """A token as an axis label: escapes visible, a space as ␣ (else a lone space is no label at all)."""
    return repr(piece)[1:-1].replace(" ", "\u2423")[:width]


def _labels(ax, pieces: Sequence[str], x: bool = True, y: bool = True) -> None:
    """Token names on the axes that ask for them, none on the others (nor numbers)."""
    if len(pieces) > MAX_LABELS:
        ax.set_xticks([])
        ax.set_yticks([])
        return
    names = [token_label(p) for p in pieces]
    ax.set_xticks(range(len(names)), names if x else [], rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names if y else [], fontsize=7)


def attention_png(pattern: torch.Tensor, pieces: Sequence[str], layer: int, path: Optional[Path] = None) -> bytes:
    """One layer's attention, ``pattern`` (H, T, T): a grid of heads, query down, key across."""
    plt = _plt()
    H = pattern.shape[0]
    cols = min(H, 4)
    rows = math.ceil(H / cols)
    side = 2.2 + 0.06 * min(len(pieces), MAX_LABELS)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(pattern[h].float().numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layer} head {h}", fontsize=8)
        _labels(ax, pieces, x=h // cols == rows - 1 or h + cols >= H, y=h % cols == 0)
    fig.suptitle(f"attention, layer {layer} (row: query token, column: the token it attends to)", fontsize=9)
    fig.set_layout_engine("constrained")
    return _png(fig, path)


def trace_png(result, path: Optional[Path] = None) -> bytes:
    """Activation patching: recovery of the logit difference per (layer, position) for each patched
    site, and per (layer, head). 1 = restoring that activation alone restores the clean prediction."""
    plt = _plt()
    panels = [(f"{site}", grid) for site, grid in result.grids.items()]
    if result.heads is not None:
        panels.append(("heads (attn.z)", result.heads))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.4 * len(result.pieces) / 4, 3.8),
                             squeeze=False, layout="constrained")
    lo = min(0.0, min(float(g.min()) for _, g in panels))
    hi = max(1.0, max(float(g.max()) for _, g in panels))
    for ax, (title, grid) in zip(axes[0], panels):
        im = ax.imshow(grid.float().numpy(), cmap="RdBu_r", vmin=-max(abs(lo), hi), vmax=max(abs(lo), hi),
                       aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in range(grid.shape[0])], fontsize=7)
        if title.startswith("heads"):
            ax.set_xticks(range(grid.shape[1]), [str(i) for i in range(grid.shape[1])], fontsize=7)
            ax.set_xlabel("head", fontsize=8)
        else:
            if len(result.pieces) <= MAX_LABELS:
                ax.set_xticks(range(len(result.pieces)), [token_label(p) for p in result.pieces], rotation=90,
                              fontsize=7)
            ax.set_xlabel("position (clean token)", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="recovery")
    fig.suptitle(f"activation patching: logit difference {result.target_text!r} - {result.foil_text!r} "
                 f"(clean {result.clean_diff:.2f}, corrupted {result.corrupt_diff:.2f})", fontsize=9)
    return _png(fig, path)
