"""``--preset auto``: the shape, batch, learning rate and regularization for a time budget.

    scalelm train --preset auto --data DATA --out RUN --train.max_minutes=10

The user fixes the minutes and the data; everything else follows from them:

1. **Candidates**: one model family, width ``w`` = 64, 96, ... (heads of 32), depth
   ``max(2, round(w / 32))`` (nanoGPT's CPU baby is 4x128). The user's style keys (norm, mlp,
   positions, ...) are kept; only the shape changes.
2. **Speed, measured**: every candidate trains ``PROBE_STEPS`` real steps here (the trainer's own
   step, ``scalelm.train.probe``: the run's precision and weights, bf16 with fp32 masters where
   that is the default, clipping, AdamW), so the tokens it can see in the minutes left, ``D``,
   come from this machine, not from a FLOP rate (small models are far from the matmul peak).
3. **Predicted loss**: ``L = E + A / N^alpha + B / D'^beta`` with Chinchilla's fit (Hoffmann et al.
   2022, approach 3), N the non-embedding parameters. ``D'`` is the effective data of Muennighoff
   et al. (2023, "Scaling Data-Constrained Language Models"): epochs after the first are worth less
   and less, ``D' = U (1 + R* (1 - exp(-R / R*)))`` with ``U`` the unique training tokens,
   ``R = D / U - 1`` repeats and ``R* = 15.4``. Only the trade-off between N and D' is used, not
   the absolute values (they are for another tokenizer). Widths grow until the prediction has
   risen twice in a row; the lowest wins.
4. **The regime**: with ``epochs = D / U`` above 1 the run is data-constrained, and a bigger model
   than the data can feed would only memorise it. So dropout rises with the epochs
   (``0.05 * log2(epochs)``, at most 0.2; none within 1.5 epochs), weight decay stays 0.1, and the
   run evaluates ~20 times (8-32k validation tokens each) and stops early when validation has not improved for 5 evaluations
   (``best/`` keeps the best). A data-rich run gets no dropout and the same checks.
5. **Optimization**: about 1,500 optimizer steps (global batch a power of two, 8-64 sequences
   of ``block_size`` 256), Kaplan et al.'s learning rate for N (eq. D.1), warm-up 5% of the
   steps (50-300), cosine to lr/10 over the minutes (the trainer's time-budget schedule).

The probe's own time comes out of the budget. The choice is printed and written to
``RUN_DIR/auto.json``; any key the user sets on the command line wins over it. Resuming an
auto run reuses its recorded config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import Config, ConfigError
from .scaling import CHINCHILLA, HEAD_DIM, family_config, kaplan_lr  # shared with `scalelm sweep`

PROBE_STEPS = 2
PROBE_MICRO_BATCH = 8
MAX_WIDTH = 1024
BLOCK_SIZE = 256
TARGET_STEPS = 1500
EVALS, PATIENCE = 20, 5
R_STAR = 15.4  # Muennighoff et al. (2023), the half-life of repeated data
BATCH_KEYS = {"train.micro_batch_size", "train.global_batch_size", "train.global_batch_tokens",
              "train.grad_accum_steps"}
EVAL_SHARE = 0.05  # of the time, for the ~20 validation passes (eval_iters is sized to fit)


def effective_tokens(tokens: float, unique: float, r_star: float = R_STAR) -> float:
    """Muennighoff et al. (2023), eq. 5: what ``tokens`` drawn from ``unique`` tokens are worth."""
    if tokens <= unique:
        return tokens
    repeats = tokens / unique - 1
    return unique * (1 + r_star * (1 - math.exp(-repeats / r_star)))


def predicted_loss(n_params: float, tokens: float, unique: float, law: dict = CHINCHILLA) -> float:
    d_eff = effective_tokens(tokens, unique)
    return law["E"] + law["A"] / n_params ** law["alpha"] + law["B"] / max(d_eff, 1.0) ** law["beta"]


def dropout_for(epochs: float) -> float:
    """None within 1.5 epochs; then 0.05 per doubling of the epochs, at most 0.2."""
    return 0.0 if epochs <= 1.5 else round(min(0.2, 0.05 * math.log2(epochs)), 3)


@dataclass
class Candidate:
    n_layer: int
    width: int
    params: int  # non-embedding
    step_s: float  # one optimizer step of PROBE_MICRO_BATCH x block_size tokens
    tokens: float  # what the minutes left buy
    epochs: float
    loss: float  # predicted (relative)

    @property
    def shape(self) -> str:
        return f"{self.n_layer}x{self.width}"

    @property
    def tokens_per_s(self) -> float:
        return PROBE_MICRO_BATCH * BLOCK_SIZE / self.step_s


def shape_config(base, width: int):
    """The family member ``width`` wide (the sweep's family: ``scalelm.train.scaling``)."""
    return family_config(base, width)


def time_step(cfg: Config, model_cfg, micro_batch: int, steps: int = PROBE_STEPS) -> float:
    """Median seconds of one optimizer step of ``model_cfg``, as the trainer takes it for ``cfg``
    (forward, backward, clipping, AdamW; its precision and master weights), after a warm-up step."""
    from .probe import time_steps

    return time_steps(cfg, model_cfg, micro_batch=micro_batch, repeats=steps)


def survey(cfg: Config, unique_tokens: int, seconds: float,
           timer: Callable = time_step, log: Callable[[str], None] = lambda s: None) -> list[Candidate]:
    """Time and score widths 64, 96, ... until the predicted loss has risen twice in a row."""
    from ..model.gpt import GPT

    out: list[Candidate] = []
    rises = 0
    for width in range(HEAD_DIM * 2, MAX_WIDTH + 1, HEAD_DIM):
        mcfg = shape_config(cfg.model, width)
        with torch.device("meta"):
            params = GPT(mcfg).num_params(False)
        step_s = timer(cfg, mcfg, PROBE_MICRO_BATCH)
        tokens = PROBE_MICRO_BATCH * mcfg.block_size / step_s * seconds * (1 - EVAL_SHARE)
        c = Candidate(mcfg.n_layer, width, params, step_s, tokens, tokens / unique_tokens,
                      predicted_loss(params, tokens, unique_tokens))
        log(f"auto: {c.shape:>7} {c.params:>11,} params {c.tokens_per_s:>9,.0f} tok/s "
            f"{c.tokens / 1e6:>8.2f}M tokens {c.epochs:>7.1f} epochs  predicted {c.loss:.4f}")
        rises = rises + 1 if out and c.loss > min(o.loss for o in out) else 0
        out.append(c)
        if rises >= 2:
            break
    return out


def recipe(best: Candidate, block_size: int, val_tokens: int) -> dict[str, dict]:
    """The config sections for the winning candidate (before the user's own keys are put back)."""
    seqs = best.tokens / block_size / TARGET_STEPS
    batch = int(min(64, max(8, 2 ** round(math.log2(max(seqs, 1))))))
    micro = min(batch, 16)
    steps = best.tokens / (batch * block_size)
    lr = kaplan_lr(best.params)
    every = max(25, int(steps / EVALS))
    # a validation token costs ~1/3 of a training token: EVALS passes take EVAL_SHARE of the time, but
    # each reads at least 8k tokens (a noisier one would stop early on noise) and at most 32k
    per_eval = min(32768, max(8192, 3 * EVAL_SHARE * best.tokens / EVALS))
    iters = max(1, min(math.ceil(per_eval / (micro * block_size)), (val_tokens - 1) // (micro * block_size)))
    return {
        "model": dict(n_layer=best.n_layer, n_embd=best.width, n_head=best.width // HEAD_DIM,
                      block_size=block_size, dropout=dropout_for(best.epochs)),
        "train": dict(micro_batch_size=micro, global_batch_size=batch, max_steps=10 ** 9, eval_every=every,
                      eval_iters=iters, early_stop_patience=PATIENCE, save_every=10 ** 9),
        "optim": dict(lr=round(lr, 6), min_lr=round(lr / 10, 7), warmup_steps=int(min(300, max(50, 0.05 * steps))),
                      weight_decay=0.1, schedule="cosine"),
    }


def explicit_keys(overrides: list[str]) -> set[str]:
    return {a.lstrip("-").split("=", 1)[0].replace("-", "_") for a in overrides if a.startswith("--")}


def choose(cfg: Config, data, overrides: list[str], log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
           timer: Callable = time_step) -> tuple[Config, dict]:
    """Fill ``cfg`` for its ``train.max_minutes`` and ``data``; keys in ``overrides`` are kept.
    Returns the config and the record of the decision (for ``auto.json``)."""
    t0 = time.perf_counter()
    minutes = cfg.train.max_minutes
    if minutes is None:
        raise ConfigError("--preset auto chooses the model from a time budget: add --train.max_minutes=M "
                          "(e.g. --train.max_minutes=10)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would time, and choose, on its own
        raise ConfigError("--preset auto chooses on one process; run it once without torchrun, then train "
                          "its RUN_DIR/auto.json choice under torchrun with those keys")
    if cfg.model.arch != "gpt":
        raise ConfigError("--preset auto chooses a GPT (decoder-only) shape; drop --model.arch")
    mine = explicit_keys(overrides)
    block = cfg.model.block_size if "model.block_size" in mine else BLOCK_SIZE
    unique = len(data.tokens("train"))
    val = len(data.tokens("val")) if "val" in data.splits else 0
    block = min(block, max(16, (min(unique, val or unique) - 1) // 2))
    base = dataclasses.replace(cfg.model, block_size=block, dropout=0.0)
    log(f"auto: {minutes:g} min on {unique:,} training tokens (vocabulary {cfg.model.vocab_size:,}, "
        f"context {block}); timing candidates")
    cands = survey(dataclasses.replace(cfg, model=base), unique, 60 * minutes, timer=timer, log=log)
    best = min(cands, key=lambda c: c.loss)
    sections = recipe(best, block, val)
    probe_s = time.perf_counter() - t0
    sections["train"]["max_minutes"] = max(0.1, minutes - probe_s / 60)
    if mine & BATCH_KEYS:  # the user's batch, whichever way it was given
        for key in ("micro_batch_size", "global_batch_size"):
            sections["train"].pop(key)
    for section, values in sections.items():
        target = getattr(cfg, section)
        for key, value in values.items():
            if f"{section}.{key}" not in mine:
                setattr(target, key, value)
    cfg.validate()
    regime = "data-constrained" if best.epochs > 1 else "compute-constrained"
    log(f"auto: chose {best.shape} ({best.params:,} params), {best.epochs:.1f} epochs predicted ({regime}): "
        f"batch {cfg.train.global_batch_size or cfg.train.micro_batch_size} x {cfg.model.block_size}, lr {cfg.optim.lr:.2e}, "
        f"dropout {cfg.model.dropout}, early stop after {cfg.train.early_stop_patience} evaluations without gain; "
        f"probing took {probe_s:.0f} s of the budget")
    record = {"minutes": minutes, "unique_train_tokens": unique, "block_size": block, "regime": regime,
              "probe_seconds": probe_s, "law": CHINCHILLA, "r_star": R_STAR,
              "candidates": [dict(dataclasses.asdict(c), shape=c.shape, tokens_per_s=c.tokens_per_s) for c in cands],
              "chosen": best.shape, "config": sections, "kept_from_command_line": sorted(mine)}
    return cfg, record
