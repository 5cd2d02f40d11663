"""``scalelm translate``: translate a file, one output line per input line.

    scalelm translate RUN_DIR|MODEL_DIR --input FILE [--beams 4] [--batch-size N] [--out FILE]

Greedy decoding by default, beam search with ``--beams N``; sentences are batched by length and
written back in input order, one output line per input line (lines end at ``\n`` only, see
:mod:`scalelm.data.lines`; an empty line stays empty). Each sentence is translated as it would be
alone, whatever ``--batch-size``; sources cut to fit the context and translations that stopped at
the context limit are counted in a warning on stderr. ``--out`` is written atomically.
"""

from __future__ import annotations

import argparse
import sys
import time

from ...cliargs import add_model_arg


def add_translate_parser(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, help="a model directory of `scalelm finetune translate`, or its RUN_DIR (latest checkpoint)")
    p.add_argument("--input", required=True, metavar="FILE", help="source sentences, one per line ('-': stdin)")
    p.add_argument("--out", metavar="FILE", help="write the translations here (default: stdout)")
    p.add_argument("--beams", type=int, default=1, help="beam width (1: greedy, the default)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences decoded together")
    p.add_argument("--max-new-tokens", type=int, help="longest translation in tokens (default: 2x the source + 16); "
                   "at most what the context leaves (a translation stopped there is reported)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true", help="skip checking the model's files against its manifest")


def run_translate(args: argparse.Namespace) -> int:
    from ...data.lines import read_lines
    from ...errors import UserError
    from ...fileio import atomic_write_text
    from ...precision import pick_device
    from .model import load_translator

    if args.beams < 1 or args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise UserError("--beams, --batch-size and --max-new-tokens must be at least 1")
    from ...checkpoint.kinds import ENCDEC, GPT, LORA, TRANSLATION, require_kind

    require_kind(args.model, "scalelm translate", (GPT, LORA, ENCDEC), needs=TRANSLATION)
    if args.out:
        from ...runs import check_output_file

        check_output_file(args.out, [args.input if args.input != "-" else None], "--out")
    sources = read_lines(args.input, "--input")
    model = load_translator(args.model, device=pick_device(args.device), verify=not args.no_verify)
    t0 = time.perf_counter()
    hyps = model.translate(sources, beams=args.beams, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    text = "".join(h + "\n" for h in hyps)
    if args.out:
        from pathlib import Path

        atomic_write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    how = f"{args.beams} beams" if args.beams > 1 else "greedy"
    print(f"translated {len(sources)} lines ({how}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if hyps.warning():
        print(hyps.warning(), file=sys.stderr)
    return 0
