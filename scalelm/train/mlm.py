"""Masked-LM pretraining of an encoder (``scalelm train --model.arch=encoder``, or an encoder preset).

The same prepared shards, windows and run harness as next-token pretraining (:mod:`scalelm.train.run`);
what differs is declared here, as a recipe:

* masking (BERT's): 15% of the tokens that are not special (end-of-text, padding) are chosen; of
  those 80% become the mask token, 10% a uniformly random token, 10% stay; the targets are the
  chosen tokens' originals, ``IGNORE_INDEX`` elsewhere. Each window's draw comes from a generator
  seeded by (seed, optimizer step, the window's index in the step's global batch), so a resumed run
  masks exactly as the uninterrupted one, and data-parallel ranks and micro-batches mask as one
  process would (the loss is a mean per micro-batch, as in BERT and Megatron, averaged over them).
* documents: a window holds several documents of the packed stream (``<|endoftext|>`` ends each);
  each attends only within itself (a block-diagonal mask) with positions restarting at its start.
* the loss: :class:`~scalelm.model.encoder.Encoder` gathers the hidden states of the chosen
  positions and runs the MLM head there only; MFU counts those FLOPs (``encoder_flops_per_token``).
* validation (and ``scalelm eval``): masked-LM loss and accuracy on the val split's fixed windows with
  a fixed seeded masking, so the numbers are reproducible and comparable across runs.

The mask token: the tokenizer's own (``<|mask|>``, ``[MASK]``, ``<mask>``) where it has one, else the
id just past the tokenizer (``scalelm prepare``'s tokenizers have none): the model's vocabulary is then
one larger than the tokenizer's and that row is the mask embedding, never a prediction target. The
tokenizer saved with the model (every checkpoint and ``best/``) then has ``<|mask|>`` added as a special
token at that id (:class:`MLMData`), so the model directory, and its Hugging Face export, can be given
the mask as text (``fill-mask``); the data's own ids are unchanged, and a checkpoint's tokenizer still
matches its DATA_DIR (:func:`scalelm.data.tokenizer.check_same_tokenizer`).
"""

from __future__ import annotations

import contextlib
import math
from functools import cached_property
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.loader import TokenData
from ..data.tokenizer import mask_token_id, tokenizer_sha256, with_mask_token  # noqa: F401 (mask_token_id: re-exported)
from ..errors import UserError
from ..model.encoder import MLM_FRACTION
from ..model.loss import IGNORE_INDEX
from .recipe import Plan

MLM_METRICS = ("val_loss", "val_accuracy")
EVAL_SEED = 20260  # the fixed masking of the validation windows (any constant: the same for every run)


class MLMData(TokenData):
    """A DATA_DIR as masked-LM training reads it: the same shards, ids and hash (``run.json`` names the
    data), but the tokenizer written next to every saved model carries the mask token at the id the
    masking uses (see the module docstring)."""

    @cached_property
    def tokenizer_json(self) -> str:
        return with_mask_token(self.data_tokenizer_json)[0]

    @cached_property
    def data_tokenizer_json(self) -> str:
        return TokenData.tokenizer_json.func(self)  # the DATA_DIR's own file, read (and checked) as TokenData does

    @property
    def tokenizer_sha256(self) -> str:
        return tokenizer_sha256(self.data_tokenizer_json)


def window_rngs(*key: int, first: int, n: int) -> list[np.random.Generator]:
    """One generator per window, seeded by ``key`` and the window's index in its global batch: the
    masks of a window do not depend on how the batch is split into micro-batches and ranks."""
    return [np.random.default_rng([*key, first + i]) for i in range(n)]


@torch.no_grad()
def mask_tokens(x: torch.Tensor, rngs: list[np.random.Generator], mask_id: int, n_random: int,
                special: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of token ids ``x`` (B, T), row i drawn from ``rngs[i]``: ``(inputs, targets)``.
    ``n_random``: random replacements are drawn from ids [0, n_random) (the tokenizer's); ``special``
    ids are never chosen."""
    T = x.shape[1]
    draws = [(r.random(T), r.random(T), r.integers(0, n_random, T, dtype=np.int64)) for r in rngs]
    chosen = torch.from_numpy(np.stack([u for u, _, _ in draws]) < MLM_FRACTION)
    for s in special:
        chosen &= x != s
    how = torch.from_numpy(np.stack([h for _, h, _ in draws]))  # < 0.8: the mask token; < 0.9: random; else kept
    rand = torch.from_numpy(np.stack([r for _, _, r in draws]))
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(x, mask_id), x)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), rand, inputs)
    return inputs, torch.where(chosen, x, torch.full_like(x, IGNORE_INDEX))


def document_ids(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) -> the document each position belongs to: a new one starts after each end-of-text
    (which belongs to the document it ends)."""
    ends = (x == eot_id).long()
    return ends.cumsum(1) - ends


class MLMBatches:
    """Masked micro-batches ``(inputs, targets, doc_ids)`` over the LM's windows (a ``BatchLoader``,
    whose state alone says where the run is: the masking follows from it)."""

    def __init__(self, loader, *, seed: int, mask_id: int, n_random: int, eot_id: int,
                 pad_id: Optional[int]):
        self.loader, self.seed, self.mask_id, self.n_random, self.eot_id = loader, seed, mask_id, n_random, eot_id
        self.special = tuple(i for i in (eot_id, pad_id) if i is not None)

    def next_batch(self):
        lo = self.loader
        first = (lo.micro * lo.dp_world + lo.dp_rank) * lo.B  # this micro-batch's first window in the step
        rngs = window_rngs(self.seed, 7, lo.step, first=first, n=lo.B)
        x, _ = lo.next_batch()
        inputs, targets = mask_tokens(x.cpu(), rngs, self.mask_id, self.n_random, self.special)
        dev = x.device
        return inputs.to(dev), targets.to(dev), document_ids(x, self.eot_id)

    @property
    def epoch(self) -> float:
        return self.loader.epoch

    def state_dict(self) -> dict:
        return {**self.loader.state_dict(), "mlm": {"mask_id": self.mask_id, "fraction": MLM_FRACTION}}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        mlm = state.pop("mlm", None)
        if mlm is not None and mlm.get("mask_id") != self.mask_id:
            from ..data.loader import DataError

            raise DataError(f"the run masked with token id {mlm.get('mask_id')}, this data's mask token is "
                            f"{self.mask_id}: resume on the data the run was trained on")
        self.loader.load_state_dict(state)


def mlm_loss(model: nn.Module, batch) -> torch.Tensor:
    """The masked-LM loss: the encoder gathers the chosen positions and predicts only there."""
    inputs, targets, doc_ids = batch
    return model(inputs, targets, doc_ids=doc_ids)[1]


@torch.no_grad()
def mlm_evaluate(model: nn.Module, tokens, *, mask_id: int, n_random: int, eot_id: int, pad_id: Optional[int],
                 batch_size: int, seq_len: int, max_batches: Optional[int] = None,
                 device: Optional[torch.device] = None,
                 autocast: Callable[[], Any] = contextlib.nullcontext, dp_rank: int = 0, dp_world: int = 1) -> dict:
    """Masked-LM ``{"loss", "accuracy", "perplexity", "tokens"}`` over the fixed windows of a split
    (:func:`~scalelm.data.loader.eval_batches`), window i masked with a generator seeded by
    (EVAL_SEED, i): the same positions and replacements for every model, run and batch size. Every rank
    gets the totals."""
    from ..data.loader import eval_batches

    device = device or next(model.parameters()).device
    special = tuple(i for i in (eot_id, pad_id) if i is not None)
    batches = []
    for j, (x, _) in enumerate(eval_batches(tokens, batch_size, seq_len, max_batches, dp_rank, dp_world)):
        k = j * dp_world + dp_rank  # the batch's index in the whole (unsharded) validation set
        inputs, targets = mask_tokens(x, window_rngs(EVAL_SEED, first=k * batch_size, n=len(x)), mask_id,
                                      n_random, special)
        batches.append((inputs, targets, document_ids(x, eot_id)))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # sharded models run collectives in every forward: every rank runs as many batches, the extra count nothing
        n = torch.tensor(len(batches), device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        pad = torch.zeros(1, seq_len, dtype=torch.long)
        batches += [(pad, torch.full_like(pad, IGNORE_INDEX), pad)] * (int(n) - len(batches))
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, correct, predicted
    try:
        for inputs, targets, doc in batches:
            inputs, targets, doc = inputs.to(device), targets.to(device), doc.to(device)
            with autocast():
                logits, loss = model(inputs, targets, doc_ids=doc)
            gold = targets[targets != IGNORE_INDEX]
            n = gold.numel()
            if n:
                sums += torch.stack([loss.double() * n, (logits.argmax(-1) == gold).sum().double(),
                                     torch.tensor(float(n), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    loss_sum, correct, n = sums.tolist()
    if not n:
        return {"loss": float("nan"), "accuracy": float("nan"), "perplexity": float("nan"), "tokens": 0}
    loss = loss_sum / n
    return {"loss": loss, "accuracy": correct / n, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(n)}


def mlm_settings(data, vocab_size: int) -> dict:
    """The masking settings of a DATA_DIR for a model of ``vocab_size`` (refusing one with no room
    for the mask token)."""
    tok = data.tokenizer()
    mask_id = mask_token_id(tok)
    if mask_id >= vocab_size:
        raise UserError(f"masked-LM training needs a mask token: the tokenizer has none, so id {mask_id} (one past "
                        f"it) is used, but model.vocab_size is {vocab_size}: leave it unset or set "
                        f"--model.vocab_size={mask_id + 1} or more")
    return dict(mask_id=mask_id, n_random=data.vocab_size, eot_id=data.eot_id, pad_id=data.pad_id)


class MLMObjective:
    """What masked-LM training changes in a recipe (mixed into ``scalelm train``'s, whose config, data
    and weights it keeps: :class:`scalelm.train.run.MLMRecipe`): masked batches, the masked-LM loss and
    its validation (see the module docstring)."""

    show_metrics = MLM_METRICS

    def batches(self, plan: Plan, ctx, micro_batch: int, accum: int):
        from ..data.loader import BatchLoader

        cfg, data = plan.cfg, plan.data
        data.check_window("train", cfg.model.block_size)
        loader = BatchLoader(data.tokens("train"), micro_batch, cfg.model.block_size, accum, dp_rank=ctx.dp_rank,
                             dp_world=ctx.dp_world, seed=cfg.train.seed, mode=cfg.data.sampling, device=ctx.device)
        return MLMBatches(loader, seed=cfg.train.seed, **mlm_settings(data, cfg.model.vocab_size))

    def loss_fn(self, plan: Plan) -> Callable:
        return mlm_loss

    def evaluate_fn(self, plan: Plan, micro_batch: int) -> Optional[Callable]:
        data, cfg = plan.data, plan.cfg
        settings = mlm_settings(data, cfg.model.vocab_size)
        if cfg.train.eval_every > 0:
            data.check_window("val", cfg.model.block_size)

        def evaluate(trainer) -> dict:
            return mlm_evaluate(trainer.model, data.tokens("val"), **settings, batch_size=micro_batch,
                                seq_len=trainer.seq_len, max_batches=cfg.train.eval_iters, device=trainer.device,
                                autocast=trainer.autocast, dp_rank=trainer.ctx.dp_rank,
                                dp_world=trainer.ctx.dp_world)

        return evaluate

    def describe(self, plan: Plan, batches) -> Optional[str]:
        s = mlm_settings(plan.data, plan.cfg.model.vocab_size)
        return (f"masked LM: {MLM_FRACTION:.0%} of tokens chosen (80% mask id {s['mask_id']}, 10% random, 10% kept), "
                f"documents packed with attention kept within each")

    def summary(self, plan: Plan, trainer, batches, summary: dict) -> dict:
        return {"objective": "masked-lm"}
