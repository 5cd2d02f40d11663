"""``scalelm finetune translate`` of an encoder-decoder (``--preset transformer-small``, ``--model.arch=
encoder-decoder``, or ``--base`` an encoder-decoder model directory): the examples recipe with
sentence pairs (:class:`~scalelm.tasks.translate.encdec.Seq2SeqBatches`) in place of packed decoder
examples, the label-smoothed training loss, the plain target loss for validation, and the base's
weights as they are (no vocabulary growth, no LoRA), or a GPT base's in both halves (warm_start.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ...checkpoint.names import BEST
from ...config import Config, ConfigError, ModelConfig
from ...errors import UserError
from ..base import Base, ModelFiles
from ..sft.recipe import ExamplesPlan, ExamplesRecipe
from .encdec import EncDecTranslator, Seq2SeqBatches, make_evaluate_fn


def check_encdec(cfg: Config, base: Base, mf: ModelFiles) -> None:
    if cfg.lora.r > 0:
        raise ConfigError("LoRA is for decoder-only models here: fine-tune the encoder-decoder fully (--lora.r=0)")
    if base.dir is not None and (mf.new_ids or cfg.model.vocab_size != base.cfg.vocab_size):
        raise UserError(f"the base {base.dir} has no end-of-text token to start and end a translation with "
                        f"(an encoder-decoder cannot grow its vocabulary): use an encoder-decoder trained by "
                        f"`scalelm finetune translate`, or a GPT whose tokenizer has one (`scalelm prepare`'s do)")


class EncDecTranslateRecipe(ExamplesRecipe):
    def __init__(self, translator: EncDecTranslator, task: str = "translate", warm_from: Optional[ModelConfig] = None):
        super().__init__(f"finetune {task}")
        self.translator, self.task = translator, task
        self.warm_from = warm_from  # the GPT base's config when both halves start from a GPT

    def build_model(self, plan: ExamplesPlan, ctx, resume_from):
        from ...model.io import load_model_dir

        base = plan.base
        if base.dir is None:
            return None, None
        if self.warm_from is not None:  # a GPT base: both halves start from its blocks (warm_start.py)
            from .warm_start import warm_start

            gpt_cfg = dataclasses.replace(self.warm_from, dropout=plan.cfg.model.dropout)
            gpt = load_model_dir(base.dir, model_cfg=gpt_cfg, allow_quantized=False)
            return warm_start(gpt, plan.cfg.model), base.dir
        # continue the base (only its dropout may change)
        return load_model_dir(base.dir, model_cfg=dataclasses.replace(base.cfg, dropout=plan.cfg.model.dropout),
                              allow_quantized=False), base.dir

    def batches(self, plan: ExamplesPlan, ctx, micro_batch: int, accum: int):
        return Seq2SeqBatches(plan.train, micro_batch, accum, eot=self.translator.eot_id, dp_rank=ctx.dp_rank,
                              dp_world=ctx.dp_world, seed=plan.cfg.train.seed, fill=plan.fill, device=ctx.device)

    def loss_fn(self, plan):
        return self.translator.loss

    def evaluate_fn(self, plan: ExamplesPlan, micro_batch: int):
        return make_evaluate_fn(plan.val, micro_batch, self.translator.eot_id, plan.fill)

    def describe(self, plan: ExamplesPlan, batches) -> str:
        return (f"{self.task} (encoder-decoder): {len(plan.train)} training pairs, {len(plan.val)} validation; label "
                f"smoothing {self.translator.label_smoothing}")

    def summary(self, plan: ExamplesPlan, trainer, batches, summary: dict) -> dict:
        return {"task": self.task, "arch": self.translator.arch, "label_smoothing": self.translator.label_smoothing,
                **self.token_summary(plan, batches, summary), **plan.extra_summary,
                "best_dir": str(trainer.run_dir / BEST) if (trainer.run_dir / BEST).is_dir() else None}
