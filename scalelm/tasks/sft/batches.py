"""Training batches of encoded examples, packed or length-grouped, that resume exactly.

``PackedBatches``: each epoch (a seeded permutation) fills windows of ``block_size`` input tokens
with whole examples (first fit over the last few open windows, so the order stays shuffled);
a batch carries each position's example number, for :func:`scalelm.model.masks.document_mask`:
attention never crosses examples and positions restart at each, so an example computes exactly
what it would alone. ``GroupedBatches``: one example per row, right-padded to the longest in
the micro-batch; the examples of ``GROUP`` optimizer steps are sorted by length and dealt out in
a shuffled order of steps (little padding, no mask needed: causal attention never looks right).

Both are pure functions of ``(seed, step, micro)``, like the pretraining loader: global step
``s`` takes units ``[s*G, (s+1)*G)`` of the stream of epochs, ``G = micro x accum x dp_world``,
each rank its slice; the state is ``(step, micro)`` plus token counters.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import UserError
from ...model.loss import IGNORE_INDEX
from .encode import Encoded

GROUP = 16  # optimizer steps whose examples are sorted by length together (non-packed)
OPEN_WINDOWS = 8  # packing: windows still open for a later, shorter example


def example_arrays(e: Encoded) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one example: next-token targets where the next token is supervised."""
    x = e.ids[:-1]
    y = np.where(e.sup[1:], e.ids[1:], IGNORE_INDEX)
    return x, y


def pack(lengths: np.ndarray, order: np.ndarray, window: int) -> list[list[int]]:
    """Examples (in ``order``) into windows of ``window`` tokens: bounded first fit."""
    windows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        lo = max(0, len(windows) - OPEN_WINDOWS)
        for w in range(lo, len(windows)):
            if room[w] >= n:
                windows[w].append(int(i))
                room[w] -= n
                break
        else:
            windows.append([int(i)])
            room.append(window - n)
    return windows


def right_pad(rows: list[tuple[np.ndarray, np.ndarray]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``(inputs, targets)`` rows to the longest: ``(x, y)`` (B, T), targets ``IGNORE_INDEX`` on padding."""
    T = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), T), fill, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, (xi, yi) in enumerate(rows):
        x[b, :len(xi)] = torch.from_numpy(xi)
        y[b, :len(yi)] = torch.from_numpy(yi)
    return x, y


class _Batches:
    kind = "?"

    def __init__(self, examples: list[Encoded], micro_batch_size: int, grad_accum_steps: int = 1,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, fill: int = 0, device=None):
        if not examples:
            raise UserError("no training examples left (every one was cut away by the context limit)")
        self.rows = [example_arrays(e) for e in examples]
        self.lengths = np.array([len(x) for x, _ in self.rows], dtype=np.int64)
        self.supervised = np.array([int((y != IGNORE_INDEX).sum()) for _, y in self.rows], dtype=np.int64)
        self.B, self.accum, self.dp_rank, self.dp_world = micro_batch_size, grad_accum_steps, dp_rank, dp_world
        self.seed, self.fill = seed, fill
        self.device = torch.device(device) if device is not None else None
        self.G = micro_batch_size * grad_accum_steps * dp_world
        self.step = self.micro = 0
        self.tokens = self.supervised_tokens = 0  # real (non-padding) and supervised tokens trained on, all ranks
        self._perm: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[epoch] = np.random.default_rng([self.seed, 14, epoch]).permutation(len(self.rows))
        return self._perm[epoch]

    def step_units(self, step: int) -> list:
        raise NotImplementedError

    def unit_counts(self, unit) -> tuple[int, int]:
        raise NotImplementedError

    def collate(self, units: list) -> tuple:
        raise NotImplementedError

    def next_batch(self) -> tuple:
        units = self.step_units(self.step)
        if self.micro == 0:
            for u in units:
                t, s = self.unit_counts(u)
                self.tokens += t
                self.supervised_tokens += s
        lo = (self.micro * self.dp_world + self.dp_rank) * self.B
        batch = self.collate(units[lo:lo + self.B])
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.step = 0, self.step + 1
        if self.device is not None:
            batch = tuple(t.to(self.device) for t in batch)
        return batch

    def state_dict(self) -> dict:
        return {"version": 1, "kind": self.kind, "seed": self.seed, "examples": len(self.rows),
                "global_batch": self.G, "step": self.step, "micro": self.micro, "tokens": self.tokens,
                "supervised_tokens": self.supervised_tokens}

    def load_state_dict(self, state: dict) -> None:
        for key, now in (("kind", self.kind), ("seed", self.seed), ("examples", len(self.rows)),
                         ("global_batch", self.G)):
            if state.get(key) != now:
                raise UserError(f"the checkpoint's batch order does not match this run: {key} was {state.get(key)!r}, "
                                f"now {now!r}; resume with the same data, --packing and batch settings (or start "
                                f"a new run with another --out)")
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self.tokens, self.supervised_tokens = int(state.get("tokens", 0)), int(state.get("supervised_tokens", 0))


class GroupedBatches(_Batches):
    """One example per row, length-grouped, right padding (see the module docstring)."""

    kind = "sft-grouped"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._group: tuple[int, list] | None = None

    def _example_at(self, pos: np.ndarray) -> np.ndarray:
        n = len(self.rows)
        out = np.empty(len(pos), dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self.permutation(int(epoch))[pos[sel] % n]
        return out

    def step_units(self, step: int) -> list:
        g = step // GROUP
        if self._group is None or self._group[0] != g:
            pos = np.arange(g * GROUP * self.G, (g + 1) * GROUP * self.G, dtype=np.int64)
            idx = self._example_at(pos)
            idx = idx[np.argsort(self.lengths[idx], kind="stable")].reshape(GROUP, self.G)
            order = np.random.default_rng([self.seed, 15, g]).permutation(GROUP)
            self._group = (g, [idx[k].tolist() for k in order])
        return self._group[1][step % GROUP]

    def unit_counts(self, i: int) -> tuple[int, int]:
        return int(self.lengths[i]), int(self.supervised[i])

    def collate(self, units: list) -> tuple:
        return right_pad([self.rows[i] for i in units], self.fill)


class PackedBatches(_Batches):
    """Whole examples packed into ``window``-token rows with example ids (see the module docstring)."""

    kind = "sft-packed"

    def __init__(self, examples: list[Encoded], micro_batch_size: int, grad_accum_steps: int = 1, *,
                 window: int, **kw):
        super().__init__(examples, micro_batch_size, grad_accum_steps, **kw)
        self.window = window
        if int(self.lengths.max()) > window:
            raise UserError(f"an example of {int(self.lengths.max())} tokens does not fit a window of {window}")
        self._windows: dict[int, list[list[int]]] = {}
        self._starts = [0]  # global index of each epoch's first window

    def epoch_windows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._windows:
            if len(self._windows) > 4:
                self._windows.clear()
            self._windows[epoch] = pack(self.lengths, self.permutation(epoch), self.window)
        return self._windows[epoch]

    def _window_at(self, w: int) -> list[int]:
        while self._starts[-1] <= w:
            self._starts.append(self._starts[-1] + len(self.epoch_windows(len(self._starts) - 1)))
        epoch = int(np.searchsorted(self._starts, w, side="right")) - 1
        return self.epoch_windows(epoch)[w - self._starts[epoch]]

    def step_units(self, step: int) -> list:
        return [self._window_at(w) for w in range(step * self.G, (step + 1) * self.G)]

    def unit_counts(self, unit: list[int]) -> tuple[int, int]:
        return int(self.lengths[unit].sum()), int(self.supervised[unit].sum())

    def collate(self, units: list) -> tuple:
        B, T = len(units), self.window
        x = torch.full((B, T), self.fill, dtype=torch.long)
        y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        doc = torch.full((B, T), -1, dtype=torch.long)  # padding: its own "example"
        for b, unit in enumerate(units):
            at = 0
            for k, i in enumerate(unit):
                xi, yi = self.rows[i]
                n = len(xi)
                x[b, at:at + n] = torch.from_numpy(xi)
                y[b, at:at + n] = torch.from_numpy(yi)
                doc[b, at:at + n] = k
                at += n
        return x, y, doc

    def fill_ratio(self) -> float:
        """Real tokens per window token over the first epoch."""
        w = self.epoch_windows(0)
        return float(self.lengths.sum()) / (len(w) * self.window)


def eval_batches(examples: list[Encoded], batch_size: int, fill: int = 0, dp_rank: int = 0,
                 dp_world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches (this rank's share), sorted by length: less padding, same sums."""
    rows = sorted((example_arrays(e) for e in examples), key=lambda r: len(r[0]))
    rows = rows[dp_rank::dp_world]
    return [right_pad(rows[i:i + batch_size], fill) for i in range(0, len(rows), batch_size)]


def make_batches(examples: list[Encoded], packing: bool, micro_batch_size: int, grad_accum_steps: int,
                 window: int, **kw) -> _Batches:
    if packing:
        return PackedBatches(examples, micro_batch_size, grad_accum_steps, window=window, **kw)
    return GroupedBatches(examples, micro_batch_size, grad_accum_steps, **kw)
