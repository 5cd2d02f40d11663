"""SparseGPT (Frantar & Alistarh 2023): prune a linear layer and reconstruct its output.

For a layer ``y = W x`` with calibration inputs ``X`` and ``H = X X^T``, removing weight ``w_q``
of a row is compensated, as in Optimal Brain Surgeon, by updating the row's weights that are not
yet fixed: ``delta = -(w_q / [H_F^-1]_qq) [H_F^-1]_{q,:}`` with ``F`` the columns still free.
Columns are processed left to right, so ``F = {q, q+1, ...}`` and every ``H_F^-1`` comes from one
Cholesky factor of ``H^-1`` (row q of the upper factor ``U`` is ``[H_F^-1]_{q,:} / sqrt([H_F^-1]_qq)``).
Which weights go is chosen per block of ``blocksize`` columns, by ``w^2 / U_qq^2`` over the whole
block (or per group of M columns for N:M), and the block's errors update the columns to its
right in one matrix product ("lazy batch updates"). ``H`` is dampened by ``damp`` times its mean
diagonal, and inputs that were always zero are dropped, as the reference implementation does.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import UserError


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, mask of dead inputs)."""
    H = H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.arange(H.shape[0], device=H.device)
    scale = damp * torch.mean(torch.diag(H))
    for attempt in range(6):  # a singular H (too few calibration tokens): dampen harder
        try:
            Hd = H.clone()
            Hd[diag, diag] += scale * 10 ** attempt
            L = torch.linalg.cholesky(Hd)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead
        except torch.linalg.LinAlgError:
            continue
    raise UserError("SparseGPT: the calibration Hessian is not positive definite even with heavy dampening: "
                    "use more --calib-samples or a larger --damp")


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]] = None,
                    blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pruned and reconstructed weight, mask of removed weights) for ``weight`` (rows, cols)."""
    W = weight.detach().clone().double()
    rows, cols = W.shape
    if nm is not None and cols % nm[1]:
        raise UserError(f"the {nm[0]}:{nm[1]} pattern needs layer inputs in multiples of {nm[1]}; a layer has {cols}")
    U, dead = inverse_hessian_factor(H, damp)
    W[:, dead] = 0.0
    mask = torch.zeros_like(W, dtype=torch.bool)
    if nm is not None:
        blocksize = max(nm[1], blocksize - blocksize % nm[1])  # a group of M never straddles two blocks
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        if nm is None:
            score = W1.square() / d.square()[None, :]
            k = int(round(score.numel() * sparsity))
            m1 = torch.zeros(score.numel(), dtype=torch.bool, device=W.device)
            if k:
                m1[torch.topk(score.flatten(), k, largest=False).indices] = True
            m1 = m1.reshape(score.shape)
        else:
            m1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # choose this group's weights on the updated values
                n, m = nm
                score = W1[:, i:i + m].square() / d[i:i + m].square()[None, :]
                m1[:, i:i + m].scatter_(1, torch.topk(score, m - n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(m1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = m1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W[mask] = 0.0
    return W.to(weight.dtype), mask
