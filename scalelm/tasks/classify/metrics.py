"""Predictions and scores: batched logits, accuracy / macro-F1 / per-class report (scikit-learn),
and the Trainer's ``evaluate_fn`` (every rank scores its share; the predictions are all-reduced)."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .data import collate


def batched_logits(model: nn.Module, ids: list[list[int]], batch_size: int, fill: int, device,
                   autocast: Callable = contextlib.nullcontext, n_batches: int | None = None):
    """Yield ``(sel, fp32 logits on the CPU)`` of the sequences ``ids``, batched shortest first
    (``sel``: their indices; each batch right-padded with ``fill``), in eval mode without gradients.

    ``n_batches``: run at least this many forward passes (extra ones on a dummy text), so every
    rank of a sharded model runs the same number of collectives."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = list(range(0, len(order), batch_size))
            for b in range(max(len(starts), n_batches or 0)):
                sel = order[starts[b]:starts[b] + batch_size] if b < len(starts) else []
                idx, valid = collate([ids[i] for i in sel] or [[fill]], fill)
                with autocast():
                    logits = model(idx.to(device), valid.to(device))
                if sel:
                    yield sel, logits.float().cpu()
    finally:
        model.train(was_training)


def predict_logits(model: nn.Module, ids: list[list[int]], batch_size: int, fill: int, device,
                   autocast: Callable = contextlib.nullcontext, n_batches: int | None = None) -> torch.Tensor:
    """fp32 logits (N, n_labels) of the texts ``ids``, in their order (:func:`batched_logits`)."""
    order, out = [], []
    for sel, logits in batched_logits(model, ids, batch_size, fill, device, autocast, n_batches):
        order += sel
        out.append(logits)
    if not out:
        return torch.zeros(0, 0)
    logits = torch.cat(out)
    back = torch.empty_like(logits)
    back[torch.tensor(order)] = logits
    return back


def scores(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    """accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows: true label, columns: predicted, both in ``labels`` order)."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    labels = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "n": int(len(y_true)), "labels": list(names),
            "per_class": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                              "support": int(s[i])} for i, n in enumerate(names)},
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()}


def classify_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of the head's logits (fp32): the Trainer's ``loss_fn``."""
    idx, valid, y = batch
    return F.cross_entropy(model(idx, valid).float(), y)


def make_evaluate_fn(ids: list[list[int]], labels: np.ndarray, names: list[str], batch_size: int, fill: int):
    """``evaluate_fn(trainer)`` on the whole validation set: ``{accuracy, macro_f1, loss}``.

    Rank r of W scores examples r, r+W, ...; all run the same number of batches; the predictions
    (and summed losses) are all-reduced, so every rank computes the same scores."""

    def evaluate_fn(trainer) -> dict:
        rank, world, device = trainer.ctx.dp_rank, trainer.ctx.dp_world, trainer.device
        mine = list(range(rank, len(ids), world))
        n_batches = math.ceil(math.ceil(len(ids) / world) / batch_size)
        logits = predict_logits(trainer.model, [ids[i] for i in mine], batch_size, fill, device,
                                trainer.autocast, n_batches=n_batches)
        pred = torch.zeros(len(ids), dtype=torch.long, device=device)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        if mine:
            y = torch.from_numpy(labels[mine])
            pred[torch.tensor(mine, device=device)] = logits.argmax(1).to(device)
            loss += F.cross_entropy(logits, y, reduction="sum").double().to(device)
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(pred)  # each index is set on exactly one rank
            dist.all_reduce(loss)
        s = scores(labels, pred.cpu().numpy(), names)
        return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "loss": float(loss) / len(ids)}

    return evaluate_fn
