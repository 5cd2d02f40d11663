"""The names of hook points, and what the hooks share: which model runs, which names it has, the errors.

A name says where an activation sits: ``blocks.L.SITE`` in a GPT (L the layer, also when blocks are
shared), ``encoder.blocks.L.SITE`` / ``decoder.blocks.L.SITE`` in an encoder-decoder, and
``final_norm``, ``encoder.final_norm``, ``logits``. The sites, in the order a block reaches them, are
:data:`BLOCK_SITES` (a decoder block also has the cross-attention's, :data:`DECODER_SITES`).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from ..errors import UserError

BLOCK_SITES = ("resid_pre", "attn.pattern", "attn.z", "attn.head_out", "attn_out", "resid_mid", "mlp_out",
               "resid_post")
DECODER_SITES = ("resid_pre", "attn.pattern", "attn.z", "attn.head_out", "attn_out", "cross.pattern", "cross.z",
                 "cross.head_out", "cross_out", "resid_mid", "mlp_out", "resid_post")
READ_ONLY = ("attn.pattern", "cross.pattern")  # recomputed for reading: the layer never sees them

Names = Union[None, str, list, tuple, set]


class HookError(UserError, ValueError):
    """A name that is no hook point, a model without them, a patch that returns the wrong shape."""


@dataclass
class HookPoint:
    """What a patch function learns about the tensor it gets (its second argument, if it takes one)."""
    name: str
    layer: Optional[int]  # None for final_norm, logits
    positions: Optional[torch.Tensor]  # (B or 1, T): the position of each token this forward covers


def target_module(obj) -> nn.Module:
    """The ``nn.Module`` that runs: ``obj`` itself, or a Generator's (or Server's) ``.model``."""
    if isinstance(obj, nn.Module):
        m = obj
    elif isinstance(getattr(obj, "model", None), nn.Module):
        if getattr(obj, "_step", obj.model) is not obj.model and not getattr(obj, "seq2seq", False):
            raise HookError("this Generator decodes with a compiled step: hooks need the eager model (build it "
                            "without compile=True / --compile)")
        m = obj.model
    else:
        raise HookError(f"hooks need a scalelm PyTorch model (GPT or EncoderDecoder) or a Generator; got "
                        f"{type(obj).__name__}")
    if not isinstance(getattr(m, "blocks", None), nn.ModuleDict) or not hasattr(m, "cfg"):
        raise HookError(f"{type(m).__name__} is not a scalelm model: hooks know GPT and EncoderDecoder")
    return m


def is_encdec(m: nn.Module) -> bool:
    return getattr(m.cfg, "arch", "gpt") == "encoder-decoder"


def hook_names(model) -> list[str]:
    """Every name ``model`` can capture, in the order a forward reaches them."""
    m = target_module(model)
    if is_encdec(m):
        enc = sorted(int(k[1:]) for k in m.blocks if k.startswith("e"))
        dec = sorted(int(k[1:]) for k in m.blocks if k.startswith("d"))
        return ([f"encoder.blocks.{i}.{s}" for i in enc for s in BLOCK_SITES] + ["encoder.final_norm"]
                + [f"decoder.blocks.{i}.{s}" for i in dec for s in DECODER_SITES] + ["final_norm", "logits"])
    layers = [i for i, k in enumerate(m.layer_keys) if k in m.blocks]  # a pipeline stage holds some
    names = [f"blocks.{i}.{s}" for i in layers for s in BLOCK_SITES]
    if m.lm_head is not None:
        names += ["final_norm", "logits"] if m.norm_f is not None else ["logits"]
    return names


def resolve_names(model, names: Names) -> list[str]:
    """Names and ``*`` globs -> the names they mean (None: all), each checked against the model's."""
    known = hook_names(model)
    if names is None:
        return known
    wanted = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for n in wanted:
        if not isinstance(n, str):
            raise HookError(f"hook names are strings, got {n!r}")
        hits = fnmatch.filter(known, n) if any(c in n for c in "*?[") else ([n] if n in known else [])
        if not hits:
            close = difflib.get_close_matches(n, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (it has {known[0]!r} ... {known[-1]!r})"
            raise HookError(f"{n!r} is no hook point of this model{hint}")
        out += [h for h in hits if h not in out]
    return out


def site_of(name: str) -> str:
    """``blocks.3.attn.z`` -> ``attn.z``; ``final_norm`` -> ``final_norm``."""
    parts = name.split(".")
    return ".".join(parts[parts.index("blocks") + 2:]) if "blocks" in parts else name
