"""``scalelm eval RUN --task translate --source FILE --reference FILE [--beams N]``: sacreBLEU scores.

Corpus BLEU and chrF from ``sacrebleu`` (its default tokenization, 13a), with their signatures, so
the numbers compare with published ones computed the same way. ``sources_cut`` and
``stopped_at_context`` count the sources cut to fit the context and the translations that stopped
at the context limit (both also named on stderr): a score over cut translations is not comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--task translate")
    g.add_argument("--source", metavar="FILE", help="sentences to translate, one per line")
    g.add_argument("--reference", metavar="FILE", help="their reference translations, line-aligned")
    g.add_argument("--beams", type=int, default=1, help="beam width (1: greedy)")
    g.add_argument("--save-hypotheses", metavar="FILE", help="also write the translations, one line per source line")
    from .decoding import add_decoding_args

    add_decoding_args(p.add_argument_group("decoding (--task translate, summarize)"))


def bleu_chrf(hyps: list[str], refs: list[str]) -> dict:
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "n": len(hyps)}


def run_eval_translate(args: argparse.Namespace) -> int:
    from ...data.lines import read_lines
    from ...errors import UserError
    from ...fileio import json_safe
    from ...precision import pick_device
    from .decoding import decoding_controls
    from .model import load_translator

    if not args.source or not args.reference:
        raise UserError("--task translate needs --source FILE and --reference FILE (line-aligned)")
    if args.beams < 1 or args.batch_size < 1:
        raise UserError("--beams and --batch-size must be at least 1")
    if args.save_hypotheses:
        from ...runs import check_output_file

        check_output_file(args.save_hypotheses, [args.source, args.reference], "--save-hypotheses")
    sources, refs = read_lines(args.source, "--source"), read_lines(args.reference, "--reference")
    if len(sources) != len(refs):
        raise UserError(f"{args.source} has {len(sources)} lines but {args.reference} has {len(refs)}: they must be "
                        f"line-aligned")
    if not sources:
        raise UserError(f"{args.source} is empty")
    if args.limit is not None:
        n = int(args.limit * len(sources)) if args.limit < 1 else int(args.limit)
        sources, refs = sources[:max(1, n)], refs[:max(1, n)]
    model = load_translator(args.model, device=pick_device(args.device), verify=not args.no_verify)
    t0 = time.perf_counter()
    hyps = model.translate(sources, beams=args.beams, batch_size=max(args.batch_size, 1), **decoding_controls(args))
    seconds = time.perf_counter() - t0
    res = {**bleu_chrf(hyps, refs), "beams": args.beams, **hyps.summary(), "seconds": round(seconds, 3),
           "sentences_per_s": round(len(hyps) / seconds, 2) if seconds > 0 else None}
    if args.save_hypotheses:
        from ...fileio import atomic_write_text

        atomic_write_text(args.save_hypotheses, "".join(h.replace("\n", " ") + "\n" for h in hyps))
    print(f"translated {len(sources)} sentences of {args.source} in {res['seconds']}s", file=sys.stderr)
    if hyps.warning():  # the lines are the scored ones: line i of --source
        print(hyps.warning(), file=sys.stderr)
    print(json.dumps(json_safe(res), allow_nan=False))
    return 0
