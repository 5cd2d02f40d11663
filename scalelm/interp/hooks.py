"""Hooks: read and replace a model's activations by name, from outside the model.

    from scalelm import capture, patch

    with capture(model, ["blocks.1.resid_post", "blocks.1.attn.pattern"]) as cache:
        model(idx)
    cache["blocks.1.resid_post"]            # (B, T, n_embd)

    with patch(model, {"blocks.0.mlp_out": lambda x: torch.zeros_like(x)}):
        logits, _ = model(idx)              # the MLP of layer 0 knocked out

Names (docs/interpretability.md has the table) say where an activation sits, alike for GPT-2 and
Llama-style GPTs: ``blocks.L.resid_pre`` (the residual stream entering layer L), ``.attn.pattern``
(B, H, T, S), ``.attn.z`` (each head's output before the output projection, B, T, H, head_dim),
``.attn.head_out`` (each head's contribution to the residual, B, T, H, n_embd), ``.attn_out``,
``.resid_mid`` (the stream the MLP reads and adds to), ``.mlp_out``, ``.resid_post``; then
``final_norm`` (what the LM head reads) and ``logits``. An encoder-decoder has ``encoder.blocks.L.*``,
``encoder.final_norm``, ``decoder.blocks.L.*`` (with ``cross.pattern``, ``cross.z``,
``cross.head_out``, ``cross_out``), ``final_norm`` and ``logits``. ``*`` globs: ``blocks.*.resid_post``.

How: every hook is a PyTorch forward hook or pre-hook on the model's own modules (Block, Attention,
MLP, the norms, the output projection), plus the model's entry method (``hidden_states``; ``encode``
and ``decode``) shadowed on the instance, which learns the tokens' positions and wraps the KV cache
to see the keys each layer attended to. SDPA returns no weights, so ``attn.pattern`` is recomputed
from the captured q and k (norms and RoPE applied as the layer applies them) and the mask the layer
used. Leaving the ``with`` removes all of it, even on an error: the model is then exactly as before.

A Generator (or anything with a ``.model``) can be given for its model: its copy of the weights is
the one that runs (``Generator`` decodes with a packed copy). Hooks work with the KV cache: each
forward is one *call*; a capture keeps every call and ``cache[name]`` joins them along the
positions (``cache.steps(name)`` has them apart); a patch function gets each call's tensor and a
:class:`HookPoint` whose ``positions`` say which tokens the call covers.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn

from .names import READ_ONLY, HookError, HookPoint, Names, hook_names, is_encdec, resolve_names, site_of, target_module
from .sites import Session

__all__ = ["ActivationCache", "HookError", "HookPoint", "capture", "hook_names", "is_encdec", "patch", "target_module"]


class ActivationCache(Mapping):
    """``name -> tensor`` of what a :func:`capture` saw. One forward: its tensor. Several (cached
    generation): joined along the positions, the key axis of patterns padded with zeros (a query
    gives no weight to keys that did not exist yet), which is what one forward over the whole
    sequence gives. ``steps(name)`` keeps them apart (needed when the batch changed between calls)."""

    def __init__(self):
        self._steps: dict[str, list[torch.Tensor]] = {}

    def _add(self, name: str, x: torch.Tensor) -> None:
        self._steps.setdefault(name, []).append(x)

    def steps(self, name: str) -> list[torch.Tensor]:
        return list(self._steps[name])

    def __getitem__(self, name: str) -> torch.Tensor:
        steps = self._steps[name]
        if len(steps) == 1:
            return steps[0]
        if len({s.shape[0] for s in steps}) > 1:
            raise HookError(f"{name} was captured over {len(steps)} forwards whose batches differ (rows finished "
                            f"during generation): read cache.steps({name!r})")
        if name.endswith("pattern"):  # (B, H, T, S): pad S, join T
            S = max(s.shape[-1] for s in steps)
            steps = [torch.nn.functional.pad(s, (0, S - s.shape[-1])) for s in steps]
            return torch.cat(steps, dim=2)
        return torch.cat(steps, dim=1)

    def __iter__(self) -> Iterator[str]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} names: {', '.join(list(self)[:4])}{', ...' if len(self) > 4 else ''})"


# ----------------------------------------------------------------------------- contexts

_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, Session]" = weakref.WeakKeyDictionary()


def _session(m: nn.Module) -> Session:
    s = _SESSIONS.get(m)
    if s is None:
        s = _SESSIONS[m] = Session(m)
    return s


def _release(m: nn.Module, s, entry) -> None:
    s.entries = [e for e in s.entries if e is not entry]  # by identity: a cache compares by its contents
    if s.empty:
        s.uninstall()
        _SESSIONS.pop(m, None)
    else:
        s.install()


@contextmanager
def capture(model, names: Names = None, *, detach: bool = True):
    """Record activations by name while the block runs: ``with capture(model, names) as cache``.

    ``names``: a name, a list of names, ``*`` globs, or None for every hook point. ``detach=False``
    keeps the autograd graph (gradients of a metric with respect to activations)."""
    m = target_module(model)
    cache = ActivationCache()
    entry = ("capture", frozenset(resolve_names(m, names)), cache, detach)
    s = _session(m)
    s.entries.append(entry)
    try:
        s.install()
        yield cache
    finally:
        _release(m, s, entry)


@contextmanager
def patch(model, fns: Mapping[str, Callable]):
    """Replace activations while the block runs: ``fns`` maps a name (or glob) to ``fn(x)`` or
    ``fn(x, hook)`` (``hook``: a :class:`HookPoint`; a function gets it when its second parameter has no
    default or is named ``hook``) returning the tensor to use instead, of the same shape (or None: ``x``,
    edited in place). Several patches of one name apply in the order entered;
    a :func:`capture` records the patched value."""
    m = target_module(model)
    table: dict[str, list] = {}
    for name, fn in dict(fns).items():
        if not callable(fn):
            raise HookError(f"patch {name!r}: give a function of the activation, got {type(fn).__name__}")
        for n in resolve_names(m, name):
            if site_of(n) in READ_ONLY:
                raise HookError(f"{n} is recomputed for reading (the layer never sees it): patch "
                                f"{n.rsplit('.', 1)[0]}.z, each head's output, instead")
            table.setdefault(n, []).append((fn, _arity(fn)))
    entry = ("patch", table)
    s = _session(m)
    s.entries.append(entry)
    try:
        s.install()
        yield m
    finally:
        _release(m, s, entry)


def _arity(fn: Callable) -> int:
    """2 if ``fn`` takes the HookPoint too: a second positional parameter without a default, or one named
    ``hook``; else 1 (so ``lambda x, v=v: ...`` closures get the activation alone)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        return 1
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(pos) >= 2 and (pos[1].default is inspect.Parameter.empty or pos[1].name == "hook"):
        return 2
    return 1
