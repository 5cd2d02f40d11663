"""``scalelm finetune dpo``: preference tuning through the one Trainer.

    scalelm finetune dpo --base MODEL_DIR|hf:ORG/NAME --data PAIRS --out RUN_DIR [--val PAIRS | --val-fraction F]
                         [--loss sigmoid|ipo|simpo] [--beta B] [--label-smoothing E] [--simpo-gamma G]
                         [--template chatml|alpaca|plain|FILE.jinja] [--max-length N] [--section.key=value ...]

Pairs (:mod:`~scalelm.tasks.preference.pairs`) are rendered with the base's chat template (or
``--template``) and only the replies' tokens count. The reference is the base itself: its
log-probabilities of every pair are computed once before the first step and cached beside the run
(``RUN_DIR/reference_logps.safetensors``), so no second copy of the model is kept; with
``--lora.r`` the base is the model with its adapters off. The run is a training run like any other:
exact resume after a kill, ``best/`` by validation loss, ``--train.max_minutes``, torchrun.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from ...checkpoint.names import BEST
from ...config import ConfigError
from ...errors import UserError
from ...train.recipe import RunRecord, TokenizerData, run_recipe
from ..base import BASE_HELP, base_or_tokenizer, max_length_of, split_val, task_config
from ..settings import TASK_FILE, read_task_file, settings
from ..sft.encode import Encoder
from ..sft.recipe import ExamplesPlan, ExamplesRecipe
from ..sft.template import BUILTIN
from ..sft.train import prepare_chat
from .losses import DEFAULT_BETA, LOSSES, REFERENCE_FREE

FIXED = ("base", "preset", "data", "val", "val_fraction", "template", "special_tokens", "max_length", "loss", "beta",
         "label_smoothing", "simpo_gamma")
DEFAULTS = {"val_fraction": 0.05, "loss": "sigmoid", "label_smoothing": 0.0, "simpo_gamma": 0.5}
# preference tuning moves a trained model a little: TRL's learning rate, a short warmup
DPO_DEFAULTS = {"optim": {"lr": 5e-6, "min_lr": 5e-7, "warmup_steps": 10, "weight_decay": 0.0},
                "train": {"max_steps": 300, "eval_every": 50, "save_every": 100, "micro_batch_size": 4}}


def add_dpo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", metavar="MODEL_DIR", help=BASE_HELP + "; usually an SFT model (the reference too)")
    p.add_argument("--config", help="a TOML config file (same keys as the dotted overrides)")
    p.add_argument("--out", required=True, help="the run directory (checkpoints, metrics.jsonl, best/)")
    p.add_argument("--resume", help="resume from this checkpoint or RUN_DIR instead of --out's latest")
    p.add_argument("--max-length", type=int, help="longest example in tokens, prompt and reply (default: the model's "
                   "block_size); longer pairs keep the end of the prompt")
    p.epilog = "Any config field is an override: --optim.lr=5e-6 --train.max_steps=300 --lora.r=16 ..."
    p.set_defaults(accepts_overrides=True)
    p.add_argument("--data", metavar="FILE", help="preference pairs: JSONL/JSON with prompt/chosen/rejected (text, "
                   "or HH-style dialogues), chosen/rejected message lists, or whole HH dialogues")
    p.add_argument("--val", metavar="FILE", help="validation pairs (same formats)")
    p.add_argument("--val-fraction", type=float, help="without --val: hold out this fraction of --data (default "
                   "0.05, a fixed shuffle)")
    p.add_argument("--loss", choices=LOSSES, help="sigmoid (DPO, the default; with --label-smoothing: conservative "
                   "DPO), ipo, or simpo (reference-free: average log-probabilities and a margin)")
    p.add_argument("--beta", type=float, help="the loss's temperature (default 0.1; simpo 2.0)")
    p.add_argument("--label-smoothing", type=float, help="the share of pairs assumed mislabelled, in [0, 0.5) "
                   "(sigmoid, simpo; default 0)")
    p.add_argument("--simpo-gamma", type=float, help="SimPO's target margin gamma (default 0.5)")
    p.add_argument("--template", help=f"chat template: {', '.join(BUILTIN)} or a Jinja file (default: the base's "
                   "own template if it has one, else chatml)")
    p.add_argument("--special-token", dest="special_tokens", action="append", metavar="TOKEN",
                   help="a token the template needs as one id; repeatable")


def check_loss_settings(s: dict) -> None:
    if s["beta"] is None:
        s["beta"] = DEFAULT_BETA[s["loss"]]
    if not s["beta"] > 0:
        raise UserError(f"--beta must be positive, not {s['beta']}")
    if not 0 <= s["label_smoothing"] < 0.5:
        raise UserError(f"--label-smoothing must be in [0, 0.5), not {s['label_smoothing']}")
    if s["label_smoothing"] and s["loss"] == "ipo":
        raise UserError("--label-smoothing is for --loss sigmoid or simpo (IPO has no labels to smooth)")


@dataclass
class PreferencePlan(ExamplesPlan):
    reference: bool = True  # the loss needs the reference's log-probabilities
    ref: dict = field(default_factory=dict)  # "train"/"val" -> (n, 2) arrays, filled by build_model
    report: dict = field(default_factory=dict)


class DPORecipe(ExamplesRecipe):
    metric = "val_loss"
    show_metrics = ("val_loss", "val_rewards/accuracies", "val_rewards/margins")

    def __init__(self):
        super().__init__("finetune dpo")

    def prepare(self, args, out: Path, saved) -> PreferencePlan:
        from tokenizers import Tokenizer

        from ...checkpoint.kinds import FLOAT_LANGUAGE_MODELS
        from ...data.tokenizer import vocab_size_of
        from .encode import encode_pairs
        from .pairs import read_pairs

        if not getattr(args, "base", None) and read_task_file(out) is None:
            raise UserError("preference tuning moves a trained model (usually an SFT model): pass --base MODEL_DIR")
        s = settings(args, read_task_file(out), FIXED, ("base", "data", "val"), DEFAULTS, "dpo")
        if not s["data"]:
            raise UserError("no pairs: pass --data FILE (prompt/chosen/rejected JSONL, chat pairs or HH dialogues)")
        check_loss_settings(s)
        if s["template"] is not None and s["template"] not in BUILTIN:
            s["template"] = str(Path(s["template"]).resolve())
        base = base_or_tokenizer(s, "-", FLOAT_LANGUAGE_MODELS, "scalelm finetune dpo")
        chat = prepare_chat(base, s["template"], s["special_tokens"], 0)
        vocab = vocab_size_of(chat.tokenizer)
        cfg = task_config(args, s, saved, base, vocab, defaults=DPO_DEFAULTS)
        if cfg.parallel.pp > 1:
            raise ConfigError("preference tuning trains with data or tensor parallelism; use --parallel.pp=1")
        chat = prepare_chat(base, s["template"], s["special_tokens"], cfg.model.block_size)
        max_length = max_length_of(s, cfg)
        pairs = read_pairs(s["data"])
        if s["val"]:
            val_pairs = read_pairs(s["val"])
        else:
            pairs, val_pairs = split_val(pairs, s["val_fraction"], cfg.train.seed)
        enc = Encoder(chat.tokenizer, chat.template, max_length)
        train, rep = encode_pairs(enc, pairs)
        val, vrep = encode_pairs(enc, val_pairs)
        for what, r, path in (("training", rep, s["data"]), ("validation", vrep, s["val"] or s["data"])):
            if r.dropped:
                print(f"warning: {len(r.dropped)} of {r.pairs} {what} pairs have no reply token within the context "
                      f"of {max_length} tokens and are skipped: {', '.join(r.dropped[:5])}", file=sys.stderr)
        if not train or not val:
            raise UserError(f"no {'training' if not train else 'validation'} pair has a reply token within "
                            f"{max_length} tokens: raise --max-length or check {s['data']}")
        reference = s["loss"] not in REFERENCE_FREE
        chat.files.meta["task"] = {"name": "dpo", "loss": s["loss"], "beta": s["beta"], "template": chat.template.name,
                                   "special_tokens": chat.specials, "max_length": max_length,
                                   "reference": s["base"] if reference else None}
        tok_json = chat.files.tokenizer_json
        pad = Tokenizer.from_str(tok_json).token_to_id("<|pad|>")
        report = {"train_pairs": len(train), "val_pairs": len(val), "truncated_pairs": rep.truncated + vrep.truncated,
                  "dropped_pairs": len(rep.dropped) + len(vrep.dropped), "loss": s["loss"], "beta": s["beta"]}
        return PreferencePlan(
            cfg, TokenizerData(tok_json, vocab), RunRecord.of_files(s["data"], tok_json, vocab, s["data"], s["val"]),
            {TASK_FILE: json.dumps(s, indent=2) + "\n"}, out=out, task="dpo", settings=s, base=base,
            model_files=chat.files, train=train, val=val, max_length=max_length, packing=False, fill=pad or 0,
            about=f" pairs ({rep.truncated} truncated, {len(rep.dropped)} dropped); loss {s['loss']}, beta {s['beta']:g}",
            reference=reference, report=report)

    def build_model(self, plan: PreferencePlan, ctx, resume_from):
        model, base_dir = super().build_model(plan, ctx, resume_from)
        if plan.reference:
            plan.ref = self._reference(plan, model, base_dir, ctx)
        return model, base_dir

    def _reference(self, plan: PreferencePlan, model, base_dir, ctx) -> dict:
        """The reference's log-probabilities of every pair: read from the run's cache, or computed
        with the starting weights (each rank a share) and cached."""
        from ...precision import autocast_context, resolve_precision
        from ...checkpoint.names import REFERENCE_CACHE
        from .objective import cache_key, read_reference_cache, reference_logps, write_reference_cache

        path = plan.out / REFERENCE_CACHE
        precision = resolve_precision(plan.cfg.train.precision, ctx.device)
        key = cache_key({"train": plan.train, "val": plan.val}, str(Path(base_dir).resolve()), precision)
        cached = read_reference_cache(path, key)
        if cached is not None:
            plan.report["reference"] = "cached"
            return cached
        model.to(ctx.device)
        autocast = autocast_context(precision, ctx.device)
        bs = plan.cfg.train.micro_batch_size
        ref = {name: reference_logps(model, pairs, bs, ctx.device, autocast, ctx.dp_rank, ctx.dp_world)
               for name, pairs in (("train", plan.train), ("val", plan.val))}
        if ctx.is_main:
            write_reference_cache(path, key, ref)
        ctx.barrier()
        plan.report["reference"] = "computed"
        return ref

    def batches(self, plan: PreferencePlan, ctx, micro_batch: int, accum: int):
        from .batches import PairBatches

        return PairBatches(plan.train, plan.ref.get("train"), micro_batch, accum, dp_rank=ctx.dp_rank,
                           dp_world=ctx.dp_world, seed=plan.cfg.train.seed, fill=plan.fill, device=ctx.device)

    def _objective(self, plan: PreferencePlan):
        from .objective import PreferenceObjective

        s = plan.settings
        return PreferenceObjective(s["loss"], s["beta"], s["label_smoothing"], s["simpo_gamma"])

    def loss_fn(self, plan: PreferencePlan):
        return self._objective(plan)

    def evaluate_fn(self, plan: PreferencePlan, micro_batch: int):
        from .objective import evaluate_pairs

        objective = self._objective(plan)

        def evaluate(trainer) -> dict:
            return evaluate_pairs(objective, trainer.model, plan.val, plan.ref.get("val"), micro_batch,
                                  trainer.device, trainer.autocast, trainer.ctx.dp_rank, trainer.ctx.dp_world)
        return evaluate

    def describe(self, plan: PreferencePlan, batches) -> str:
        return f"dpo: {len(plan.train)} training pairs, {len(plan.val)} validation{plan.about}"

    def summary(self, plan: PreferencePlan, trainer, batches, summary: dict) -> dict:
        elapsed = summary.get("elapsed_s") or 0
        return {"task": "dpo", **plan.report, "real_tokens": batches.tokens, "supervised_tokens": batches.supervised_tokens,
                "supervised_tokens_per_s": batches.supervised_tokens / elapsed if elapsed else None,
                "epochs": round(batches.step * batches.G / max(1, len(plan.train)), 4),
                "best_dir": str(trainer.run_dir / BEST) if (trainer.run_dir / BEST).is_dir() else None}


def run_dpo(args: argparse.Namespace) -> int:
    return run_recipe(DPORecipe(), args)

