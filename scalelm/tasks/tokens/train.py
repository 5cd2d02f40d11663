"""``scalelm finetune tokens``: train a token tagger (NER, POS, chunking) through the one Trainer.

    scalelm finetune tokens --base MODEL_DIR --train FILE [FILE ...] --val FILE --out RUN_DIR [--section.key=value ...]
    scalelm finetune tokens --preset NAME --tokenizer FILE|DIR --train FILE --val FILE --out RUN_DIR

The base is a GPT (causal: each word is tagged from its left context) or an encoder (both sides).
The run directory is a training run like ``finetune classify``'s (checkpoints, ``best/`` following
validation entity F1, or token accuracy for a tagset without spans, exact resume, time budget,
torchrun); the task's settings are kept in ``RUN_DIR/task.json``. ``--lora.r=8`` trains LoRA
adapters (and the head) on a frozen base.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ...checkpoint.names import BEST
from ...config import Config
from ...errors import UserError
from ...train.recipe import Plan, Recipe, RunRecord, run_recipe
from ..base import add_model_source_args, max_length_of
from ..classify.train import check_same_labels, load_backbone, start_head_task
from ..settings import TASK_FILE, settings
from .align import WordEncoder
from .data import TokenBatches, fallback_tag, label_ids, label_names, read_labelled, spans_of
from .files import TaggerFiles
from .formats import FORMATS
from .model import Tagger

# settings that shape the model or its inputs: a run resumes only with the same ones
FIXED = ("base", "preset", "max_length", "format", "tag_column", "tag_field", "word_field")
DEFAULTS = {"word_field": "tokens"}


def add_format_args(p: argparse.ArgumentParser, as_trained: bool = False) -> None:
    """How a word-tagged file is read (finetune tokens; ``as_trained``: tag and eval --task tokens,
    whose defaults are the model's training settings)."""
    d = "default: as the model was trained, else " if as_trained else "default: "
    p.add_argument("--format", choices=FORMATS, help=f"the file's format ({d}by extension, .conllu or "
                   f".jsonl/.json, else by content: CoNLL columns)")
    p.add_argument("--tag-column", type=int, metavar="N", help=f"CoNLL: the tag's column, counting from 1 (the "
                   f"word is column 1; {d}the last column)")
    p.add_argument("--tag-field", metavar="NAME", help=f"CoNLL-U: the field holding the tag, upos or xpos; JSONL: "
                   f"the key of the tag list ({d}upos / tags)")
    p.add_argument("--word-field", metavar="NAME", help=f"JSONL: the key of the word list ({d}tokens)")


def add_tokens_parser(p: argparse.ArgumentParser) -> None:
    add_model_source_args(p, "with --preset: a tokenizer.json, or a DATA_DIR / model directory holding one (with "
                          "--base the base's tokenizer is used)",
                          "longest example in tokens: a longer sentence is split into windows at word boundaries "
                          "(default: the model's block_size)")
    p.add_argument("--train", nargs="+", metavar="FILE", help="tagged training sentences: CoNLL columns, "
                   "CoNLL-U or JSONL (several files are read as one, e.g. a treebank in parts)")
    p.add_argument("--val", metavar="FILE", help="tagged validation sentences (entity F1, or token accuracy for "
                   "a tagset without spans, picks best/)")
    add_format_args(p)


# ----------------------------------------------------------------------------- settings and data

def _settings(args: argparse.Namespace, saved_task: Optional[dict]) -> dict:
    s = settings(args, saved_task, FIXED, ("base", "tokenizer", "train", "val"), DEFAULTS, "tokens",
                 free=("tokenizer", "train", "val"))
    for k, opt in (("train", "--train FILE"), ("val", "--val FILE")):
        if not s[k]:
            raise UserError(f"no {k} data: pass {opt} (tagged sentences: CoNLL columns, CoNLL-U or JSONL)")
    if s["tag_column"] is not None and s["tag_column"] < 2:
        raise UserError(f"--tag-column counts from 1 and column 1 is the word: give 2 or more, not {s['tag_column']}")
    return s


@dataclass
class TokensData:
    """What the Trainer reads of the data (``tokenizer_json``, ``vocab_size``) and the encoded splits."""

    tokenizer_json: str
    vocab_size: int
    names: list[str]
    spans: bool
    scheme: str
    fallback: str
    train_ids: list[list[int]]
    train_labels: list[list[int]]
    train_sentences: int
    val_words: list[list[str]]
    val_tags: list[list[str]]
    encoder: WordEncoder = field(repr=False)


def load_data(s: dict, tokenizer_json: str, max_length: int, special_tokens: bool) -> TokensData:
    train, scheme = read_labelled(s["train"], s)
    spans = spans_of(train)
    val, _ = read_labelled(s["val"], s, spans)
    first = s["train"][0] if isinstance(s["train"], list) else s["train"]
    names = label_names(train, first)
    y_train = label_ids(train, names, f"--train {first}")
    label_ids(val, names, f"--train {first}")  # an unknown validation tag: refused, naming its line
    enc = WordEncoder(tokenizer_json, max_length, special_tokens)
    wins = enc.windows([x.words for x in train], y_train)
    return TokensData(tokenizer_json, enc.vocab_size, names, spans, scheme, fallback_tag(train),
                      [w.ids for w in wins], [w.labels for w in wins], len(train),
                      [x.words for x in val], [x.tags for x in val], enc)


# ----------------------------------------------------------------------------- the recipe

@dataclass
class TokensPlan(Plan):
    settings: dict = field(default_factory=dict)
    base: object = None
    task: dict = field(default_factory=dict)  # config.json's "task" entry of every saved model


class TokensRecipe(Recipe):
    command = "finetune tokens"
    metric, higher_is_better = "val_f1", True  # val_accuracy for a tagset without spans (set in prepare)
    show_metrics = ("val_loss", "val_f1", "val_accuracy")

    def prepare(self, args, out: Path, saved: Optional[Config]) -> TokensPlan:
        saved_task, s, base, vocab, cfg = start_head_task(args, out, saved, _settings, self.command, "a tagger")
        max_length = max_length_of(s, cfg, least=1)
        special = cfg.model.arch == "encoder"
        data = load_data(s, base.tokenizer_json, max_length, special)
        check_same_labels(out, saved_task, data.names, "the training files", "tag")
        self.metric = "val_f1" if data.spans else "val_accuracy"
        files = s["train"] if isinstance(s["train"], list) else [s["train"]]
        record = RunRecord.of_files(files[0], base.tokenizer_json, vocab, *files, s["val"])
        task = {"labels": data.names, "spans": data.spans, "scheme": data.scheme, "fallback": data.fallback,
                "max_length": max_length, "special_tokens": special, "format": s["format"],
                "tag_column": s["tag_column"], "tag_field": s["tag_field"], "word_field": s["word_field"]}
        files = {TASK_FILE: json.dumps({**s, "labels": data.names}, indent=2) + "\n"}
        return TokensPlan(cfg, data, record, files, settings=s, base=base, task=task)

    def build_model(self, plan: TokensPlan, ctx, resume_from):
        backbone, base_dir = load_backbone(plan, resume_from)
        return Tagger(backbone, len(plan.data.names)), base_dir

    def batches(self, plan: TokensPlan, ctx, micro_batch: int, accum: int):
        d = plan.data
        return TokenBatches(d.train_ids, d.train_labels, micro_batch, accum, ctx.dp_rank, ctx.dp_world,
                            plan.cfg.train.seed, d.encoder.fill_id, ctx.device)

    def loss_fn(self, plan):
        from .metrics import tokens_loss

        return tokens_loss

    def evaluate_fn(self, plan: TokensPlan, micro_batch: int):
        from .metrics import make_evaluate_fn

        d = plan.data
        return make_evaluate_fn(d.encoder, d.val_words, d.val_tags, d.names, d.fallback, d.spans, micro_batch)

    def model_io(self, plan: TokensPlan):
        return TaggerFiles(plan.task)

    def describe(self, plan: TokensPlan, batches) -> Optional[str]:
        d = plan.data
        how = f"entity F1 ({d.scheme} read as IOB2)" if d.spans else "token accuracy"
        return (f"tagging {len(d.names)} tags, scored by {how}: {d.train_sentences} training sentences in "
                f"{len(d.train_ids)} windows, {len(d.val_words)} validation sentences")

    def summary(self, plan: TokensPlan, trainer, batches, summary: dict) -> dict:
        return dict(task="tokens", labels=plan.data.names, train_sentences=plan.data.train_sentences,
                    val_sentences=len(plan.data.val_words), epochs=round(batches.epoch, 4),
                    best_dir=str(trainer.run_dir / BEST) if (trainer.run_dir / BEST).is_dir() else None)


def run_tokens(args: argparse.Namespace) -> int:
    return run_recipe(TokensRecipe(), args)
