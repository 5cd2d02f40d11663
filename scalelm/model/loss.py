"""Next-token cross-entropy over a large vocabulary, computed a few rows at a time.

``F.cross_entropy(logits.float(), ...)`` materialises, per token and vocabulary entry, an fp32
copy of the logits, an fp32 log-softmax kept for backward, and in the backward a zero-filled
gradient, the log-softmax gradient and a cast back: a dozen bytes written per logit, in
buffers so large that on a CPU every step pays their page faults again. Here the same fp32
math runs over chunks of rows small enough to stay in cache: the forward keeps only the
logits (which exist anyway), the backward recomputes each chunk's softmax (one fused kernel)
and writes the gradient once, in the logits' dtype. Same values as ``F.cross_entropy`` (tested); the memory model in
``scalelm.analysis.memory`` counts exactly this.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets with this value (padding) do not count in the loss

# fp32 bytes of logits handled at once: a CPU's L2/L3 cache; on GPUs, few large kernels instead
CHUNK_BYTES = {"cpu": 4 * 2**20}
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _rows_per_chunk(logits: torch.Tensor) -> int:
    budget = CHUNK_BYTES.get(logits.device.type, DEFAULT_CHUNK_BYTES)
    return max(1, budget // (4 * logits.shape[-1]))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 logits


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        acc = _acc(logits.dtype)
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)
        logp = torch.empty(logits.shape[0], dtype=acc, device=logits.device)  # log p(target)
        rows = _rows_per_chunk(logits)
        for s in range(0, logits.shape[0], rows):
            chunk = torch.log_softmax(logits[s:s + rows], dim=-1, dtype=acc)  # one fused kernel
            torch.gather(chunk, 1, safe[s:s + rows, None], out=logp[s:s + rows, None])
        n = valid.sum()
        ctx.save_for_backward(logits, safe, valid, n)
        return -torch.where(valid, logp, 0).sum() / n  # NaN when every target is ignored

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe, valid, n = ctx.saved_tensors
        acc = _acc(logits.dtype)
        # d loss / d logit = (softmax - onehot(target)) * grad / n on counted rows, 0 elsewhere
        row_scale = valid.to(acc) * (grad_loss.to(acc) / n.clamp(min=1))
        grad = torch.empty_like(logits)
        rows = _rows_per_chunk(logits)
        for s in range(0, logits.shape[0], rows):
            sl = slice(s, s + rows)
            p = torch.softmax(logits[sl], dim=-1, dtype=acc).mul_(row_scale[sl, None])
            p.scatter_add_(1, safe[sl, None], -row_scale[sl, None])
            grad[sl] = p
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (..., V) against ``targets`` (...), skipping targets equal
    to ``IGNORE_INDEX``; computed in fp32 whatever the logits' dtype (fp64 stays fp64)."""
    if torch.compiler.is_compiling():  # Inductor fuses the plain form itself; the row loop and
        # its ``out=`` gathers do not trace with symbolic shapes
        acc = _acc(logits.dtype)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(acc), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
    return _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class _TargetLogProbs(torch.autograd.Function):
    """log p(target) per row, chunked as the cross-entropy above (what preference losses sum per reply)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        acc = _acc(logits.dtype)
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)
        logp = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        rows = _rows_per_chunk(logits)
        for s in range(0, logits.shape[0], rows):
            chunk = torch.log_softmax(logits[s:s + rows], dim=-1, dtype=acc)
            torch.gather(chunk, 1, safe[s:s + rows, None], out=logp[s:s + rows, None])
        ctx.save_for_backward(logits, safe, valid)
        return torch.where(valid, logp, 0)

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        logits, safe, valid = ctx.saved_tensors
        acc = _acc(logits.dtype)
        # d logp / d logit = onehot(target) - softmax, on counted rows
        row_scale = torch.where(valid, grad_logp.to(acc), 0)
        grad = torch.empty_like(logits)
        rows = _rows_per_chunk(logits)
        for s in range(0, logits.shape[0], rows):
            sl = slice(s, s + rows)
            p = torch.softmax(logits[sl], dim=-1, dtype=acc).mul_(-row_scale[sl, None])
            p.scatter_add_(1, safe[sl, None], row_scale[sl, None])
            grad[sl] = p
        return grad, None


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` of ``logits`` (..., V) at each position of ``targets`` (...), in fp32, and 0
    where the target is ``IGNORE_INDEX``: summed over a reply it is the reply's log-probability."""
    shape = targets.shape
    if torch.compiler.is_compiling():
        acc = _acc(logits.dtype)
        valid = targets != IGNORE_INDEX
        lp = torch.log_softmax(logits.to(acc), dim=-1).gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0]
        return torch.where(valid, lp, 0)
    return _TargetLogProbs.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).reshape(shape)
