"""``scalelm eval RUN --task summarize --data FILE [--baseline lead-K]``: ROUGE of a summarizer.

``--data`` is JSONL: the source and the original reference in ``--source-field`` /
``--target-field`` (default: the fields the model was trained on, else ``source`` / ``target``),
and optionally more human references in ``--references-field`` (default ``annotations``, AESLC's;
a list of strings). Prints one JSON object: ROUGE-1/2/L/Lsum F1 (x100, :mod:`.rouge`) against the
original reference (``rouge``) and against all references (``rouge_all_references``, when there
are more), the word-length statistics of hypotheses and references, what the context limit
cut, and ``reference_loss``: the references' loss given their sources and given other records'
sources (:func:`source_use`: does the model read the source at all?). ``--baseline lead-K`` adds
the same numbers for the first K words of each source (``baseline``), so a table always carries its
floor; with MODEL ``none`` only the baseline is scored (no model is read).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

NO_MODEL = "none"  # MODEL with --baseline: score the baseline alone
REFERENCES_FIELD = "annotations"


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """``eval --task summarize``'s options (``--data``, ``--beams``, ``--batch-size``, ``--limit``,
    ``--save-hypotheses``, ``--max-new-tokens`` and the decoding controls are the eval parser's own)."""
    g = p.add_argument_group("--task summarize (--data FILE.jsonl)")
    g.add_argument("--source-field", help="the JSON field of the text to summarize (default: the model's, else "
                   "source)")
    g.add_argument("--target-field", help="the JSON field of the original reference (default: the model's, else "
                   "target)")
    g.add_argument("--references-field", default=REFERENCES_FIELD,
                   help=f"a JSON field with more references, a list of strings (default {REFERENCES_FIELD}, AESLC's; "
                        f"absent: original references only)")
    g.add_argument("--baseline", metavar="lead-K", help="also score the first K words of each source (MODEL none: "
                   "only them)")


def read_examples(path: str, source_field: str, target_field: str, references_field: str | None
                  ) -> tuple[list[str], list[str], list[list[str]]]:
    """(sources, original references, extra references) of a JSONL file, in file order."""
    from ...errors import UserError
    from ..translate.data import read_records

    sources, refs, extra = [], [], []
    for where, o in read_records(path, (source_field, target_field), "--data"):
        more = o.get(references_field, []) if references_field else []
        more = [more] if isinstance(more, str) else more
        if not isinstance(more, list) or not all(isinstance(m, str) for m in more):
            raise UserError(f"{where}: {references_field!r} must be a list of reference strings")
        sources.append(o[source_field].strip())
        refs.append(o[target_field].strip())
        extra.append([m.strip() for m in more if m.strip()])
    if not sources:
        raise UserError(f"{path} holds no record")
    return sources, refs, extra


def source_use(model, sources: list[str], refs: list[str], batch_size: int = 32) -> dict:
    """How much the model reads its sources: the loss of each reference (nats per token) given its own
    source, and given the next record's (a fixed rotation, so every record gets another's). A model
    that has learned only what subjects look like scores the two alike (``source_use_nats`` near 0)."""
    if len(sources) < 2:
        return {}
    own, n = model.reference_loss(list(zip(sources, refs)), batch_size)
    other, m = model.reference_loss(list(zip(sources[1:] + sources[:1], refs)), batch_size)
    if not n or not m:
        return {}
    return {"given_source": own / n, "given_another_source": other / m, "source_use_nats": other / m - own / n,
            "tokens": n}


def run_eval_summarize(args: argparse.Namespace) -> int:
    from ...errors import UserError
    from ...fileio import json_safe
    from .rouge import lead, parse_baseline, report

    if not args.data or not args.data.endswith(".jsonl"):
        raise UserError("--task summarize scores a JSONL file: --data FILE.jsonl (with --source-field and "
                        "--target-field naming its fields)")
    k = parse_baseline(args.baseline) if args.baseline else None
    use_model = args.model != NO_MODEL
    if not use_model and k is None:
        raise UserError(f"MODEL {NO_MODEL} scores the baseline alone: give --baseline lead-K")
    task = {}
    if use_model:
        from ...checkpoint.kinds import ENCDEC, GPT, LORA, TRANSLATION, require_kind
        from ..translate.model import read_task

        task = read_task(require_kind(args.model, "scalelm eval --task summarize", (GPT, LORA, ENCDEC),
                                      needs=TRANSLATION).path)
    src_f = args.source_field or task.get("source_field") or "source"
    tgt_f = args.target_field or task.get("target_field") or "target"
    sources, refs, extra = read_examples(args.data, src_f, tgt_f, args.references_field)
    if args.limit is not None:
        n = max(1, int(args.limit * len(sources)) if args.limit < 1 else int(args.limit))
        sources, refs, extra = sources[:n], refs[:n], extra[:n]
    res: dict = {"n": len(sources)}
    if use_model:
        from ...precision import pick_device
        from ..translate.decoding import decoding_controls
        from ..translate.model import load_translator

        if args.beams < 1 or args.batch_size < 1:
            raise UserError("--beams and --batch-size must be at least 1")
        if args.save_hypotheses:
            from ...runs import check_output_file

            check_output_file(args.save_hypotheses, [args.data], "--save-hypotheses")
        model = load_translator(args.model, device=pick_device(args.device), verify=not args.no_verify)
        t0 = time.perf_counter()
        # the model's own summary budget (eval's --max-new-tokens is --task qa's)
        hyps = model.translate(sources, beams=args.beams, batch_size=args.batch_size, **decoding_controls(args))
        seconds = time.perf_counter() - t0
        res.update(report(hyps, refs, extra))
        res.update({"beams": args.beams, **decoding_controls(args), **hyps.summary(), "seconds": round(seconds, 3)})
        res["reference_loss"] = source_use(model, sources, refs, args.batch_size)
        print(f"summarized {len(sources)} records of {args.data} in {seconds:.1f}s", file=sys.stderr)
        if hyps.warning():
            print(hyps.warning("summary"), file=sys.stderr)
        if args.save_hypotheses:
            from ...fileio import atomic_write_text

            atomic_write_text(args.save_hypotheses, "".join(h.replace("\n", " ") + "\n" for h in hyps))
    if k is not None:
        res["baseline"] = {"name": f"lead-{k}", **report(lead(sources, k), refs, extra)}
    print(json.dumps(json_safe(res), allow_nan=False))
    return 0
