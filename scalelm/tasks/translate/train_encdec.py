"""``scalelm finetune translate`` of an encoder-decoder (``--preset transformer-small``, ``--model.arch=
encoder-decoder``, or ``--base`` an encoder-decoder model directory): the run of ``train_lm_task``
(run directory, task.json, the one Trainer, exact resume, ``best/`` by validation loss, torchrun)
with sentence pairs (:class:`~scalelm.tasks.translate.encdec.Seq2SeqBatches`) in place of packed
decoder examples, label-smoothed training loss and the plain target loss for validation.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from ...config import Config, ConfigError
from ...errors import UserError
from ...fileio import atomic_write_text
from ...train import state as ts
from ..sft.run import TASK_FILE, Base, ModelFiles, RunRecord, TrainerData
from .encdec import EncDecTranslator, Seq2SeqBatches, make_evaluate_fn


def check_encdec(cfg: Config, base: Base, mf: ModelFiles) -> None:
    if cfg.lora.r > 0:
        raise ConfigError("LoRA is for decoder-only models here: fine-tune the encoder-decoder fully (--lora.r=0)")
    if base.dir is not None and (mf.new_ids or cfg.model.vocab_size != base.cfg.vocab_size):
        raise UserError(f"the base {base.dir} has no end-of-text token to start and end a translation with: "
                        f"continue an encoder-decoder trained by `scalelm finetune translate`")


def train_encdec(args, s: dict, cfg: Config, saved: Config | None, base: Base, mf: ModelFiles,
                 translator: EncDecTranslator, train: list, val: list, record: RunRecord, fill: int = 0,
                 before_train=None, extra_summary: dict | None = None) -> int:
    from tokenizers import Tokenizer

    from ...data.tokenizer import vocab_size_of
    from ...model.io import load_model_dir
    from ...train.model_io import ModelIO
    from ...train.run import open_run, report_run
    from ...train.trainer import Trainer, batch_geometry
    from ..sft.files import TemplateFiles

    check_encdec(cfg, base, mf)
    out = Path(args.out)
    data = TrainerData(mf.tokenizer_json, vocab_size_of(Tokenizer.from_str(mf.tokenizer_json)))
    eot = translator.eot_id
    with open_run(out, cfg, record, saved, "finetune translate") as (ctx, resume_from):
        if ctx.is_main:  # first: what follows may write into RUN_DIR, which must then count as a run
            ts.write_run_config(out, cfg, record)
            atomic_write_text(out / TASK_FILE, json.dumps(s, indent=2) + "\n")
            if before_train is not None:
                before_train(out)
        ctx.barrier()
        torch.manual_seed(cfg.train.seed)
        model = None
        if base.dir is not None:  # continue the base (only its dropout may change)
            model = load_model_dir(base.dir, model_cfg=dataclasses.replace(base.cfg, dropout=cfg.model.dropout),
                                   allow_quantized=False)
        B, accum = batch_geometry(cfg, ctx.dp_world)
        batches = Seq2SeqBatches(train, B, accum, eot=eot, dp_rank=ctx.dp_rank, dp_world=ctx.dp_world,
                                 seed=cfg.train.seed, fill=fill, device=ctx.device)
        trainer = Trainer(cfg, data, out, ctx=ctx, model=model, resume_from=resume_from, batches=batches,
                          loss_fn=translator.loss, evaluate_fn=make_evaluate_fn(val, B, eot, fill),
                          model_io=TemplateFiles(ModelIO(), mf.files, mf.meta), base_dir=base.dir)
        if trainer.is_main:
            print(f"translate (encoder-decoder): {len(train)} training pairs, {len(val)} validation; label "
                  f"smoothing {translator.label_smoothing}", file=sys.stderr)
        summary = trainer.fit()
        elapsed = summary.get("elapsed_s") or 0
        sup_epoch = sum(p.n_supervised for p in train)
        summary.update(task="translate", arch=translator.arch, label_smoothing=translator.label_smoothing,
                       train_examples=len(train), val_examples=len(val), real_tokens=batches.tokens,
                       supervised_tokens=batches.supervised_tokens,
                       supervised_tokens_per_s=batches.supervised_tokens / elapsed if elapsed else None,
                       epochs=round(batches.supervised_tokens / max(1, sup_epoch), 4),
                       **(extra_summary or {}), best_dir=str(out / "best") if trainer.best_step else None)
    return report_run(trainer, summary)
