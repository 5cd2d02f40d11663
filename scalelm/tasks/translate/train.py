"""``scalelm finetune translate``: a decoder-only GPT trained on ``"source => target"`` pairs, or an
encoder-decoder trained on (source, target) pairs (below).

    scalelm finetune translate --base MODEL_DIR --source train.en --target train.de
                               --val-source val.en --val-target val.de --out RUN_DIR [--section.key=value ...]
    scalelm finetune translate --preset NAME [--tokenizer T | --vocab-size N] ... (from scratch)

The loss counts the target tokens only. From scratch without ``--tokenizer``, a byte-level BPE
is trained on both sides of the training pairs (kept in ``RUN_DIR/tokenizer.json`` for resuming).
Everything else is the fine-tuning run of ``scalelm finetune sft`` (exact resume, ``best/`` by
validation loss, packing, LoRA, torchrun); ``scalelm translate RUN --input FILE`` translates.

With an encoder-decoder config (``--preset transformer-small``, ``--model.arch=encoder-decoder``, or
an encoder-decoder ``--base``) the encoder reads the source and the decoder writes the target
(:mod:`~scalelm.tasks.translate.train_encdec`), with ``--label-smoothing`` (default 0.1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...checkpoint.names import TOKENIZER
from ...config import ConfigError
from ...errors import UserError
from ...train.recipe import RunRecord, TokenizerData, run_recipe
from ..base import Base, ModelFiles, add_model_source_args, max_length_of, read_base, task_config, tokenizer_json_of
from ..settings import TASK_FILE, read_task_file, settings
from ..sft.recipe import ExamplesPlan, ExamplesRecipe
from ..sft.train import add_packing_arg
from .data import corpus, read_pairs
from .encdec import ARCH as ENCDEC
from .encdec import LABEL_SMOOTHING, EncDecTranslator
from .model import SEPARATOR, TASK, DecoderTranslator
from .train_encdec import EncDecTranslateRecipe, check_encdec

FIXED = ("base", "preset", "tokenizer", "vocab_size", "source", "target", "val_source", "val_target", "packing",
         "max_length", "label_smoothing")
DEFAULTS = {"packing": "on", "vocab_size": 8000}
RUN_TOKENIZER = TOKENIZER  # RUN_DIR/tokenizer.json: the BPE trained for a from-scratch run


def add_translate_parser(p: argparse.ArgumentParser) -> None:
    add_model_source_args(p, "with --preset: a tokenizer.json or a directory holding one (default: train a BPE "
                             "on both languages)")
    add_packing_arg(p)
    p.add_argument("--source", metavar="FILE", help="training sources, one sentence per line (e.g. train.en)")
    p.add_argument("--target", metavar="FILE", help="their translations, line-aligned (e.g. train.de)")
    p.add_argument("--val-source", metavar="FILE", help="validation sources")
    p.add_argument("--val-target", metavar="FILE", help="validation targets")
    p.add_argument("--vocab-size", type=int, help="with --preset and no --tokenizer: the BPE's size (default 8000)")
    p.add_argument("--label-smoothing", type=float, help="encoder-decoder only: label smoothing of the training "
                   "loss (default 0.1, as in the Transformer paper; validation reports the plain loss)")


def _tokenizer(s: dict, out: Path) -> tuple[str, bool]:
    """(tokenizer.json text, whether it was trained now and must be kept in RUN_DIR)."""
    if s["tokenizer"]:
        return tokenizer_json_of(s["tokenizer"]), False
    kept = out / RUN_TOKENIZER
    if kept.is_file():
        return kept.read_text(), False
    from ...data.tokenizer import train_bpe

    print(f"training a {s['vocab_size']}-token BPE on {s['source']} and {s['target']}", flush=True,
          file=sys.stderr)
    return train_bpe(corpus(s["source"], s["target"]), s["vocab_size"]).to_str(), True


class TranslateRecipe(ExamplesRecipe):
    """Decoder-only translation; :meth:`prepare` hands an encoder-decoder config to
    :class:`~scalelm.tasks.translate.train_encdec.EncDecTranslateRecipe`."""

    def __init__(self):
        super().__init__("finetune translate")

    def prepare(self, args, out: Path, saved) -> ExamplesPlan:
        from tokenizers import Tokenizer

        from ...data.tokenizer import EOT, special_ids, vocab_size_of
        from ..sft.vocab import extend_tokenizer

        s = settings(args, read_task_file(out), FIXED, ("base", "tokenizer", "source", "target", "val_source",
                                                        "val_target"), DEFAULTS, "translate")
        missing = [o for k, o in (("source", "--source"), ("target", "--target"), ("val_source", "--val-source"),
                                  ("val_target", "--val-target")) if not s[k]]
        if missing:
            raise UserError(f"missing {', '.join(missing)}: translation trains on line-aligned files (--source "
                            f"train.en --target train.de) and validates on others (--val-source val.en --val-target "
                            f"val.de)")
        fresh = False
        if s["base"]:
            from ...checkpoint.kinds import ENCDEC as ENCDEC_KIND
            from ...checkpoint.kinds import FLOAT_LANGUAGE_MODELS

            base = read_base(s["base"], (*FLOAT_LANGUAGE_MODELS, ENCDEC_KIND), "scalelm finetune translate", settings=s)
        else:
            tok_json, fresh = _tokenizer(s, out)
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
        pairs, val_pairs = read_pairs(s["source"], s["target"]), read_pairs(s["val_source"], s["val_target"])
        if encdec:
            translator = EncDecTranslator(None, tok, eot, s["label_smoothing"])
            (train, rep), (val, vrep) = (translator.encode_pairs(p, max_length) for p in (pairs, val_pairs))
        else:
            translator = DecoderTranslator(None, tok, eot)
            (train, _, rep), (val, _, vrep) = (translator.encode_pairs(p, max_length) for p in (pairs, val_pairs))
        rep.warn("training", max_length)
        vrep.warn("validation", max_length)
        if not train or not val:
            raise UserError(f"no {'training' if not train else 'validation'} pair fits the context of {max_length} "
                            f"tokens: raise --max-length (up to block_size)")
        task = {"name": TASK, "arch": translator.arch, "eot_id": eot, "max_length": max_length}
        task.update({"label_smoothing": s["label_smoothing"]} if encdec else {"separator": SEPARATOR})
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
        if not encdec:
            extra["truncated_examples"] = rep.truncated
        return ExamplesPlan(
            cfg, TokenizerData(tok_json, vocab),
            RunRecord.of_files(s["source"], tok_json, vocab, s["source"], s["target"], s["val_source"], s["val_target"]),
            files, recipe=EncDecTranslateRecipe(translator) if encdec else None, out=out, task="translate",
            settings=s, base=base, model_files=mf, train=train, val=val, max_length=max_length,
            packing=s["packing"] == "on", fill=pad or 0,
            about=f" ({rep.supervised_tokens:,} target tokens of {rep.tokens:,}, {len(rep.dropped)} dropped)",
            extra_summary=extra)


def run_translate(args: argparse.Namespace) -> int:
    return run_recipe(TranslateRecipe(), args)
