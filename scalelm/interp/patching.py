"""Activation patching (causal tracing): which activations carry a prediction from a clean prompt.

Run a clean prompt ("The Eiffel Tower is in the city of") and a corrupted one of the same length
("The Colosseum is in the city of"); the metric is the logit difference at the last position between
a target (" Paris") and a foil (" Rome"). Then, one at a time, restore a single activation of the
corrupted run to its clean value and measure

    recovery = (LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)

1 means that activation alone carries what the corruption removed; 0 that it carries none of it.
Sites: the residual stream entering each layer, the attention and MLP outputs, each at each position
(ROME's causal tracing, Meng et al. 2022, and TransformerLens' ``get_act_patch_*``), and each head's
output ``attn.z`` over all positions. Each layer's positions (or heads) run as one batch of copies of
the corrupted prompt, each patched at its own position (head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .hooks import HookError, capture, is_encdec, patch, target_module
from .inspect import show

SITES = ("resid_pre", "attn_out", "mlp_out")


@dataclass
class TraceResult:
    clean: list[int]
    corrupt: list[int]
    target: int
    foil: int
    clean_diff: float  # logit(target) - logit(foil) at the last position, clean run
    corrupt_diff: float
    grids: dict[str, torch.Tensor]  # site -> (n_layer, T) recovery
    heads: Optional[torch.Tensor]  # (n_layer, n_head) recovery
    pieces: Sequence[str] = ()
    target_text: str = ""
    foil_text: str = ""

    def to_json(self) -> dict:
        r = lambda t: [[round(float(x), 5) for x in row] for row in t.tolist()]  # noqa: E731
        return {"clean": self.clean, "corrupt": self.corrupt, "clean_tokens": list(self.pieces),
                "target": {"id": self.target, "text": self.target_text},
                "foil": {"id": self.foil, "text": self.foil_text},
                "clean_logit_diff": round(self.clean_diff, 6), "corrupt_logit_diff": round(self.corrupt_diff, 6),
                "recovery": {site: r(g) for site, g in self.grids.items()},
                "heads": None if self.heads is None else r(self.heads)}


def logit_diff(logits: torch.Tensor, target: int, foil: int) -> torch.Tensor:
    """(B, T, V) -> (B,): logit(target) - logit(foil) at the last position."""
    last = logits[:, -1].float()
    return last[:, target] - last[:, foil]


@torch.no_grad()
def trace(model, clean: Sequence[int], corrupt: Sequence[int], target: int, foil: Optional[int] = None,
          sites: Sequence[str] = SITES, heads: bool = True) -> TraceResult:
    """Patch each site at each (layer, position), and each head, from the clean run into the corrupted one.

    ``foil``: the token the target is compared with; default the corrupted run's likeliest token other
    than the target (what the corruption made the model say instead)."""
    m = target_module(model)
    if is_encdec(m):
        raise HookError("activation patching reads decoder-only GPTs (names blocks.L.*)")
    if len(clean) != len(corrupt):
        raise HookError(f"the clean prompt has {len(clean)} tokens and the corrupted one {len(corrupt)}: patching "
                        f"restores position by position, so they must be equally long")
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise HookError(f"unknown site {bad[0]!r}: choose among {', '.join(SITES)}")
    V = m.cfg.vocab_size
    for what, t in (("target", target), ("foil", foil)):
        if t is not None and not 0 <= t < V:
            raise HookError(f"the {what} token id {t} is outside the vocabulary [0, {V})")
    dev = next(m.parameters()).device
    cl, co = torch.tensor([list(clean)], device=dev), torch.tensor([list(corrupt)], device=dev)
    layers = [i for i, k in enumerate(m.layer_keys) if k in m.blocks]
    names = [f"blocks.{L}.{s}" for L in layers for s in sites]
    names += [f"blocks.{L}.attn.z" for L in layers] if heads else []
    with capture(m, names) as clean_acts:
        clean_logits = m(cl)[0]
    corrupt_logits = m(co)[0]
    if foil is None:
        order = corrupt_logits[0, -1].argsort(descending=True).tolist()
        foil = next(t for t in order if t != target)
    if foil == target:
        raise HookError("the target and the foil are the same token")
    ld_clean = float(logit_diff(clean_logits, target, foil))
    ld_corrupt = float(logit_diff(corrupt_logits, target, foil))
    span = ld_clean - ld_corrupt
    if abs(span) < 1e-6:
        raise HookError(f"the clean and corrupted prompts give the same logit difference ({ld_clean:.4g}): nothing "
                        f"to recover; corrupt a token the prediction depends on")
    T = len(clean)

    def recovery(logits: torch.Tensor) -> torch.Tensor:
        return ((logit_diff(logits, target, foil) - ld_corrupt) / span).cpu()

    grids = {}
    rows = torch.arange(T, device=dev)
    for site in sites:
        grid = torch.zeros(len(layers), T)
        for j, L in enumerate(layers):
            src = clean_acts[f"blocks.{L}.{site}"][0]  # (T, d)

            def restore(x, src=src):  # row p of the batch gets the clean activation at position p
                x = x.clone()
                x[rows, rows] = src.to(x.dtype)
                return x

            with patch(m, {f"blocks.{L}.{site}": restore}):
                grid[j] = recovery(m(co.expand(T, T))[0])
        grids[site] = grid
    head_grid = None
    if heads:
        H = m.cfg.n_head
        head_grid = torch.zeros(len(layers), H)
        hs = torch.arange(H, device=dev)
        for j, L in enumerate(layers):
            src = clean_acts[f"blocks.{L}.attn.z"][0]  # (T, H, D)

            def restore_head(z, src=src):  # row h gets head h's clean output at every position
                z = z.clone()
                z[hs, :, hs] = src.transpose(0, 1).to(z.dtype)
                return z

            with patch(m, {f"blocks.{L}.attn.z": restore_head}):
                head_grid[j] = recovery(m(co.expand(H, T))[0])
    return TraceResult(list(clean), list(corrupt), target, foil, ld_clean, ld_corrupt, grids, head_grid)


def format_trace(r: TraceResult) -> str:
    """The recovery grids as text tables (layers down, positions or heads across)."""
    lines = [f"logit difference {r.target_text!r} - {r.foil_text!r}: clean {r.clean_diff:.3f}, corrupted "
             f"{r.corrupt_diff:.3f}; recovery when one activation is restored from the clean run:"]
    labels = [show(p, 7) for p in r.pieces] or [str(i) for i in range(len(r.clean))]
    for site, g in r.grids.items():
        lines += ["", f"{site} (layer x position)", "      " + "".join(f"{lab:>8}" for lab in labels)]
        lines += [f"{L:>5} " + "".join(f"{float(x):8.2f}" for x in row) for L, row in enumerate(g)]
    if r.heads is not None:
        lines += ["", "heads, attn.z at every position (layer x head)",
                  "      " + "".join(f"{h:>8}" for h in range(r.heads.shape[1]))]
        lines += [f"{L:>5} " + "".join(f"{float(x):8.2f}" for x in row) for L, row in enumerate(r.heads)]
    return "\n".join(lines)
