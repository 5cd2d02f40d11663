"""``scalelm translate`` and ``scalelm summarize``: one output line per input, in input order.

    scalelm translate RUN_DIR|MODEL_DIR --input FILE [--beams 4] [--batch-size N] [--out FILE]
    scalelm summarize RUN_DIR|MODEL_DIR --input FILE[.jsonl] [--source-field F] [--beams 4] [--out FILE]

Greedy decoding by default, beam search with ``--beams N``; the decoding controls
(``--repetition-penalty``, ``--no-repeat-ngram-size``, ``--min-new-tokens``, ``--length-penalty``)
behave as Hugging Face's ``generate``. Sources are batched by length and written back in input
order, one output line per input (lines end at ``\n`` only, see :mod:`scalelm.data.lines`; an
empty source gives an empty line). ``summarize`` also reads JSONL records (a ``.jsonl`` input),
the source in ``--source-field`` (default: the field the model trained on, else ``source``): an
email body spans lines. Each source is decoded as it would be alone, whatever ``--batch-size``;
sources cut to fit the context and outputs that stopped at the context limit are counted in a
warning on stderr. ``--out`` is written atomically. Both commands decode with
:mod:`scalelm.tasks.translate.decoding`, whichever task the model was trained for.
"""

from __future__ import annotations

import argparse
import sys
import time

from ...cliargs import add_model_arg


def _add_common(p: argparse.ArgumentParser, what: str) -> None:
    from .decoding import add_decoding_args

    p.add_argument("--out", metavar="FILE", help=f"write the {what} here (default: stdout)")
    p.add_argument("--beams", type=int, default=1, help="beam width (1: greedy, the default)")
    p.add_argument("--batch-size", type=int, default=32, help="sources decoded together")
    add_decoding_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true", help="skip checking the model's files against its manifest")


def add_translate_parser(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, help="a model directory of `scalelm finetune translate`, or its RUN_DIR (latest checkpoint)")
    p.add_argument("--input", required=True, metavar="FILE", help="source sentences, one per line ('-': stdin)")
    p.add_argument("--max-new-tokens", type=int, help="longest translation in tokens (default: 2x the source + 16); "
                   "at most what the context leaves (a translation stopped there is reported)")
    _add_common(p, "translations")


def add_summarize_parser(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, help="a model directory of `scalelm finetune summarize`, or its RUN_DIR (latest checkpoint)")
    p.add_argument("--input", required=True, metavar="FILE", help="JSONL records (a .jsonl file: the text in "
                   "--source-field), or one text per line ('-': stdin)")
    p.add_argument("--source-field", help="with a .jsonl input: the field to summarize (default: the model's, else "
                   "source)")
    p.add_argument("--max-new-tokens", type=int, help="longest summary in tokens (default: the model's, its longest "
                   "training target); at most what the context leaves")
    _add_common(p, "summaries")


def read_sources(path: str, source_field: str | None, model_field: str | None) -> list[str]:
    """The texts of ``--input``: a JSONL file's ``source_field``, else one per line."""
    from ...data.lines import read_lines
    from .data import is_jsonl, read_records

    if not is_jsonl(path):
        return read_lines(path, "--input")
    field = source_field or model_field or "source"
    return [o[field] for _, o in read_records(path, (field,), "--input")]


def run_translate(args: argparse.Namespace, task: str = "translate") -> int:
    from ...errors import UserError
    from ...fileio import atomic_write_text
    from ...precision import pick_device
    from .decoding import decoding_controls
    from .model import load_translator, read_task

    if args.beams < 1 or args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise UserError("--beams, --batch-size and --max-new-tokens must be at least 1")
    from ...checkpoint.kinds import ENCDEC, GPT, LORA, TRANSLATION, require_kind

    kind = require_kind(args.model, f"scalelm {task}", (GPT, LORA, ENCDEC), needs=TRANSLATION)
    if args.out:
        from ...runs import check_output_file

        check_output_file(args.out, [args.input if args.input != "-" else None], "--out")
    if task == "summarize":  # JSONL records too: an email body spans lines
        sources = read_sources(args.input, args.source_field, read_task(kind.path).get("source_field"))
    else:
        from ...data.lines import read_lines

        sources = read_lines(args.input, "--input")
    model = load_translator(args.model, device=pick_device(args.device), verify=not args.no_verify)
    t0 = time.perf_counter()
    hyps = model.translate(sources, beams=args.beams, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           **decoding_controls(args))
    text = "".join(h + "\n" for h in hyps)
    if args.out:
        from pathlib import Path

        atomic_write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    how = f"{args.beams} beams" if args.beams > 1 else "greedy"
    what = "lines" if task == "translate" else "texts"
    print(f"{task}d {len(sources)} {what} ({how}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if hyps.warning():
        print(hyps.warning("translation" if task == "translate" else "summary"), file=sys.stderr)
    return 0


def run_summarize(args: argparse.Namespace) -> int:
    return run_translate(args, "summarize")
