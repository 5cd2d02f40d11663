"""``scalelm finetune classify``: train a text classifier through the one Trainer.

    scalelm finetune classify --base MODEL_DIR --train FILE --val FILE --out RUN_DIR [--section.key=value ...]
    scalelm finetune classify --preset NAME --tokenizer FILE|DIR --train FILE --val FILE --out RUN_DIR

The run directory is a training run like ``scalelm train``'s (checkpoints, ``latest``, ``best/``
following validation accuracy, metrics.jsonl, exact resume, time budget, torchrun); the task's own
settings are kept in ``RUN_DIR/task.json``, so ``scalelm finetune classify --out RUN_DIR`` alone
continues a run. ``--lora.r=8`` trains LoRA adapters (and the head) on a frozen base.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ...checkpoint.names import BEST
from ...config import Config, ConfigError
from ...errors import UserError
from ...train.recipe import Plan, Recipe, RunRecord, run_recipe
from ..base import BASE_HELP, Base, base_or_tokenizer, max_length_of, task_config
from ..settings import TASK_FILE, read_task_file, settings
from .data import (
    ClassifyBatches,
    TextEncoder,
    detect_format,
    label_ids,
    label_names,
    read_examples,
)
from .files import ClassifierFiles
from .model import POOLINGS, Classifier

# settings that shape the model or its inputs: a run resumes only with the same ones
FIXED = ("base", "preset", "pooling", "max_length", "append_eos", "format", "text_field", "label_field")
# pooling and append_eos follow the base: "last" and True on a GPT, "first" and False on an encoder
DEFAULTS = {"text_field": "text", "label_field": "label"}


def add_classify_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (one of)")
    src.add_argument("--base", metavar="MODEL_DIR", help=BASE_HELP)
    src.add_argument("--preset", help="train a model of this preset from scratch (needs --tokenizer)")
    p.add_argument("--tokenizer", metavar="FILE|DIR", help="with --preset: a tokenizer.json, or a DATA_DIR / model "
                   "directory holding one (with --base the base's tokenizer is used)")
    p.add_argument("--config", help="a TOML config file (same keys as the dotted overrides)")
    p.add_argument("--train", metavar="FILE", help="labelled training texts (SST lines, .tsv/.csv, .jsonl)")
    p.add_argument("--val", metavar="FILE", help="labelled validation texts (accuracy picks best/)")
    p.add_argument("--out", required=True, help="the run directory (checkpoints, metrics.jsonl, best/)")
    p.add_argument("--resume", help="resume from this checkpoint or RUN_DIR instead of --out's latest")
    p.add_argument("--format", choices=["sst", "tsv", "csv", "jsonl"],
                   help="the files' format (default: by extension; .tsv/.csv/.jsonl/.json, else SST)")
    p.add_argument("--text-field", help="the text column / JSON field (default: text)")
    p.add_argument("--label-field", help="the label column / JSON field (default: label)")
    p.add_argument("--pooling", choices=POOLINGS, help="the head reads the last real token (default on a GPT; what "
                   "Hugging Face's *ForSequenceClassification does), the mean over the text's tokens, or (an "
                   "encoder base; its default) the first token, [CLS], through BERT's pooler")
    p.add_argument("--max-length", type=int, help="longest example in tokens: longer texts are truncated "
                   "(default: the model's block_size)")
    p.add_argument("--no-eos", dest="append_eos", action="store_const", const=False, default=None,
                   help="do not end each text with the end-of-text token (default on a GPT: end it, so the "
                        "last token has seen the whole text; an encoder reads its tokenizer's own special tokens)")
    p.epilog = "Any config field is an override: --optim.lr=1e-4 --train.max_steps=500 --lora.r=8 ..."
    p.set_defaults(accepts_overrides=True)


# ----------------------------------------------------------------------------- settings

def _settings(args: argparse.Namespace, saved_task: Optional[dict]) -> dict:
    """The task's settings: this command line, else the run's task.json, else the defaults."""
    s = settings(args, saved_task, FIXED, ("base", "tokenizer", "train", "val"), DEFAULTS, "classify",
                 free=("tokenizer", "train", "val"))
    if s["preset"] and not s["tokenizer"]:
        raise UserError(f"--preset {s['preset']} trains from scratch and needs a tokenizer: --tokenizer FILE (a "
                        f"tokenizer.json) or a DATA_DIR / model directory holding one")
    for k, opt in (("train", "--train FILE"), ("val", "--val FILE")):
        if not s[k]:
            raise UserError(f"no {k} data: pass {opt} (labelled texts: SST lines, .tsv/.csv with a header, .jsonl)")
    return s


# ----------------------------------------------------------------------------- data

@dataclass
class ClassifyData:
    """What the Trainer reads of the data (``tokenizer_json``, ``vocab_size``) and the encoded splits."""

    tokenizer_json: str
    vocab_size: int
    names: list[str]
    train_ids: list[list[int]]
    train_labels: np.ndarray
    val_ids: list[list[int]]
    val_labels: np.ndarray
    encoder: TextEncoder = field(repr=False)


def load_data(s: dict, tokenizer_json: str, max_length: int, special_tokens: bool = False) -> ClassifyData:
    fmt_train, fmt_val = detect_format(s["train"], s["format"]), detect_format(s["val"], s["format"])
    train = read_examples(s["train"], fmt_train, s["text_field"], s["label_field"])
    val = read_examples(s["val"], fmt_val, s["text_field"], s["label_field"])
    names = label_names(train, s["train"])
    y_train, y_val = label_ids(train, names, "--train"), label_ids(val, names, f"--train {s['train']}")
    # lowercase training text (SST-2): read every later text lowercased too, so cased input is not a new domain
    lower = all(e.text == e.text.lower() for e in train)
    enc = TextEncoder(tokenizer_json, max_length, s["append_eos"], lowercase=lower, special_tokens=special_tokens)
    return ClassifyData(tokenizer_json, enc.vocab_size, names, enc.encode([e.text for e in train]), y_train,
                        enc.encode([e.text for e in val]), y_val, enc)


# ----------------------------------------------------------------------------- the recipe

def start_head_task(args, out: Path, saved: Optional[Config], settings_of, command: str, what: str):
    """What a task with a head on a base (classify, tokens) resolves first: ``(saved task.json or None,
    settings, base, the tokenizer's vocabulary size, config)``. The base may be a GPT (any float kind)
    or an encoder; the head trains under data parallelism only."""
    from tokenizers import Tokenizer

    from ...checkpoint.kinds import ENCODER, FLOAT_LANGUAGE_MODELS
    from ...data.tokenizer import vocab_size_of

    saved_task = read_task_file(out)
    s = settings_of(args, saved_task)
    base = base_or_tokenizer(s, "FILE (a tokenizer.json) or a DATA_DIR / model directory holding one",
                             (*FLOAT_LANGUAGE_MODELS, ENCODER), f"scalelm {command}")
    vocab = vocab_size_of(Tokenizer.from_str(base.tokenizer_json))
    cfg = task_config(args, s, saved, base, vocab, defaults=None)
    if cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        raise ConfigError(f"{what} trains with data parallelism (DDP, or FSDP2 with --parallel.dp_shard); "
                          f"use --parallel.tp=1 --parallel.pp=1")
    return saved_task, s, base, vocab, cfg


def check_same_labels(out: Path, saved_task: Optional[dict], names: list[str], source, what: str = "label") -> None:
    """A resumed run keeps its label set (the head's rows mean those labels)."""
    if saved_task is not None and saved_task.get("labels") not in (None, names):
        raise UserError(f"{out} was trained on the {what}s {saved_task['labels']}, but {source} has {names}: resume "
                        f"with the same {what} set, or use another --out")


def load_backbone(plan, resume_from):
    """``(backbone, base_dir)``: the base's weights (a resumed LoRA run's recorded base, hash checked)
    or, from a preset, a fresh model of ``plan.cfg.model`` (a GPT or an encoder)."""
    from ...lora import lora_base_dir
    from ...model.build import build_model
    from ...model.io import load_model_dir

    base_dir = plan.base.dir
    if base_dir is None:
        return build_model(plan.cfg.model), None
    base_dir = lora_base_dir(plan.cfg.lora, resume_from, base_dir)
    return load_model_dir(base_dir, model_cfg=plan.cfg.model, allow_quantized=False), base_dir


@dataclass
class ClassifyPlan(Plan):
    settings: dict = field(default_factory=dict)
    base: Optional[Base] = None
    task: dict = field(default_factory=dict)  # config.json's "task" entry of every saved model


class ClassifyRecipe(Recipe):
    command = "finetune classify"
    metric, higher_is_better = "val_accuracy", True
    show_metrics = ("val_loss", "val_accuracy", "val_macro_f1")

    def prepare(self, args, out: Path, saved: Optional[Config]) -> ClassifyPlan:
        saved_task, s, base, vocab, cfg = start_head_task(args, out, saved, _settings, self.command, "a classifier")
        encoder = cfg.model.arch == "encoder"
        if s["pooling"] is None:
            s["pooling"] = "first" if encoder else "last"
        if s["append_eos"] is None:
            s["append_eos"] = not encoder
        if s["pooling"] == "first" and not encoder:
            raise UserError("--pooling first reads the first token, which in a causal GPT has seen only itself: use "
                            "--pooling last or mean, or an encoder base (model.arch encoder)")
        max_length = max_length_of(s, cfg, least=1)
        data = load_data(s, base.tokenizer_json, max_length, special_tokens=encoder)
        check_same_labels(out, saved_task, data.names, s["train"])
        record = RunRecord.of_files(s["train"], base.tokenizer_json, vocab, s["train"], s["val"])
        task = {"labels": data.names, "append_eos": bool(s["append_eos"]), "lowercase": data.encoder.lowercase,
                "eos_id": data.encoder.eos_id, "pad_id": data.encoder.pad_id, "max_length": max_length,
                "text_field": s["text_field"], "label_field": s["label_field"], "format": s["format"],
                "special_tokens": encoder}
        files = {TASK_FILE: json.dumps({**s, "labels": data.names}, indent=2) + "\n"}
        return ClassifyPlan(cfg, data, record, files, settings=s, base=base, task=task)

    def build_model(self, plan: ClassifyPlan, ctx, resume_from):
        gpt, base_dir = load_backbone(plan, resume_from)
        return Classifier(gpt, len(plan.data.names), plan.settings["pooling"]), base_dir

    def batches(self, plan: ClassifyPlan, ctx, micro_batch: int, accum: int):
        d = plan.data
        return ClassifyBatches(d.train_ids, d.train_labels, micro_batch, accum, ctx.dp_rank, ctx.dp_world,
                               plan.cfg.train.seed, d.encoder.fill_id, ctx.device)

    def loss_fn(self, plan):
        from .metrics import classify_loss

        return classify_loss

    def evaluate_fn(self, plan: ClassifyPlan, micro_batch: int):
        from .metrics import make_evaluate_fn

        d = plan.data
        return make_evaluate_fn(d.val_ids, d.val_labels, d.names, micro_batch, d.encoder.fill_id)

    def model_io(self, plan: ClassifyPlan):
        return ClassifierFiles(plan.task)

    def summary(self, plan: ClassifyPlan, trainer, batches, summary: dict) -> dict:
        return dict(task="classify", labels=plan.data.names, train_examples=len(plan.data.train_ids),
                    val_examples=len(plan.data.val_ids), epochs=round(batches.epoch, 4),
                    best_dir=str(trainer.run_dir / BEST) if (trainer.run_dir / BEST).is_dir() else None)


def run_classify(args: argparse.Namespace) -> int:
    return run_recipe(ClassifyRecipe(), args)
