"""The recipe of a decoder-only language model trained on encoded prompt/reply examples: ``finetune sft`` and
``finetune translate`` (decoder-only; the encoder-decoder overrides the batches, loss and model).

The loss counts the reply (target) tokens only (:func:`~scalelm.tasks.sft.objective.sft_loss`),
validation is the mean reply loss, batches are packed windows with a document mask or
length-grouped padded rows, and every model directory the run writes carries the task's files
(chat template, tokenizer config) and ``config.json`` entries. The task module's ``prepare``
reads and encodes its data into an :class:`ExamplesPlan`; everything else is declared here, with
the starting weights: the base's, its vocabulary grown by new special tokens (a LoRA run freezes
that grown model in ``RUN_DIR/base``).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ...checkpoint.names import BEST, LORA_BASE
from ...config import Config
from ...train.recipe import Plan, Recipe
from ..base import Base, ModelFiles


# ----------------------------------------------------------------------------- the starting weights

def build_gpt(base: Base, cfg: Config, mf: ModelFiles):
    """The base's weights, the new tokens' rows at the mean of the old ones."""
    from ...model.gpt import GPT
    from ...model.io import load_model_dir, load_state_dict_into, model_state_dict
    from .vocab import grow_vocab

    src = load_model_dir(base.dir, model_cfg=dataclasses.replace(base.cfg, dropout=cfg.model.dropout),
                         allow_quantized=False)
    if cfg.model.vocab_size == src.cfg.vocab_size and not mf.new_ids:
        return src
    sd = grow_vocab(model_state_dict(src), src.cfg, cfg.model.vocab_size, mf.new_ids, mf.n_old)
    gpt = GPT(cfg.model)
    load_state_dict_into(gpt, sd, source=f"{base.dir} (vocabulary grown to {cfg.model.vocab_size})")
    return gpt


def lora_base(out: Path, base: Base, cfg: Config, mf: ModelFiles, resume_from, ctx) -> tuple:
    """``(gpt, base_dir)`` of a LoRA run. With new tokens the frozen base is the grown model, written
    once to ``RUN_DIR/base`` so that the adapters' base can be loaded (and its hash checked)."""
    from ...lora import lora_base_dir
    from ...model.io import load_model_dir, save_model_dir

    if resume_from is not None:
        d = lora_base_dir(cfg.lora, resume_from, None)
        return load_model_dir(d, model_cfg=cfg.model), d
    if cfg.model.vocab_size == base.cfg.vocab_size and not mf.new_ids:
        d = lora_base_dir(cfg.lora, None, base.dir)
        return load_model_dir(d, model_cfg=cfg.model), d
    gpt = build_gpt(base, cfg, mf)
    d = out / LORA_BASE
    if ctx.is_main:
        save_model_dir(gpt, d, mf.tokenizer_json, extra={**mf.meta, "source": str(base.dir)}, files=mf.files)
    ctx.barrier()
    return gpt, d


def base_model(out: Path, base: Base, cfg: Config, mf: ModelFiles, resume_from, ctx) -> tuple:
    """``(gpt or None, base_dir)``: the base's (grown) weights, or LoRA's frozen base; None from a preset."""
    if base.dir is None:
        return None, None
    if cfg.lora.r > 0:
        return lora_base(out, base, cfg, mf, resume_from, ctx)
    return build_gpt(base, cfg, mf), base.dir


# ----------------------------------------------------------------------------- the recipe

@dataclass
class ExamplesPlan(Plan):
    out: Path = Path(".")
    task: str = ""  # "sft", "translate": the summary's task name
    settings: dict = field(default_factory=dict)
    base: Optional[Base] = None
    model_files: Optional[ModelFiles] = None
    train: list = field(default_factory=list)  # encoded examples (Encoded, or Pair for the encoder-decoder)
    val: list = field(default_factory=list)
    max_length: int = 0
    packing: bool = True
    fill: int = 0  # the id padding is filled with
    about: str = ""  # what the describe line says of the data
    extra_summary: dict = field(default_factory=dict)


class ExamplesRecipe(Recipe):
    """Decoder-only training on examples; ``command`` is set per task (``finetune sft`` ...)."""

    def __init__(self, command: str):
        self.command = command

    def build_model(self, plan: ExamplesPlan, ctx, resume_from):
        return base_model(plan.out, plan.base, plan.cfg, plan.model_files, resume_from, ctx)

    def batches(self, plan: ExamplesPlan, ctx, micro_batch: int, accum: int):
        from .batches import make_batches

        return make_batches(plan.train, plan.packing, micro_batch, accum, plan.max_length, dp_rank=ctx.dp_rank,
                            dp_world=ctx.dp_world, seed=plan.cfg.train.seed, fill=plan.fill, device=ctx.device)

    def loss_fn(self, plan):
        from .objective import sft_loss

        return sft_loss

    def evaluate_fn(self, plan: ExamplesPlan, micro_batch: int):
        from .objective import make_evaluate_fn

        return make_evaluate_fn(plan.val, micro_batch, plan.fill)

    def wrap_model_io(self, plan: ExamplesPlan):
        from .files import TemplateFiles

        mf = plan.model_files  # outermost, so LoRA's adapter files get the template files too
        return lambda io: TemplateFiles(io, mf.files, mf.meta)

    def describe(self, plan: ExamplesPlan, batches) -> str:
        fill_note = f", {batches.fill_ratio():.0%} of each window filled" if plan.packing else ""
        return (f"{plan.task}: {len(plan.train)} training examples, {len(plan.val)} validation{plan.about}; "
                f"packing {'on' if plan.packing else 'off'}{fill_note}")

    def summary(self, plan: ExamplesPlan, trainer, batches, summary: dict) -> dict:
        return {"task": plan.task, "packing": "on" if plan.packing else "off", **self.token_summary(plan, batches, summary),
                **plan.extra_summary, "best_dir": str(trainer.run_dir / BEST) if (trainer.run_dir / BEST).is_dir() else None}

    @staticmethod
    def token_summary(plan: ExamplesPlan, batches, summary: dict) -> dict:
        """Examples, tokens served and supervised, and epochs counted in supervised tokens."""
        elapsed = summary.get("elapsed_s") or 0
        per_epoch = sum(e.n_supervised for e in plan.train)
        return dict(train_examples=len(plan.train), val_examples=len(plan.val), real_tokens=batches.tokens,
                    supervised_tokens=batches.supervised_tokens,
                    supervised_tokens_per_s=batches.supervised_tokens / elapsed if elapsed else None,
                    epochs=round(batches.supervised_tokens / max(1, per_epoch), 4))
