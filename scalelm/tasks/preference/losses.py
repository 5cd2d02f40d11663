"""The preference losses on sequence log-probabilities, and the rewards TRL logs beside them.

Each takes the summed log-probabilities of the chosen and rejected replies under the policy
(``pc``, ``pr``), their token counts (``nc``, ``nr``) and, for the losses with a reference, the
reference's (``rc``, ``rr``); it returns ``(loss per pair, chosen reward, rejected reward)``:

- ``sigmoid`` (DPO): ``-log σ(β h)`` with ``h = (pc - rc) - (pr - rr)``; with label smoothing ε,
  conservative DPO: ``-(1 - ε) log σ(β h) - ε log σ(-β h)``;
- ``ipo``: ``(h' - 1 / 2β)²`` with ``h'`` the same margin per reply token (TRL normalises IPO by
  length too, "confirmed with the IPO authors");
- ``simpo`` (reference-free): the margin of the *average* log-probabilities less ``γ / β``, in the
  sigmoid loss (label smoothing as above).

Rewards are ``β (policy - reference)`` of each reply's summed log-probability (SimPO: ``β`` times its
average). ``tests/tasks/test_preference.py`` holds each equal to TRL's loss functions on the same
tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0}  # DPO/IPO as TRL; SimPO as its paper (beta 2, gamma 0.5)


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def preference_loss(kind: str, pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor,
                    rc: torch.Tensor | None = None, rr: torch.Tensor | None = None, *, beta: float,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kind == "simpo":
        ac, ar = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
        losses = _smoothed_sigmoid(beta * (ac - ar - simpo_gamma / beta), label_smoothing)
        return losses, beta * ac.detach(), beta * ar.detach()
    if rc is None or rr is None:
        raise ValueError(f"the {kind} loss needs the reference's log-probabilities")
    lc, lr = pc - rc, pr - rr  # log-ratios against the reference
    if kind == "sigmoid":
        losses = _smoothed_sigmoid(beta * (lc - lr), label_smoothing)
    elif kind == "ipo":
        losses = (lc / nc.clamp(min=1) - lr / nr.clamp(min=1) - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {kind!r}: one of {', '.join(LOSSES)}")
    return losses, beta * lc.detach(), beta * lr.detach()
