"""Training batches of preference pairs: each micro-batch is ``B`` pairs as ``2B`` right-padded rows,
the chosen replies first, with the reference's log-probabilities of each row.

The order is SFT's length-grouped one (:class:`~scalelm.tasks.sft.batches.GroupedBatches`: a pure
function of seed and step, so a resumed run continues exactly), each pair counted by both replies.
"""

from __future__ import annotations

import numpy as np
import torch

from ...model.loss import IGNORE_INDEX
from ..sft.batches import GroupedBatches, example_arrays, right_pad
from .encode import EncodedPair


def pair_rows(pairs: list[EncodedPair], ref: np.ndarray | None) -> tuple:
    """``(x, y, ref)`` of pairs: ``2B`` rows (chosen, then rejected), ``ref`` (2B,) fp64 (zeros
    when the loss has no reference)."""
    rows = [example_arrays(p.chosen) for p in pairs] + [example_arrays(p.rejected) for p in pairs]
    x, y = right_pad(rows, 0)
    r = torch.zeros(2 * len(pairs), dtype=torch.float64) if ref is None else \
        torch.from_numpy(np.concatenate([ref[:, 0], ref[:, 1]]))
    return x, y, r


class PairBatches(GroupedBatches):
    kind = "preference"

    def __init__(self, pairs: list[EncodedPair], ref: np.ndarray | None, micro_batch_size: int,
                 grad_accum_steps: int = 1, **kw):
        super().__init__([p.chosen for p in pairs], micro_batch_size, grad_accum_steps, **kw)
        self.pairs, self.ref = pairs, ref
        rej = [example_arrays(p.rejected) for p in pairs]
        self.lengths = self.lengths + np.array([len(x) for x, _ in rej], dtype=np.int64)
        self.supervised = self.supervised + np.array([int((y != IGNORE_INDEX).sum()) for _, y in rej], dtype=np.int64)

    def collate(self, units: list) -> tuple:
        return pair_rows([self.pairs[i] for i in units], None if self.ref is None else self.ref[units])


def eval_pair_batches(pairs: list[EncodedPair], ref: np.ndarray | None, batch_size: int, dp_rank: int = 0,
                      dp_world: int = 1) -> list[tuple]:
    """This rank's share of fixed validation batches, shortest pairs together."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].n_tokens)[dp_rank::dp_world]
    return [pair_rows([pairs[i] for i in order[s:s + batch_size]], None if ref is None else ref[order[s:s + batch_size]])
            for s in range(0, len(order), batch_size)]
