"""Key/value caches: what a decoder keeps of the tokens it has seen, from one forward to the next.

Five caches, one contract. A forward over ``T`` new tokens calls ``prepare(T)`` first (the
cache checks it has room, builds the attention mask, returns the new tokens' position ids) and
``advance(T)`` last (the tokens are in). That pair is :class:`KVCache`, which all five implement:

    PreallocatedKVCache   here                      the GPT's: pre-allocated, one fill position per batch
    Seq2SeqCache          model/encdec.py           the same, plus the encoder's cross-attention keys/values
    BatchCache            serve/engine.py           continuous batching: every row its own length
    OrtCache              generate/onnx_backend.py  onnxruntime's past keys/values, fed back each step
    ConcatCache           compress/onnx_export.py   traceable for export: past and new concatenated

Between the two calls, a PyTorch model's attention layers call ``update(layer, k, v)``
(:class:`LayerKVCache`: every cache but ``OrtCache``, whose graph concatenates inside itself).
The :class:`~scalelm.generate.generator.Generator` and beam search drive a cache by its fill
position, restart it with left padding and reorder its rows (:class:`GeneratorKVCache`: the caches
``Generator`` makes, ``PreallocatedKVCache``, ``Seq2SeqCache`` and ``OrtCache``).

Sliding-window attention (``model.sliding_window``): ``update(layer, ...)`` returns the mask of that
layer's kind, the band ``q - window < k <= q`` over slots (:func:`~scalelm.model.masks.window_mask`)
on a local layer and the full-attention mask on a global one. Every cache keeps all slots and masks
the ones a local layer no longer sees (no ring buffer): memory grows with the context as for full
attention, and one buffer serves both kinds of layer. ``OrtCache`` needs nothing: its graph (built
around ``ConcatCache``) carries the band.

The protocols are ``runtime_checkable`` and each cache names the ones it implements as base
classes, so ``isinstance(cache, KVCache)`` holds; tests/model/test_kv_cache.py runs one conformance
test over all five.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

from ..config import ModelConfig
from .masks import window_mask


@runtime_checkable
class KVCache(Protocol):
    """Brackets every forward over ``T`` new tokens: ``prepare(T)`` before, ``advance(T)`` after."""

    def prepare(self, T: int):
        """Check there is room for ``T`` new tokens (``ValueError`` if not), set the attention mask
        for them, and return their position ids, ``(B or 1, T)``."""
        ...

    def advance(self, T: int) -> None:
        """The ``T`` prepared tokens are stored: the next forward comes after them."""
        ...


@runtime_checkable
class LayerKVCache(KVCache, Protocol):
    """A cache that a PyTorch model's attention layers write into, one layer at a time."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Store ``layer``'s keys/values of the prepared tokens, ``(B, kv_heads, T, head_dim)``, in
        the cache's own dtype; return that layer's keys and values over every slot a query may
        attend to, and the mask (``None``: plain causal attention)."""
        ...


@runtime_checkable
class GeneratorKVCache(KVCache, Protocol):
    """A cache whose rows share one fill position, as the Generator and beam search drive it."""

    pos: int  # slots filled (the same for every row; left padding makes prompts line up)
    max_len: int  # slots per row

    def reset(self, start: Optional[torch.Tensor] = None) -> None:
        """Empty the cache; row ``b``'s first real slot is ``start[b]`` (left padding before it)."""
        ...

    def index_rows(self, order: torch.Tensor) -> None:
        """Keep rows ``order`` (rows may repeat or change places: beams following their parents)."""
        ...


def local_layers(cfg: ModelConfig) -> list[bool]:
    """Per layer: whether it attends within ``cfg.sliding_window`` (what ``update`` masks it with)."""
    return [cfg.layer_window(i) is not None for i in range(cfg.n_layer)]


class PreallocatedKVCache(LayerKVCache, GeneratorKVCache):
    """Pre-allocated keys/values for incremental decoding: (n_layer, B, n_kv_head, S, head_dim).

    Static shape, so a decode step can be compiled or graph-captured. ``pos`` is the number of
    slots filled. Rows of a batch may start at different slots (left padding): ``start[b]`` is
    the first real slot of row b, and position ids count from there.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: Optional[int] = None,
                 device=None, dtype=torch.float32):
        self.max_len = max_len or cfg.block_size
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.start = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pos = 0
        self.static = False  # True: attend over the whole buffer (fixed shapes) instead of [:pos]
        self._padded = False  # any row starting after slot 0 (left padding)
        self._mask: Optional[torch.Tensor] = None
        # sliding window: each layer's kind, and the band local layers see (None: nothing fell out yet)
        self.window, self.local = cfg.sliding_window, local_layers(cfg)
        self._band: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self, start: Optional[torch.Tensor] = None) -> None:
        self.pos = 0
        self.start = (start.to(self.start.device) if start is not None else torch.zeros_like(self.start))
        self._padded = start is not None and bool((start > 0).any())

    def prepare(self, T: int) -> torch.Tensor:
        """Called once per forward: returns position ids (B or 1, T) and sets the attention mask."""
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens exceed its {self.max_len} slots")
        dev = self.k.device
        q_slot = torch.arange(self.pos, self.pos + T, device=dev)
        k_len = self.max_len if self.static else self.pos + T
        k_slot = torch.arange(k_len, device=dev)
        # local layers need the band once some key is window or more slots behind a query
        banded = self.window is not None and self.pos + T > self.window
        if not self._padded and not self.static and (T == 1 or self.pos == 0):
            self._mask = None  # plain causal (prefill) or one new token seeing all: no mask to build
            self._band = window_mask(q_slot, k_slot, self.window)[None, None] if banded else None
            return q_slot[None, :]
        causal = k_slot[None, :] <= q_slot[:, None]  # (T, S)
        valid = k_slot[None, :] >= self.start[:, None]  # (B, S): skip left padding
        # a padding query sees its own slot, so no row is fully masked (NaN on some kernels)
        own = k_slot[None, :] == q_slot[:, None]
        self._mask = ((causal[None] & valid[:, None, :]) | own[None])[:, None]  # (B, 1, T, S)
        self._band = self._mask & window_mask(q_slot, k_slot, self.window) if banded else None
        return (q_slot[None, :] - self.start[:, None]).clamp(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k  # (a copy: converts to the cache's dtype)
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.max_len if self.static else self.pos + T
        mask = self._band if self._band is not None and self.local[layer] else self._mask
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask

    def advance(self, T: int) -> None:
        self.pos += T

    def index_rows(self, order: torch.Tensor) -> None:
        self.k = self.k.index_select(1, order)
        self.v = self.v.index_select(1, order)
        self.start = self.start.index_select(0, order)
