"""Reading a DATA_DIR: token memmaps, training batches that resume exactly, a fixed val set.

The loader is stateless per step: the windows of global step ``s`` are a pure function of
``(seed, s)``. Each data-parallel rank takes a disjoint slice of that global batch, so a run
sees the same data whatever its layout (1 process with accumulation, or N ranks), and its
state is just ``(step, micro)``: a resumed run sees exactly the batches an unbroken run would.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..checkpoint.names import LATEST, RUN_INFO, TOKENIZER, WEIGHTS
from ..errors import UserError

META = "meta.json"
FORMAT = "scalelm-data"


class DataError(UserError):
    """A DATA_DIR that is missing, corrupt, too small, or does not fit the model."""


class TokenData:
    """A prepared DATA_DIR: ``meta.json``, ``tokenizer.json`` and one ``<split>.bin`` per split."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        if not self.dir.is_dir():
            raise DataError(f"data directory not found: {self.dir} "
                            f"(create it with `scalelm prepare --input SRC --out {self.dir}`)")
        meta_path = self.dir / META
        if not meta_path.is_file():
            run = self.dir / RUN_INFO
            if run.is_file() or (self.dir / LATEST).is_file() or (self.dir / WEIGHTS).is_file():
                # prepare refuses to write into a run or model directory: name the data it came from
                try:
                    trained_on = json.loads(run.read_text())["data"]["path"]
                except (OSError, ValueError, KeyError, TypeError):  # no run.json, or not ours
                    trained_on = None
                hint = f" (this run trained on {trained_on})" if trained_on else ""
                raise DataError(f"{self.dir} is a run or model directory, not a prepared data directory: pass "
                                f"--data the DATA_DIR it was trained on{hint}, or prepare one with "
                                f"`scalelm prepare --input SRC --out NEW_DIR --tokenizer {self.dir}`")
            if self.dir.exists() and any(self.dir.iterdir()):  # prepare would refuse it: a new --out
                raise DataError(f"{self.dir} is not a prepared data directory: {META} is missing (prepare one "
                                f"with `scalelm prepare --input SRC --out NEW_DIR` and pass --data NEW_DIR)")
            raise DataError(f"{self.dir} is not a prepared data directory: {META} is missing "
                            f"(run `scalelm prepare --input SRC --out {self.dir}`)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path} is corrupt: {e}") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            fmt = self.meta.get("format") if isinstance(self.meta, dict) else type(self.meta).__name__
            raise DataError(f"{meta_path} is not a scalelm data description (format={fmt!r}): prepare the data "
                            f"again with `scalelm prepare`")
        self.dtype = np.dtype(self.meta["dtype"])
        self._maps: dict[str, np.memmap] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["tokenizer"]["eot_id"])

    @property
    def pad_id(self) -> Optional[int]:
        p = self.meta["tokenizer"].get("pad_id")
        return None if p is None else int(p)

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @cached_property
    def tokenizer_json(self) -> str:
        p = self.dir / TOKENIZER
        if not p.is_file():
            raise DataError(f"{p} is missing: the data directory is incomplete (prepare it again)")
        return p.read_text()

    @property
    def tokenizer_sha256(self) -> str:
        return hashlib.sha256(self.tokenizer_json.encode()).hexdigest()

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)

    def tokens(self, split: str) -> np.ndarray:
        if split in self._maps:
            return self._maps[split]
        info = self.meta["splits"].get(split)
        if info is None:
            raise DataError(f"{self.dir} has no split '{split}' (it has: {', '.join(self.splits)})")
        path = self.dir / info.get("file", f"{split}.bin")
        if not path.is_file():
            raise DataError(f"{path} is missing: the data directory is incomplete (prepare it again)")
        expected = int(info["tokens"]) * self.dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(f"{path} holds {path.stat().st_size} bytes but {META} says {info['tokens']} "
                            f"{self.dtype} tokens ({expected} bytes): the file is truncated or corrupt")
        arr = np.memmap(path, dtype=self.dtype, mode="r") if expected else np.zeros(0, self.dtype)
        # an id the tokenizer lacks would index past the embedding (a crash, or silent garbage on GPU):
        # one streaming pass per split, the first time it is opened
        top = max((int(arr[i:i + (1 << 26)].max()) for i in range(0, len(arr), 1 << 26)), default=-1)
        if top >= self.vocab_size:
            raise DataError(f"{path} holds token id {top}, but the tokenizer of {self.dir} has only "
                            f"{self.vocab_size} tokens: the data and its tokenizer disagree (a file was replaced "
                            f"or damaged); prepare the data again with `scalelm prepare --input SRC --out NEW_DIR`")
        self._maps[split] = arr
        return arr

    def bytes_per_token(self, split: str) -> float:
        info = self.meta["splits"][split]
        return float(info["bytes"]) / max(1, int(info["tokens"]))

    def check_window(self, split: str, seq_len: int) -> None:
        n = len(self.tokens(split))
        if n < seq_len + 1:
            more = ("prepare it again with a larger --val-fraction" if split == "val" else
                    "prepare it again with more text or a smaller --val-fraction")
            raise DataError(f"split '{split}' of {self.dir} has {n} tokens, fewer than one window of "
                            f"{seq_len} + 1: lower --model.block_size to at most {max(0, n - 1)}, or {more}")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(buf)
    return t[:, :-1], t[:, 1:]


class BatchLoader:
    """Training batches: nanoGPT-style random windows, or epochs over shuffled packed sequences."""

    def __init__(self, tokens: np.ndarray, micro_batch_size: int, seq_len: int, grad_accum_steps: int = 1,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, mode: str = "random",
                 device: Optional[torch.device | str] = None):
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_world {dp_world}")
        n = len(tokens)
        if n < seq_len + 1:
            raise DataError(f"{n} training tokens are fewer than one window of {seq_len} + 1: "
                            f"lower --model.block_size or use a larger corpus")
        self.tokens, self.B, self.T = tokens, micro_batch_size, seq_len
        self.accum, self.dp_rank, self.dp_world = grad_accum_steps, dp_rank, dp_world
        self.seed, self.mode = seed, mode
        self.device = torch.device(device) if device is not None else None
        self.global_batch = micro_batch_size * dp_world * grad_accum_steps
        self.n_windows = (n - 1) // seq_len  # packed, non-overlapping windows (sequential mode)
        self.step, self.micro = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None
        self._perm: tuple[int, np.ndarray] | None = None

    # ---------------------------------------------------------------- which windows
    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(self.n_windows))
        return self._perm[1]

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets of all windows of a global step (identical on every rank)."""
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        G = self.global_batch
        if self.mode == "random":
            starts = np.random.default_rng([self.seed, 0, step]).integers(0, len(self.tokens) - self.T, size=G)
        else:
            pos = np.arange(step * G, (step + 1) * G, dtype=np.int64)
            starts = np.empty(G, dtype=np.int64)
            for epoch in np.unique(pos // self.n_windows):
                sel = pos // self.n_windows == epoch
                starts[sel] = self._permutation(int(epoch))[pos[sel] % self.n_windows] * self.T
        self._cache = (step, starts)
        return starts

    @property
    def epoch(self) -> float:
        """Epochs completed (fractional), counting windows of the global stream."""
        return (self.step * self.global_batch + self.micro * self.B * self.dp_world) / max(1, self.n_windows)

    # ---------------------------------------------------------------- iteration
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch ``(x, y)``, each ``(micro_batch_size, seq_len)`` int64."""
        starts = self.global_starts(self.step)
        lo = (self.micro * self.dp_world + self.dp_rank) * self.B
        x, y = _windows(self.tokens, starts[lo:lo + self.B], self.T)
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.step = 0, self.step + 1
        if self.device is not None and self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"version": 1, "mode": self.mode, "seed": self.seed, "seq_len": self.T,
                "global_batch": self.global_batch, "step": self.step, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "seed", "seq_len", "global_batch"):
            if state.get(key) != getattr(self, {"seq_len": "T"}.get(key, key)):
                raise DataError(f"loader state does not match this run: {key} was {state.get(key)!r}, "
                                f"now {getattr(self, {'seq_len': 'T'}.get(key, key))!r}; resuming would "
                                f"not see the same batches (keep the same data settings to resume)")
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self._cache = None


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: Optional[int] = None,
                 dp_rank: int = 0, dp_world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: non-overlapping windows, evenly spread over the split when capped.

    With several data-parallel ranks, batch k goes to rank ``k % dp_world``; callers sum losses
    and token counts across ranks.
    """
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"{n} validation tokens are fewer than one window of {seq_len} + 1: lower "
                        f"--model.block_size to at most {max(0, n - 1)} or prepare a larger val split")
    n_windows = (n - 1) // seq_len
    count = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    idx = np.unique(np.linspace(0, n_windows - 1, count).round().astype(np.int64))
    starts = idx * seq_len
    for k, lo in enumerate(range(0, len(starts), batch_size)):
        if k % dp_world == dp_rank:
            yield _windows(tokens, starts[lo:lo + batch_size], seq_len)
