"""Perplexity of a model on any text file, with rolling windows (``scalelm eval RUN --text FILE``).

The file is one document: its tokens, then end-of-text (as ``prepare`` writes a document), are
scored left to right in windows of ``seq_len`` tokens that advance by ``stride``. Each window
scores only the tokens the previous one did not, so every token after the first is scored once,
with at least ``seq_len - stride`` tokens of context (the strided evaluation of HF's perplexity
guide). ``stride = seq_len`` gives non-overlapping windows, as ``eval --data`` uses.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import UserError
from ..model.loss import IGNORE_INDEX
from ..train.validation import loss_sums


def read_text(path: str | Path, option: str = "--text",
              advice: str = "convert it, or prepare it with `scalelm prepare` (which replaces invalid bytes)") -> str:
    """A UTF-8 text file that has some text, or a UserError naming ``option`` (the flag that gave it)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{option} {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{option} {p} is not UTF-8 text (byte {e.start} cannot be decoded): {advice}") from None
    if not text.strip():
        raise UserError(f"{option} {p} is empty")
    return text


def rolling_windows(ids: list[int], seq_len: int, stride: int) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) per window; targets already scored by an earlier window are IGNORE_INDEX."""
    n = len(ids)
    scored = 0  # targets ids[1..scored] are done
    for begin in range(0, n - 1, stride):
        end = min(begin + seq_len, n - 1)
        x, y = ids[begin:end], ids[begin + 1:end + 1]
        fresh = end - max(scored, begin)
        y = [IGNORE_INDEX] * (len(y) - fresh) + y[len(y) - fresh:]
        yield x, y
        scored = end
        if end == n - 1:
            break


def _batches(windows, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    group: list = []
    for w in windows:
        if group and (len(group) == batch_size or len(w[0]) != len(group[0][0])):
            yield torch.tensor([g[0] for g in group]), torch.tensor([g[1] for g in group])
            group = []
        group.append(w)
    if group:
        yield torch.tensor([g[0] for g in group]), torch.tensor([g[1] for g in group])


def text_perplexity(model, tokenizer, text: str, eot_id: int, seq_len: int, stride: int, batch_size: int = 8,
                    device=None, autocast: Callable = contextlib.nullcontext) -> dict:
    if not 1 <= stride <= seq_len:
        raise UserError(f"--stride must be between 1 and the window length {seq_len}, not {stride}")
    ids = tokenizer.encode(text, add_special_tokens=False).ids + [eot_id]
    if len(ids) < 2:
        raise UserError("the text is a single token: nothing to score")
    device = device or next(model.parameters()).device
    loss_sum, tokens = loss_sums(model, _batches(rolling_windows(ids, seq_len, stride), batch_size), device, autocast)
    n_bytes, n_words = len(text.encode("utf-8")), max(1, len(text.split()))
    return {"loss": loss_sum / tokens, "perplexity": math.exp(min(loss_sum / tokens, 700.0)),
            "bits_per_byte": loss_sum / math.log(2) / n_bytes, "word_perplexity": math.exp(min(loss_sum / n_words, 700.0)),
            "tokens": tokens, "bytes": n_bytes, "words": n_words, "seq_len": seq_len, "stride": stride}
