"""``scalelm train``: language-model pretraining, the plainest recipe on the recipe runner.

    scalelm train --preset baby --data data/shakespeare --out runs/baby [--section.key=value ...]
    scalelm train --data DATA_DIR --out RUN_DIR --init-from MODEL_DIR [--lora.r=8]   (a new run from weights)

Next-token windows of a DATA_DIR, the LM loss and validation: the defaults of
:class:`~scalelm.train.recipe.Recipe`; an encoder (``model.arch = "encoder"``) trains as a masked LM
on the same windows (:class:`~scalelm.train.mlm.MLMRecipe`). This module declares only the config (a preset, the saved run,
``--preset auto``'s choice, or ``--init-from``'s shape), the data and the starting weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import Config
from ..errors import CheckpointError, UserError
from ..fileio import json_safe
from . import state as ts
from .mlm import MLMData, MLMObjective, mask_token_id, mlm_settings
from .recipe import Plan, Recipe, resolve_run_config, run_recipe, vocab_is_explicit


def add_train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML config file (same keys as the dotted overrides)")
    p.add_argument("--preset", help="a named preset (see `scalelm presets`), or auto: the shape, batch, lr and "
                   "regularization for --train.max_minutes on this data and machine (scalelm/train/auto.py)")
    p.add_argument("--data", help="a DATA_DIR written by `scalelm prepare` (or data.path in the config)")
    p.add_argument("--out", required=True, help="the run directory (checkpoints, metrics.jsonl, best/)")
    p.add_argument("--resume", help="resume from this checkpoint or RUN_DIR instead of --out's latest")
    p.add_argument("--init-from", help="start a new run from the weights of this model directory")
    p.epilog = "Any config field is an override: --optim.lr=1e-3 --train.max_steps=2000 ..."
    p.set_defaults(accepts_overrides=True)


@dataclass
class PretrainPlan(Plan):
    init_from: Optional[Path] = None  # --init-from's model directory


class PretrainRecipe(Recipe):
    command = "train"

    def prepare(self, args: argparse.Namespace, out: Path, saved: Optional[Config]) -> PretrainPlan:
        from ..checkpoint.kinds import ENCDEC, ENCODER, FLOAT_LANGUAGE_MODELS, require_kind
        from ..data.loader import TokenData
        from ..model.io import read_model_config
        from ..runs import latest_checkpoint, resolve_checkpoint

        auto = args.preset == "auto"
        if auto and saved is not None:  # resuming an auto run: its choice is in its recorded config
            print(f"auto: resuming with the recipe recorded in {out}", file=sys.stderr)
        init = resolve_checkpoint(args.init_from) if args.init_from else None
        if init is not None:
            require_kind(init, "scalelm train --init-from", FLOAT_LANGUAGE_MODELS + (ENCODER,),
                         hint={ENCDEC: "train it on sentence pairs with `scalelm finetune translate`"})
        if init is not None and (args.resume or (saved is not None and latest_checkpoint(out) is not None)):
            raise UserError(f"{out} already holds a run to resume; --init-from starts a new one: use another --out")
        reuse_saved = saved is not None and (auto or not (args.preset or args.config))
        # with no --preset or --config, --init-from's checkpoint gives the shape (only dropout may change)
        init_shape = init is not None and not reuse_saved and not (args.preset or args.config)
        cfg = resolve_run_config(args, saved, preset=None if auto else args.preset,
                                 model=read_model_config(init) if init_shape else None,
                                 fixed=f"--init-from {args.init_from}" if init_shape else None,
                                 reuse_saved=reuse_saved, check_vocab=False)
        if cfg.model.arch == "encoder-decoder":  # next-token windows of a DATA_DIR are a decoder-only objective
            what = f"--init-from {args.init_from} is" if init_shape else f"the model (model.arch={cfg.model.arch}) is"
            raise UserError(f"`scalelm train` pretrains decoder-only language models (GPT, Llama-style, LoRA); {what} "
                            f"an encoder-decoder: train it on sentence pairs with `scalelm finetune translate`")
        if args.data:
            cfg.data.path = args.data
        if not cfg.data.path:
            raise UserError("no training data: pass --data DATA_DIR (made by `scalelm prepare`)")
        encoder = cfg.model.arch == "encoder"  # masked-LM pretraining on the same shards (scalelm/train/mlm.py)
        # an encoder's saved tokenizer gains the mask token (MLMData); the shards and their ids are the same
        data = (MLMData if encoder else TokenData)(cfg.data.path)
        if not (reuse_saved or init_shape or vocab_is_explicit(args)):
            cfg.model.vocab_size = data.vocab_size
            if encoder:  # room for the mask token where the tokenizer has none
                cfg.model.vocab_size = max(data.vocab_size, mask_token_id(data.tokenizer()) + 1)
        cfg.validate()
        plan = PretrainPlan(cfg, data, init_from=init)
        if encoder:
            if auto:
                raise UserError("--preset auto chooses a GPT (decoder-only) shape; pick an encoder preset "
                                "(`scalelm presets`) or --model.* settings")
            mlm_settings(data, cfg.model.vocab_size)  # a vocabulary without room for the mask token: refused now
            plan.recipe = MLMRecipe()
        if auto and saved is None:
            from ..checkpoint.names import AUTO_RECORD
            from .auto import choose

            plan.cfg, record = choose(cfg, data, args.overrides)
            plan.files[AUTO_RECORD] = json.dumps(json_safe(record), indent=2) + "\n"
        if init is not None:
            try:
                ts.check_model_config(init, plan.cfg.model)
            except CheckpointError as e:
                raise CheckpointError(f"--init-from {args.init_from} starts a new run from those weights, so the "
                                      f"run's model must have their shape: {e}. Drop --preset/--config and the "
                                      f"--model.* settings that differ (the checkpoint's shape is then taken)") from None
            ts.check_tokenizer(init, data.dir)
        return plan

    def build_model(self, plan: PretrainPlan, ctx, resume_from):
        from ..model.io import load_model_dir

        model = base_dir = None
        if plan.init_from is not None and resume_from is None:
            base_dir = plan.init_from
            model = load_model_dir(base_dir, allow_quantized=False)
        cfg = plan.cfg
        if cfg.lora.r > 0 or resume_from is not None:  # a LoRA run resumes on its recorded base (hash checked)
            from ..lora import lora_base_dir

            base_dir = lora_base_dir(cfg.lora, resume_from, base_dir)
            if resume_from is not None and base_dir is not None:
                model = load_model_dir(base_dir, allow_quantized=False)
        return model, base_dir


class MLMRecipe(MLMObjective, PretrainRecipe):
    """``scalelm train`` of an encoder (``model.arch = "encoder"``): this recipe's config, data and
    starting weights, trained as a masked LM (:mod:`scalelm.train.mlm`)."""


def run_train(args: argparse.Namespace) -> int:
    return run_recipe(PretrainRecipe(), args)
