"""The preference step: the replies' log-probabilities under the model, the loss, and TRL's metrics.

``PreferenceObjective`` is the recipe's ``loss_fn``; it also sums, between two log lines, what TRL
logs under the same names (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``), which the Trainer adds to each training
record (:class:`~scalelm.train.protocols.ReportsStats`). The reference's log-probabilities are
computed once, before training, with the starting weights (a LoRA run's base: the adapters are
not applied yet, so it is the model with its adapters off) and cached beside the run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ...model.loss import IGNORE_INDEX, target_logprobs
from .batches import eval_pair_batches
from .encode import EncodedPair
from .losses import preference_loss

STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected")


def reply_logps(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its targets (the reply), and their count."""
    logits = model(x)[0]
    return target_logprobs(logits, y).sum(-1), (y != IGNORE_INDEX).sum(-1)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class PreferenceObjective:
    """``loss_fn(model, batch)`` of a preference run, with TRL's metrics summed on the side."""

    def __init__(self, kind: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
        self.kind, self.beta, self.label_smoothing, self.simpo_gamma = kind, beta, label_smoothing, simpo_gamma
        self._sums: Optional[torch.Tensor] = None
        self._pairs = 0

    def terms(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per pair, stats summed over the pairs: the STATS order)."""
        x, y, ref = batch
        logps, n = reply_logps(model, x, y)
        B = x.shape[0] // 2
        ref = ref.to(logps.dtype)
        losses, rc, rr = preference_loss(self.kind, logps[:B], logps[B:], n[:B], n[B:], ref[:B], ref[B:],
                                         beta=self.beta, label_smoothing=self.label_smoothing,
                                         simpo_gamma=self.simpo_gamma)
        lp = logps.detach()
        stats = torch.stack([rc.sum(), rr.sum(), (rc > rr).float().sum(), (rc - rr).sum(), lp[:B].sum(), lp[B:].sum()])
        return losses, stats.double()

    def __call__(self, model, batch) -> torch.Tensor:
        losses, stats = self.terms(model, batch)
        self._sums = stats if self._sums is None else self._sums + stats
        self._pairs += losses.shape[0]
        return losses.mean()

    def take_stats(self) -> dict[str, float]:
        """Means over every pair since the last call, over every rank (each rank calls it at the same step)."""
        sums = self._sums if self._sums is not None else torch.zeros(len(STATS), dtype=torch.float64)
        both = torch.cat([sums.cpu(), torch.tensor([float(self._pairs)], dtype=torch.float64)])
        if _world() > 1:
            dev = sums.device if dist.get_backend() == "nccl" else torch.device("cpu")
            both = both.to(dev)
            dist.all_reduce(both)
            both = both.cpu()
        self._sums, self._pairs = None, 0
        n = float(both[-1])
        return {k: float(v) / n for k, v in zip(STATS, both[:-1])} if n else {}


@torch.no_grad()
def evaluate_pairs(objective: PreferenceObjective, model, pairs: list[EncodedPair], ref: np.ndarray | None,
                   batch_size: int, device, autocast, dp_rank: int = 0, dp_world: int = 1) -> dict:
    """Mean loss and TRL's metrics over ``pairs`` (every rank gets the totals)."""
    was = model.training
    model.eval()
    totals = torch.zeros(len(STATS) + 2, dtype=torch.float64)
    try:
        for batch in eval_pair_batches(pairs, ref, batch_size, dp_rank, dp_world):
            with autocast():
                losses, stats = objective.terms(model, tuple(t.to(device) for t in batch))
            totals += torch.cat([stats.cpu(), torch.tensor([float(losses.sum()), float(losses.shape[0])],
                                                           dtype=torch.float64)])
    finally:
        model.train(was)
    if _world() > 1:
        replicas = _world() // dp_world  # tensor-parallel ranks hold the same pairs
        t = totals.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        totals = t.cpu() / replicas
    n = float(totals[-1])
    return {"loss": float(totals[-2]) / n, **{k: float(v) / n for k, v in zip(STATS, totals[:-2])}, "pairs": int(n)}


# ----------------------------------------------------------------------------- the reference

@torch.no_grad()
def reference_logps(model, pairs: list[EncodedPair], batch_size: int, device, autocast, dp_rank: int = 0,
                    dp_world: int = 1) -> np.ndarray:
    """``(n, 2)`` fp64: each pair's chosen and rejected log-probability under ``model``, each rank
    computing its share (summed over ranks)."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    was = model.training
    model.eval()
    try:
        mine = list(range(dp_rank, len(pairs), dp_world))
        for s in range(0, len(mine), batch_size):
            idx = mine[s:s + batch_size]
            from .batches import pair_rows

            x, y, _ = pair_rows([pairs[i] for i in idx], None)
            with autocast():
                lp, _ = reply_logps(model, x.to(device), y.to(device))
            lp = lp.double().cpu()
            out[idx, 0], out[idx, 1] = lp[:len(idx)], lp[len(idx):]
    finally:
        model.train(was)
    if _world() > 1:
        t = out.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        out = t.cpu() / (_world() // dp_world)
    return out.numpy()


def cache_key(pairs: dict[str, list[EncodedPair]], base: str, precision: str) -> str:
    """What the cached log-probabilities depend on: the tokens of every pair, the base, the precision."""
    h = hashlib.sha256(f"{base}|{precision}".encode())
    for name, ps in sorted(pairs.items()):
        h.update(name.encode())
        for p in ps:
            for e in (p.chosen, p.rejected):
                h.update(e.ids.tobytes())
                h.update(e.sup.tobytes())
    return h.hexdigest()


def read_reference_cache(path: Path, key: str) -> Optional[dict[str, np.ndarray]]:
    """The cached arrays if ``path`` holds them for ``key`` (else None: compute them again)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a torn or foreign file: recompute rather than trust it
        return None


def write_reference_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    from ...fileio import atomic_write_bytes

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={"key": key}))
