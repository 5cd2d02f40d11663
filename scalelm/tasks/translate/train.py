"""``scalelm finetune translate`` and ``scalelm finetune summarize``: one sequence-to-sequence recipe.
A decoder-only GPT trained on ``"source => target"`` pairs, or an encoder-decoder trained on
(source, target) pairs (below).

    scalelm finetune translate --base MODEL_DIR --source train.en --target train.de
                               --val-source val.en --val-target val.de --out RUN_DIR [--section.key=value ...]
    scalelm finetune translate --preset NAME [--tokenizer T | --vocab-size N] ... (from scratch)
    scalelm finetune summarize --preset NAME --train a.jsonl b.jsonl [--val v.jsonl | --val-fraction F]
                               --source-field email_body --target-field subject_line --max-source-length 256 ...

The pairs come from line-aligned files (``--source``/``--target``) or from two fields of JSONL
records (``--train``/``--val`` with ``--source-field``/``--target-field``; without ``--val`` a fixed
shuffle's ``--val-fraction`` of the training records validates). ``--max-source-length N`` cuts
every source to its first N tokens (training and, from the model's config, inference); the
number cut is reported. The two tasks differ in their name (a model knows which it is) and in
their default output budget: a translation is given twice its source + 16 tokens, a summary
the longest training target (``max_new_tokens`` of the model's task entry).

The loss counts the target tokens only. From scratch without ``--tokenizer``, a byte-level BPE
is trained on both sides of the training pairs (kept in ``RUN_DIR/tokenizer.json`` for resuming).
Everything else is the fine-tuning run of ``scalelm finetune sft`` (exact resume, ``best/`` by
validation loss, packing, LoRA, torchrun); ``scalelm translate RUN --input FILE`` translates.

With an encoder-decoder config (``--preset transformer-small``, ``--model.arch=encoder-decoder``, or
an encoder-decoder ``--base``) the encoder reads the source and the decoder writes the target
(:mod:`~scalelm.tasks.translate.train_encdec`), with ``--label-smoothing`` (default 0.1). A GPT
``--base`` with ``--model.arch=encoder-decoder`` warm-starts both halves from the GPT
(:mod:`~scalelm.tasks.translate.warm_start`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ...checkpoint.names import TOKENIZER
from ...config import ConfigError
from ...errors import UserError
from ...train.recipe import RunRecord, TokenizerData, run_recipe
from ..base import (Base, ModelFiles, add_model_source_args, max_length_of, read_base, split_val, task_config,
                    tokenizer_json_of)
from ..settings import TASK_FILE, read_task_file, settings
from ..sft.recipe import ExamplesPlan, ExamplesRecipe
from ..sft.train import add_packing_arg
from .data import corpus, read_jsonl_pairs, read_pairs
from .encdec import ARCH as ENCDEC
from .encdec import LABEL_SMOOTHING, EncDecTranslator
from .model import SEPARATOR, TASK, DecoderTranslator
from .train_encdec import EncDecTranslateRecipe, check_encdec
from .warm_start import asks_encdec, encdec_config

FIXED = ("base", "preset", "tokenizer", "vocab_size", "source", "target", "val_source", "val_target", "packing",
         "max_length", "label_smoothing", "train", "val", "val_fraction", "source_field", "target_field",
         "max_source_length")
PATHS = ("base", "tokenizer", "source", "target", "val_source", "val_target", "train", "val")
DEFAULTS = {"packing": "on", "vocab_size": 8000, "source_field": "source", "target_field": "target",
            "val_fraction": 0.05}
RUN_TOKENIZER = TOKENIZER  # RUN_DIR/tokenizer.json: the BPE trained for a from-scratch run


def add_translate_parser(p: argparse.ArgumentParser) -> None:
    add_model_source_args(p, "with --preset: a tokenizer.json or a directory holding one (default: train a BPE "
                             "on both sides of the training pairs)")
    add_packing_arg(p)
    p.add_argument("--source", metavar="FILE", help="training sources, one per line (e.g. train.en)")
    p.add_argument("--target", metavar="FILE", help="their targets, line-aligned (e.g. train.de)")
    p.add_argument("--val-source", metavar="FILE", help="validation sources")
    p.add_argument("--val-target", metavar="FILE", help="validation targets")
    p.add_argument("--train", nargs="+", metavar="FILE.jsonl", help="instead of --source/--target: JSONL records "
                   "with a source and a target field (several files are concatenated)")
    p.add_argument("--val", metavar="FILE.jsonl", help="validation records (default: --val-fraction of --train)")
    p.add_argument("--val-fraction", type=float, help="without --val: the share of --train that validates "
                   "(default 0.05, a fixed shuffle)")
    p.add_argument("--source-field", help="the JSON field of the source text (default: source)")
    p.add_argument("--target-field", help="the JSON field of the target text (default: target)")
    p.add_argument("--max-source-length", type=int, metavar="N", help="cut every source to its first N tokens "
                   "(training and inference; the number cut is reported); default: no cut of its own")
    p.add_argument("--vocab-size", type=int, help="with --preset and no --tokenizer: the BPE's size (default 8000)")
    p.add_argument("--label-smoothing", type=float, help="encoder-decoder only: label smoothing of the training "
                   "loss (default 0.1, as in the Transformer paper; validation reports the plain loss)")


def add_summarize_parser(p: argparse.ArgumentParser) -> None:
    add_translate_parser(p)


def _tokenizer(s: dict, out: Path, pairs: list) -> tuple[str, bool]:
    """(tokenizer.json text, whether it was trained now and must be kept in RUN_DIR)."""
    if s["tokenizer"]:
        return tokenizer_json_of(s["tokenizer"]), False
    kept = out / RUN_TOKENIZER
    if kept.is_file():
        return kept.read_text(), False
    from ...data.tokenizer import train_bpe

    if s["train"]:  # JSONL: both fields of the training records
        print(f"training a {s['vocab_size']}-token BPE on the {s['source_field']!r} and {s['target_field']!r} of "
              f"{', '.join(s['train'])}", flush=True, file=sys.stderr)
        return train_bpe((x for _, st in pairs for x in st), s["vocab_size"]).to_str(), True
    print(f"training a {s['vocab_size']}-token BPE on {s['source']} and {s['target']}", flush=True,
          file=sys.stderr)
    return train_bpe(corpus(s["source"], s["target"]), s["vocab_size"]).to_str(), True


def read_task_pairs(s: dict) -> tuple[list, list]:
    """(training pairs, validation pairs) of the line-aligned files or the JSONL records."""
    if s["train"]:
        lines = [o for k, o in (("source", "--source"), ("target", "--target"), ("val_source", "--val-source"),
                                ("val_target", "--val-target")) if s[k]]
        if lines:
            raise UserError(f"--train reads JSONL records; {', '.join(lines)} name line-aligned files: give one or "
                            f"the other")
        pairs = read_jsonl_pairs(s["train"], s["source_field"], s["target_field"])
        if s["val"]:
            return pairs, read_jsonl_pairs(s["val"], s["source_field"], s["target_field"])
        return split_val(pairs, s["val_fraction"])
    missing = [o for k, o in (("source", "--source"), ("target", "--target"), ("val_source", "--val-source"),
                              ("val_target", "--val-target")) if not s[k]]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: train on line-aligned files (--source train.en --target "
                        f"train.de, validated on --val-source val.en --val-target val.de) or on JSONL records "
                        f"(--train FILE.jsonl --source-field F --target-field F)")
    return read_pairs(s["source"], s["target"]), read_pairs(s["val_source"], s["val_target"])


class TranslateRecipe(ExamplesRecipe):
    """Decoder-only translation or summarization (``task``); :meth:`prepare` hands an encoder-decoder
    config to :class:`~scalelm.tasks.translate.train_encdec.EncDecTranslateRecipe`."""

    def __init__(self, task: str = TASK):
        super().__init__(f"finetune {task}")
        self.task = task

    def prepare(self, args, out: Path, saved) -> ExamplesPlan:
        from tokenizers import Tokenizer

        from ...data.tokenizer import EOT, special_ids, vocab_size_of
        from ..sft.vocab import extend_tokenizer

        s = settings(args, read_task_file(out), FIXED, PATHS, DEFAULTS, self.task)
        pairs, val_pairs = read_task_pairs(s)
        fresh, gpt_cfg = False, None
        if s["base"]:
            from ...checkpoint.kinds import ENCDEC as ENCDEC_KIND
            from ...checkpoint.kinds import FLOAT_LANGUAGE_MODELS

            base = read_base(s["base"], (*FLOAT_LANGUAGE_MODELS, ENCDEC_KIND), f"scalelm {self.command}", settings=s)
            if base.cfg.arch == "gpt" and asks_encdec(args, saved):  # both halves from the GPT (warm_start.py)
                gpt_cfg = base.cfg
                base = dataclasses.replace(base, cfg=encdec_config(gpt_cfg, base.dir))
        else:
            tok_json, fresh = _tokenizer(s, out, pairs)
            base = Base(None, None, tok_json)
        tok0 = Tokenizer.from_str(base.tokenizer_json)
        tok_json, new_ids = base.tokenizer_json, []
        if special_ids(tok0)[0] is None:  # a target must end in a token generation stops at
            tok_json, new_ids = extend_tokenizer(tok_json, [EOT])
        tok = Tokenizer.from_str(tok_json)
        eot = special_ids(tok)[0]
        vocab = vocab_size_of(tok)
        cfg = task_config(args, s, saved, base, vocab)
        if cfg.parallel.pp > 1:
            raise ConfigError("fine-tuning trains with data or tensor parallelism; use --parallel.pp=1")
        encdec = cfg.model.arch == ENCDEC
        if encdec:
            if args.packing == "on":
                raise UserError("--packing is for the decoder-only model: the encoder-decoder trains length-grouped, "
                                "padded pairs (drop --packing)")
            s["packing"] = "off"
            if s["label_smoothing"] is None:
                s["label_smoothing"] = LABEL_SMOOTHING
            if not 0 <= s["label_smoothing"] < 1:
                raise UserError(f"--label-smoothing must be in [0, 1), not {s['label_smoothing']}")
        elif s["label_smoothing"] is not None:
            raise UserError("--label-smoothing is for the encoder-decoder (--preset transformer-small or "
                            "--model.arch=encoder-decoder); the decoder-only model trains on the plain loss")
        max_length = max_length_of(s, cfg)
        msl = s["max_source_length"]
        # the encoder reads the source alone; a decoder-only example holds source and target together
        longest = max_length if encdec else max_length - 1
        if msl is not None and not 1 <= msl <= longest:
            raise UserError(f"--max-source-length must be between 1 and {longest} (--max-length"
                            f"{'' if encdec else ' - 1: the target needs room'}), not {msl}")
        if encdec:
            translator = EncDecTranslator(None, tok, eot, s["label_smoothing"], max_source_length=msl)
            train, rep = translator.encode_pairs(pairs, max_length)
            cut_train = translator.sources_truncated
            val, vrep = translator.encode_pairs(val_pairs, max_length)
        else:
            translator = DecoderTranslator(None, tok, eot, max_source_length=msl)
            train, _, rep = translator.encode_pairs(pairs, max_length)
            cut_train = translator.sources_truncated
            val, _, vrep = translator.encode_pairs(val_pairs, max_length)
        cut_val = translator.sources_truncated
        if msl is not None:  # the count the issue asks for: how much of the sources the model never sees
            print(f"--max-source-length {msl}: cut {cut_train:,} of {len(pairs):,} training sources and {cut_val:,} "
                  f"of {len(val_pairs):,} validation sources to their first {msl} tokens", file=sys.stderr)
        rep.warn("training", max_length)
        vrep.warn("validation", max_length)
        if not train or not val:
            raise UserError(f"no {'training' if not train else 'validation'} pair fits the context of {max_length} "
                            f"tokens: raise --max-length (up to block_size)")
        task = {"name": self.task, "arch": translator.arch, "eot_id": eot, "max_length": max_length}
        task.update({"label_smoothing": s["label_smoothing"]} if encdec else {"separator": SEPARATOR})
        if msl is not None:
            task["max_source_length"] = msl
        if s["train"]:
            task.update(source_field=s["source_field"], target_field=s["target_field"])
        if self.task != TASK:  # a summary's budget: the longest training target (its end-of-text included)
            task["max_new_tokens"] = max(len(e) for e in tok.encode_batch([" " + t for _, (_, t) in pairs],
                                                                           add_special_tokens=False)) + 1
        hf = dict(base.hf or {})
        hf.setdefault("eos_token_id", eot)
        mf = ModelFiles(tok_json, new_ids, vocab_size_of(tok0), {}, {"task": task, "hf": hf})
        if encdec:
            check_encdec(cfg, base, mf)
        files = {TASK_FILE: json.dumps(s, indent=2) + "\n"}
        if fresh:  # the BPE trained now: a resumed run reads the same one
            files[RUN_TOKENIZER] = base.tokenizer_json
        pad = tok.token_to_id("<|pad|>")
        extra = {"dropped_examples": len(rep.dropped)}
        if msl is not None:
            extra.update(sources_truncated=cut_train, val_sources_truncated=cut_val)
        if not encdec:
            extra["truncated_examples"] = rep.truncated
        return ExamplesPlan(
            cfg, TokenizerData(tok_json, vocab),
            RunRecord.of_files(s["source"] or s["train"][0], tok_json, vocab, s["source"], s["target"], s["val_source"],
                               s["val_target"], *(s["train"] or ()), s["val"]),
            files, recipe=EncDecTranslateRecipe(translator, self.task, gpt_cfg) if encdec else None, out=out,
            task=self.task,
            settings=s, base=base, model_files=mf, train=train, val=val, max_length=max_length,
            packing=s["packing"] == "on", fill=pad or 0,
            about=f" ({rep.supervised_tokens:,} target tokens of {rep.tokens:,}, {len(rep.dropped)} dropped)",
            extra_summary=extra)


def run_translate(args: argparse.Namespace) -> int:
    return run_recipe(TranslateRecipe(), args)


def run_summarize(args: argparse.Namespace) -> int:
    return run_recipe(TranslateRecipe("summarize"), args)
