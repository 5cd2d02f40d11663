"""``scalelm translate``: translate a file, one output line per input line.

    scalelm translate RUN_DIR|MODEL_DIR --input FILE [--beams 4] [--batch-size N] [--out FILE]

Greedy decoding by default, beam search with ``--beams N``; sentences are batched by length and
written back in input order (an empty line stays empty). ``--out`` is written atomically.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_translate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="a model directory of `scalelm finetune translate`, or its RUN_DIR (latest checkpoint)")
    p.add_argument("--input", required=True, metavar="FILE", help="source sentences, one per line ('-': stdin)")
    p.add_argument("--out", metavar="FILE", help="write the translations here (default: stdout)")
    p.add_argument("--beams", type=int, default=1, help="beam width (1: greedy, the default)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences decoded together")
    p.add_argument("--max-new-tokens", type=int, help="longest translation in tokens (default: 2x the source + 16)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true", help="skip checking the model's files against its manifest")


def read_sources(path: str) -> list[str]:
    from .data import read_lines

    if path == "-":
        from ...errors import UserError

        try:
            return sys.stdin.buffer.read().decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"stdin is not UTF-8 (byte {e.start})") from None
    return read_lines(path, "--input")


def run_translate(args: argparse.Namespace) -> int:
    from ...errors import UserError
    from ...fileio import atomic_write_text
    from ...precision import pick_device
    from .model import load_translator

    if args.beams < 1 or args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise UserError("--beams, --batch-size and --max-new-tokens must be at least 1")
    sources = read_sources(args.input)
    model = load_translator(args.ckpt, device=pick_device(args.device), verify=not args.no_verify)
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
    return 0
