"""The encoder-decoder Transformer as a :class:`~scalelm.tasks.translate.model.TranslationModel`.

An example is a source (token ids, read by the encoder) and a target ended by end-of-text. The
decoder reads ``[eot] + target`` and predicts ``target + [eot]``: end-of-text is both the start
token and the stop token, as in :class:`~scalelm.generate.seq2seq.Seq2SeqGenerator`.

:class:`Seq2SeqBatches` are ``GroupedBatches`` (seeded epochs, examples of ``GROUP`` steps sorted
by length, ``(seed, step, micro)`` -> batch, sharded by data-parallel rank, resumable) whose
batch is ``(src, src_valid, tgt_in, labels)``: the source right-padded with its mask, the
decoder's input right-padded, the labels ``IGNORE_INDEX`` on padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ...errors import UserError
from ...model.loss import IGNORE_INDEX
from ..sft.batches import GroupedBatches
from ..sft.encode import EncodeReport
from .decoding import Translations, translate_rows

ARCH = "encoder-decoder"
LABEL_SMOOTHING = 0.1  # the paper's, for training (validation reports the plain loss)


@dataclass
class Pair:
    """A tokenized sentence pair: the source, and the target with end-of-text appended."""
    src: np.ndarray
    tgt: np.ndarray

    @property
    def n_supervised(self) -> int:
        return len(self.tgt)


def collate(pairs: Sequence[Pair], eot: int, fill: int = 0) -> tuple[torch.Tensor, ...]:
    """``(src, src_valid, tgt_in, labels)`` (B, S) / (B, T) of right-padded pairs."""
    S, T = max(len(p.src) for p in pairs), max(len(p.tgt) for p in pairs)
    src = torch.full((len(pairs), S), fill, dtype=torch.long)
    valid = torch.zeros((len(pairs), S), dtype=torch.bool)
    tgt_in = torch.full((len(pairs), T), fill, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for b, p in enumerate(pairs):
        n, m = len(p.src), len(p.tgt)
        src[b, :n] = torch.from_numpy(p.src)
        valid[b, :n] = True
        tgt_in[b, 0] = eot
        tgt_in[b, 1:m] = torch.from_numpy(p.tgt[:-1])
        labels[b, :m] = torch.from_numpy(p.tgt)
    return src, valid, tgt_in, labels


class Seq2SeqBatches(GroupedBatches):
    """Length-grouped batches of :class:`Pair` (see the module docstring)."""

    kind = "seq2seq-grouped"

    def __init__(self, examples: list[Pair], micro_batch_size: int, grad_accum_steps: int = 1, *, eot: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, fill: int = 0, device=None):
        if not examples:
            raise UserError("no training pairs left (every one was cut away by the context limit)")
        self.rows, self.eot = examples, eot
        # grouped by source + target length: both are padded, to the longest of the micro-batch
        self.lengths = np.array([len(p.src) + len(p.tgt) for p in examples], dtype=np.int64)
        self.supervised = np.array([len(p.tgt) for p in examples], dtype=np.int64)
        self.B, self.accum, self.dp_rank, self.dp_world = micro_batch_size, grad_accum_steps, dp_rank, dp_world
        self.seed, self.fill = seed, fill
        self.device = torch.device(device) if device is not None else None
        self.G = micro_batch_size * grad_accum_steps * dp_world
        self.step = self.micro = 0
        self.tokens = self.supervised_tokens = 0
        self._perm: dict[int, np.ndarray] = {}
        self._group = None

    def collate(self, units: list) -> tuple:
        return collate([self.rows[i] for i in units], self.eot, self.fill)


def seq2seq_loss_sums(model: nn.Module, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed target cross-entropy, target tokens) of ``batches``, no label smoothing."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for batch in batches:
        src, valid, tgt_in, labels = (t.to(device) for t in batch)
        loss = model(src, tgt_in, labels, src_valid=valid)[1]
        n = (labels != IGNORE_INDEX).sum()
        total += torch.where(n > 0, loss.double() * n, torch.zeros_like(total))  # NaN for a padding batch
        count += n
    return total, count


def make_evaluate_fn(val: list[Pair], batch_size: int, eot: int, fill: int = 0):
    """The Trainer's ``evaluate_fn``: mean target loss over ``val`` (every rank gets the totals)."""
    rows = sorted(val, key=lambda p: len(p.src) + len(p.tgt))  # fixed, little padding

    def evaluate_fn(trainer) -> dict:
        mine = rows[trainer.ctx.dp_rank::trainer.ctx.dp_world]
        batches = [collate(mine[i:i + batch_size], eot, fill) for i in range(0, len(mine), batch_size)]
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:  # sharded models need every rank in each forward: the short ranks run empty batches
            n = torch.tensor(len(batches), device=trainer.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            empty = (torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                     torch.full((1, 1), eot, dtype=torch.long), torch.full((1, 1), IGNORE_INDEX, dtype=torch.long))
            batches += [empty] * (int(n) - len(batches))
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), trainer.autocast():
                total, count = seq2seq_loss_sums(model, batches, trainer.device)
        finally:
            model.train(was_training)
        if distributed:
            dist.all_reduce(total)
            dist.all_reduce(count)
            replicas = dist.get_world_size() // trainer.ctx.dp_world
            total, count = total / replicas, count // replicas
        total, count = float(total), int(count)
        loss = total / count if count else float("nan")
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if count else float("nan"),
                "supervised_tokens": count}
    return evaluate_fn


class EncDecTranslator:
    """An :class:`~scalelm.model.encdec.EncoderDecoder` translating sources into targets."""

    arch = ARCH

    def __init__(self, model: nn.Module | None, tokenizer, eot_id: int, label_smoothing: float = 0.0,
                 max_source_length: int | None = None, budget: int | None = None):
        self.model, self.tokenizer, self.eot_id, self.label_smoothing = model, tokenizer, eot_id, label_smoothing
        self.max_source_length = max_source_length  # sources are cut to this many tokens (training and inference)
        self.budget = budget  # new tokens when the caller gives none (a summarizer's; else 2x the source + 16)
        self._gen = None
        self.sources_truncated = 0  # by max_source_length, in the last encode_pairs

    # ------------------------------------------------------------------ examples
    def encode_pairs(self, pairs, max_length: int) -> tuple[list[Pair], EncodeReport]:
        """Pairs whose source and target (+ end-of-text) fit ``max_length`` tokens; the others are dropped
        (a cut target would teach the model to stop mid-sentence)."""
        rep = EncodeReport(examples=len(pairs))
        out = []
        self.sources_truncated = 0
        for i, (where, (s, t)) in enumerate(pairs):
            src = self.tokenizer.encode(s.strip(), add_special_tokens=False).ids
            if self.max_source_length is not None and len(src) > self.max_source_length:
                src = src[:self.max_source_length]
                self.sources_truncated += 1
            tgt = self.tokenizer.encode(" " + t.strip(), add_special_tokens=False).ids + [self.eot_id]
            if not src or len(src) > max_length or len(tgt) > max_length:
                rep.dropped.append((i, where))
                continue
            out.append(Pair(np.asarray(src, dtype=np.int64), np.asarray(tgt, dtype=np.int64)))
            rep.tokens += len(src) + len(tgt)
            rep.supervised_tokens += len(tgt)
        return out, rep

    # ------------------------------------------------------------------ training
    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        src, valid, tgt_in, labels = batch
        return model(src, tgt_in, labels, src_valid=valid, label_smoothing=self.label_smoothing)[1]

    def reference_loss(self, pairs, batch_size: int = 32) -> tuple[float, int]:
        """(summed nats, tokens) of each target, end-of-text included, given its source (no label smoothing)."""
        examples, _ = self.encode_pairs(list(enumerate(pairs)), self.model.cfg.block_size)
        examples.sort(key=lambda p: len(p.src) + len(p.tgt))  # less padding, the same sums
        batches = [collate(examples[i:i + batch_size], self.eot_id) for i in range(0, len(examples), batch_size)]
        self.model.eval()
        with torch.no_grad():
            total, count = seq2seq_loss_sums(self.model, batches, next(self.model.parameters()).device)
        return float(total), int(count)

    # ------------------------------------------------------------------ inference
    def generator(self):
        if self._gen is None:
            from ...generate.seq2seq import Seq2SeqGenerator

            self._gen = Seq2SeqGenerator(self.model, self.tokenizer, [self.eot_id], self.eot_id)
        return self._gen

    def translate(self, sources: Sequence[str], beams: int = 1, batch_size: int = 32,
                  max_new_tokens: int | None = None, **controls) -> Translations:
        """One line per source, in order; an empty source gives ''. Each source is translated as it
        would be alone (see :mod:`.decoding`), first cut to ``max_source_length`` tokens as in
        training; the encoder reads at most ``block_size`` tokens, so a longer source is cut to its
        first ``block_size`` (and reported)."""
        if beams < 1 or batch_size < 1:
            raise UserError("--beams and --batch-size must be at least 1")
        gen = self.generator()
        T = self.model.cfg.block_size
        rows = [self.tokenizer.encode(s.strip(), add_special_tokens=False).ids[:self.max_source_length] or None
                for s in sources]
        cut = [i for i, r in enumerate(rows) if r and len(r) > T]
        for i in cut:
            rows[i] = rows[i][:T]
        return translate_rows(gen, self.tokenizer, rows, beams, batch_size, max_new_tokens, cut, T, self.budget,
                              **controls)
