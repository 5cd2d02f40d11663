"""``scalelm eval``: loss, perplexity and bits per byte of a model on a data split.

The numbers come from :func:`scalelm.train.validation.evaluate`, the same pass the trainer runs
for its validation loss, so ``eval`` on a checkpoint reproduces the loss logged at its step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

from ..checkpoint.kinds import CLASSIFIER, ENCDEC, ENCODER, GPT, LANGUAGE_MODELS, LORA, TRANSLATION, require_kind
from ..cliargs import add_deprecated, add_dtype_arg, add_model_arg
from ..fileio import json_safe
from ..train.validation import evaluate, loss_sums, summarize  # noqa: F401 (the Python API of eval)

# ----------------------------------------------------------------------------- CLI

def add_eval_parser(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    p.add_argument("--data", help="a DATA_DIR written by `scalelm prepare` (with --task classify: a labelled file)")
    from ..tasks.classify.cli import add_eval_args

    add_eval_args(p)  # --task
    from ..tasks.sft.qa import add_eval_args as add_qa_args
    from ..tasks.translate.evaluate import add_eval_args as add_translate_args

    add_translate_args(p)  # --source --reference --beams and the decoding controls
    from ..tasks.summarize.evaluate import add_eval_args as add_summarize_args

    add_summarize_args(p)  # --source-field --target-field --references-field --baseline
    add_qa_args(p)  # --answer-regex --prompt-field --completion-field --max-new-tokens
    from ..tasks.preference.evaluate import add_eval_args as add_preference_args

    add_preference_args(p)  # --ref-model
    from ..tasks.tokens.cli import add_eval_args as add_tokens_args

    add_tokens_args(p)  # --format --tag-column --tag-field --word-field
    p.add_argument("--text", metavar="FILE", help="score a UTF-8 text file directly (rolling windows, no prepare)")
    p.add_argument("--stride", type=int, default=None,
                   help="with --text: how far each window advances (default: the window length; smaller = "
                        "more context per token, slower)")
    from .memorization import add_memorization_args

    add_memorization_args(p)  # --memorization --samples --prefix-tokens --suffix-tokens --unprompted --seed
    h = p.add_argument_group("lm-evaluation-harness")
    h.add_argument("--harness", metavar="TASKS", help="comma-separated lm-eval tasks: the local scalelm_sst2, "
                   "scalelm_text_ppl, or yours with --harness-include")
    h.add_argument("--harness-include", metavar="DIR", help="a folder of lm-eval task YAMLs")
    h.add_argument("--harness-data", metavar="FILE", help="the file the local tasks read (an SST-format file for "
                   "scalelm_sst2, a text file for scalelm_text_ppl)")
    h.add_argument("--limit", type=float, help="at most this many examples per task (or a fraction, < 1)")
    p.add_argument("--split", default="val", help="which split to score (default: val)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's block_size)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="cap the number of batches (spread evenly over the split); default: the whole split")
    add_dtype_arg(p, help="autocast dtype of the forward passes; auto: bf16 where the hardware has it, else fp32")
    add_deprecated(p, "--precision", "--dtype")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the model's files against its manifest.json (sha256 of each)")


def check_limit(limit: Optional[float]) -> None:
    """``--limit``: a whole number of examples, or a fraction of them below 1 (as lm-eval reads it).
    nan, inf, 0 or a negative is refused: none of them is a number of examples."""
    from ..errors import UserError

    if limit is None:
        return
    if not (math.isfinite(limit) and limit > 0):
        raise UserError(f"--limit must be a positive number of examples (or a fraction below 1), got {limit}")
    if limit >= 1 and not limit.is_integer():
        raise UserError(f"--limit {limit:g}: give a whole number of examples, or a fraction below 1")


# --task -> (the model kinds it takes, the kind it needs: scalelm.checkpoint.kinds)
TASK_KINDS = {"classify": ((GPT, ENCODER, LORA, CLASSIFIER), CLASSIFIER), "translate": ((GPT, LORA, ENCDEC), TRANSLATION),
              "qa": (LANGUAGE_MODELS, None), "preference": (LANGUAGE_MODELS, None)}


def run_eval(args: argparse.Namespace) -> int:
    from ..data.loader import DataError, TokenData
    from ..data.tokenizer import check_same_tokenizer
    from ..errors import UserError
    from ..model.io import load_model_dir, read_tokenizer_json
    from ..precision import autocast_context, pick_device, resolve_precision
    from ..runs import resolve_checkpoint

    check_limit(args.limit)
    if args.task == "summarize":  # checks the model itself: with --baseline it may be none
        from ..tasks.summarize.evaluate import run_eval_summarize

        return run_eval_summarize(args)
    if args.task in TASK_KINDS:  # the model must suit the task before anything is loaded
        supported, needs = TASK_KINDS[args.task]
        require_kind(args.model, f"scalelm eval --task {args.task}", supported, needs=needs)
    if args.task == "classify":
        from ..tasks.classify.cli import run_eval_classify

        return run_eval_classify(args)
    if args.task == "tokens":
        from ..tasks.tokens.cli import run_eval_tokens

        return run_eval_tokens(args)
    if args.task == "translate":
        from ..tasks.translate.evaluate import run_eval_translate

        return run_eval_translate(args)
    if args.task == "qa":
        from ..tasks.sft.qa import run_eval_qa

        return run_eval_qa(args)
    if args.task == "preference":
        from ..tasks.preference.evaluate import run_eval_preference

        return run_eval_preference(args)
    given = [o for o, v in (("--data", args.data), ("--text", args.text), ("--harness", args.harness)) if v]
    if len(given) != 1:
        raise UserError(f"give one of --data DATA_DIR, --text FILE or --harness TASKS, not {' and '.join(given)}"
                        if given else "what to score: --data DATA_DIR (made by `scalelm prepare`), --text FILE "
                        "or --harness TASKS")
    ckpt = resolve_checkpoint(args.model)
    masked_lm = args.data and not args.memorization  # an encoder is scored as a masked LM on a DATA_DIR
    kind = require_kind(ckpt, f"scalelm eval {given[0]}", LANGUAGE_MODELS + ((ENCODER,) if masked_lm else ()),
                        hint={ENCDEC: "score a translation model with `scalelm eval --task translate --source FILE "
                                      "--reference FILE`",
                              ENCODER: "an encoder is scored as a masked LM: `scalelm eval MODEL --data DATA_DIR`"})
    if args.memorization:
        if not args.data:
            raise UserError("--memorization reads the train and val splits of --data DATA_DIR (the data the model "
                            "trained on)")
        from .memorization import run_memorization

        print(f"measuring memorization of {ckpt} on {args.data}", file=sys.stderr)
        print(json.dumps(json_safe(run_memorization(args, ckpt)), allow_nan=False))
        return 0
    if args.harness:
        return _run_eval_harness(args, ckpt)
    if args.text is not None:
        return _run_eval_text(args, ckpt)
    data = TokenData(args.data)
    if args.split not in data.splits:
        raise DataError(f"{args.data} has no split '{args.split}' (it has: {', '.join(data.splits)})")
    device = pick_device(args.device)
    model = load_model_dir(ckpt, device=device, verify=not args.no_verify)
    if data.vocab_size > model.cfg.vocab_size:
        raise DataError(f"{args.data} has a vocabulary of {data.vocab_size} tokens but the model in {ckpt} "
                        f"knows only {model.cfg.vocab_size}: evaluate on data prepared with the model's tokenizer")
    check_same_tokenizer(data.dir, read_tokenizer_json(ckpt), what=f"the checkpoint {ckpt}")
    seq_len = model.cfg.block_size if args.seq_len is None else args.seq_len  # 0 is an error, not "unset"
    if seq_len > model.cfg.block_size or seq_len < 1:
        raise UserError(f"--seq-len must be between 1 and the model's block_size {model.cfg.block_size}")
    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise UserError("--batch-size and --max-batches must be positive")
    data.check_window(args.split, seq_len)
    precision = resolve_precision(args.dtype, device)
    print(f"evaluating {ckpt} on {args.data} [{args.split}] with {precision} on {device}", file=sys.stderr)
    if ENCODER in kind.facets:  # masked-LM loss and accuracy on a fixed seeded masking (scalelm/train/mlm.py)
        from ..train.mlm import mlm_evaluate, mlm_settings

        res = mlm_evaluate(model, data.tokens(args.split), **mlm_settings(data, model.cfg.vocab_size),
                           batch_size=args.batch_size, seq_len=seq_len, max_batches=args.max_batches, device=device,
                           autocast=autocast_context(precision, device))
    else:
        res = evaluate(model, data, args.split, args.batch_size, seq_len, args.max_batches, device,
                       autocast_context(precision, device))
    print(json.dumps(json_safe(res), allow_nan=False))  # a NaN loss prints as null: stdout stays JSON
    return 0


def _run_eval_text(args: argparse.Namespace, ckpt) -> int:
    from tokenizers import Tokenizer

    from ..errors import UserError
    from ..model.hf import special_token_ids
    from ..model.io import load_model_dir
    from ..precision import autocast_context, pick_device, resolve_precision
    from ..runs import TOKENIZER
    from .text import read_text, text_perplexity

    text = read_text(args.text)
    if not (ckpt / TOKENIZER).is_file():
        raise UserError(f"{ckpt} has no {TOKENIZER}: --text needs the model's tokenizer")
    tok = Tokenizer.from_file(str(ckpt / TOKENIZER))
    _, eos = special_token_ids(ckpt)
    eos = eos[0] if isinstance(eos, list) else eos
    device = pick_device(args.device)
    model = load_model_dir(ckpt, device=device, verify=not args.no_verify)
    seq_len = model.cfg.block_size if args.seq_len is None else args.seq_len
    if not 1 <= seq_len <= model.cfg.block_size:
        raise UserError(f"--seq-len must be between 1 and the model's block_size {model.cfg.block_size}")
    if args.batch_size < 1:
        raise UserError("--batch-size must be positive")
    precision = resolve_precision(args.dtype, device)
    print(f"evaluating {ckpt} on {args.text} with {precision} on {device}", file=sys.stderr)
    res = text_perplexity(model, tok, text, eos if eos is not None else 0, seq_len,
                          seq_len if args.stride is None else args.stride, args.batch_size, device,
                          autocast_context(precision, device))
    print(json.dumps(json_safe(res), allow_nan=False))  # a NaN loss prints as null: stdout stays JSON
    return 0


def _run_eval_harness(args: argparse.Namespace, ckpt) -> int:
    from ..errors import UserError
    from ..precision import pick_device
    from .harness import run_harness

    if args.batch_size < 1:
        raise UserError("--batch-size must be positive")
    res = run_harness(ckpt, args.harness, args.harness_include, args.limit, args.harness_data, args.batch_size,
                      str(pick_device(args.device)))
    print(json.dumps(json_safe(res), default=str, allow_nan=False))
    return 0
