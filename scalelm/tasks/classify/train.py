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
import torch

from ...config import Config, ConfigError
from ...errors import UserError
from ...fileio import atomic_write_text
from ...model.gpt import GPT
from ...runs import TOKENIZER
from ...train import state as ts
from ..settings import TASK_FILE, read_task_file, settings
from .data import (
    ClassifyBatches,
    TextEncoder,
    detect_format,
    files_sha256,
    label_ids,
    label_names,
    read_examples,
)
from .files import ClassifierFiles
from .model import POOLINGS, Classifier

# settings that shape the model or its inputs: a run resumes only with the same ones
FIXED = ("base", "preset", "pooling", "max_length", "append_eos", "format", "text_field", "label_field")
DEFAULTS = {"text_field": "text", "label_field": "label", "pooling": "last", "append_eos": True}


def add_classify_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (one of)")
    src.add_argument("--base", metavar="MODEL_DIR", help="fine-tune this model directory (or RUN_DIR's latest)")
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
    p.add_argument("--pooling", choices=POOLINGS, help="the head reads the last real token (default; what Hugging "
                   "Face's *ForSequenceClassification does) or the mean over the text's tokens")
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: block_size)")
    p.add_argument("--no-eos", dest="append_eos", action="store_const", const=False, default=None,
                   help="do not end each text with the end-of-text token (default: end it, so the last "
                        "token has seen the whole text)")
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


def _resolve_config(args, s: dict, saved: Optional[Config], base_cfg, vocab_size: int) -> Config:
    from ...config import resolve
    from ...train.run import vocab_is_explicit

    if saved is not None and not (args.preset or args.config):
        cfg = resolve(overrides=args.overrides, base=saved)
    elif base_cfg is not None:
        start = Config()
        start.model = base_cfg
        cfg = resolve(config_file=args.config, overrides=args.overrides, base=start)
    else:
        cfg = resolve(preset=s["preset"], config_file=args.config, overrides=args.overrides)
        if not vocab_is_explicit(args):
            cfg.model.vocab_size = vocab_size
    if base_cfg is not None:  # the base fixes the shape; only dropout may change
        diffs = [f"model.{k} is {getattr(base_cfg, k)!r} in the base, {getattr(cfg.model, k)!r} here"
                 for k in vars(base_cfg) if k != "dropout" and getattr(base_cfg, k) != getattr(cfg.model, k)]
        if diffs:
            raise ConfigError(f"--base {s['base']} fixes the model's shape ({'; '.join(diffs)}): drop those "
                              f"--model.* settings (only --model.dropout may change)")
    if vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is "
                          f"{cfg.model.vocab_size}: set --model.vocab_size={vocab_size} or more")
    if cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        raise ConfigError("a classifier trains with data parallelism (DDP, or FSDP2 with --parallel.dp_shard); "
                          "use --parallel.tp=1 --parallel.pp=1")
    return cfg.validate()


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


@dataclass
class RunRecord:
    """What ``prepare_run_dir`` / ``write_run_config`` record of the data in run.json."""

    dir: str
    tokenizer_sha256: str
    vocab_size: int
    meta: dict


def load_data(s: dict, tokenizer_json: str, max_length: int) -> ClassifyData:
    fmt_train, fmt_val = detect_format(s["train"], s["format"]), detect_format(s["val"], s["format"])
    train = read_examples(s["train"], fmt_train, s["text_field"], s["label_field"])
    val = read_examples(s["val"], fmt_val, s["text_field"], s["label_field"])
    names = label_names(train, s["train"])
    y_train, y_val = label_ids(train, names, "--train"), label_ids(val, names, f"--train {s['train']}")
    # lowercase training text (SST-2): read every later text lowercased too, so cased input is not a new domain
    lower = all(e.text == e.text.lower() for e in train)
    enc = TextEncoder(tokenizer_json, max_length, s["append_eos"], lowercase=lower)
    return ClassifyData(tokenizer_json, enc.vocab_size, names, enc.encode([e.text for e in train]), y_train,
                        enc.encode([e.text for e in val]), y_val, enc)


def _base_model_cfg(base: str):
    from ...model.io import read_model_config
    from ...runs import resolve_checkpoint

    d = resolve_checkpoint(base)
    if not (d / TOKENIZER).is_file():
        raise UserError(f"the base {d} has no {TOKENIZER}: a classifier reads text with its base's tokenizer")
    return d, read_model_config(d), (d / TOKENIZER).read_text()


def _tokenizer_json(spec: str) -> str:
    from ...data.tokenizer import load_tokenizer

    return load_tokenizer(spec).to_str()


# ----------------------------------------------------------------------------- the command

def run_classify(args: argparse.Namespace) -> int:
    from ...lora import lora_base_dir
    from ...model.io import load_model_dir
    from ...train.run import open_run, report_run
    from ...train.trainer import Trainer, batch_geometry
    from .metrics import classify_loss, make_evaluate_fn

    out = Path(args.out)
    saved = ts.read_run_config(out)
    saved_task = read_task_file(out)
    s = _settings(args, saved_task)
    base_dir, base_cfg = None, None
    if s["base"]:
        base_dir, base_cfg, tokenizer_json = _base_model_cfg(s["base"])
    else:
        tokenizer_json = _tokenizer_json(s["tokenizer"])
    from tokenizers import Tokenizer

    from ...data.tokenizer import tokenizer_sha256, vocab_size_of

    vocab = vocab_size_of(Tokenizer.from_str(tokenizer_json))
    cfg = _resolve_config(args, s, saved, base_cfg, vocab)
    if args.resume:
        cfg.checkpoint.resume = args.resume
    max_length = s["max_length"] or cfg.model.block_size
    if not 1 <= max_length <= cfg.model.block_size:
        raise UserError(f"--max-length must be between 1 and the model's block_size {cfg.model.block_size}")
    data = load_data(s, tokenizer_json, max_length)
    if saved_task is not None and saved_task.get("labels") not in (None, data.names):
        raise UserError(f"{out} was trained on the labels {saved_task['labels']}, but {s['train']} has "
                        f"{data.names}: resume with the same label set, or use another --out")
    record = RunRecord(s["train"], tokenizer_sha256(tokenizer_json), vocab,
                       {"inputs_sha256": files_sha256(s["train"], s["val"])})
    task = {"labels": data.names, "append_eos": bool(s["append_eos"]), "lowercase": data.encoder.lowercase,
            "eos_id": data.encoder.eos_id,
            "pad_id": data.encoder.pad_id, "max_length": max_length, "text_field": s["text_field"],
            "label_field": s["label_field"], "format": s["format"]}
    with open_run(out, cfg, record, saved, "finetune classify") as (ctx, resume_from):
        torch.manual_seed(cfg.train.seed)  # the same head (and from-scratch GPT) on every rank
        if base_dir is not None:  # a resumed LoRA run continues on its recorded base (hash checked)
            base_dir = lora_base_dir(cfg.lora, resume_from, base_dir)
            gpt = load_model_dir(base_dir, model_cfg=cfg.model, allow_quantized=False)
        else:
            gpt = GPT(cfg.model)
        model = Classifier(gpt, len(data.names), s["pooling"])
        B, accum = batch_geometry(cfg, ctx.dp_world)
        batches = ClassifyBatches(data.train_ids, data.train_labels, B, accum, ctx.dp_rank, ctx.dp_world,
                                  cfg.train.seed, data.encoder.fill_id, ctx.device)
        files = ClassifierFiles(task)
        evaluate_fn = make_evaluate_fn(data.val_ids, data.val_labels, data.names, B, data.encoder.fill_id)
        trainer = Trainer(cfg, data, out, ctx=ctx, model=model, resume_from=resume_from, batches=batches,
                          loss_fn=classify_loss, evaluate_fn=evaluate_fn, metric="val_accuracy",
                          higher_is_better=True, model_io=files, base_dir=base_dir)
        if trainer.is_main:
            ts.write_run_config(out, cfg, record)
            atomic_write_text(out / TASK_FILE, json.dumps({**s, "labels": data.names}, indent=2) + "\n")
        summary = trainer.fit()
        summary.update(task="classify", labels=data.names, train_examples=len(data.train_ids),
                       val_examples=len(data.val_ids), epochs=round(batches.epoch, 4),
                       best_dir=str(out / "best") if trainer.best_step else None)
    return report_run(trainer, summary)
