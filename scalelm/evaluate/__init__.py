"""Evaluation: ``scalelm eval`` (loss, perplexity, bits per byte; ``lm``; memorization: ``memorization``)."""

from .lm import evaluate, loss_sums, summarize

__all__ = ["evaluate", "loss_sums", "summarize"]
