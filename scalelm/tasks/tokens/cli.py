"""``scalelm tag`` (tag words) and ``scalelm eval --task tokens`` (score a tagged file).

    scalelm tag MODEL --input FILE [--out FILE]         CoNLL / CoNLL-U in -> the same lines, tags filled
    scalelm tag MODEL --input FILE.jsonl                 one {"tokens", "tags"} record per input record
    scalelm tag MODEL --text "Anna flew to Rome"         one JSON record per text (words split on spaces)
    scalelm eval MODEL --task tokens --data FILE         entity P/R/F1 per type and micro (seqeval, strict
                                                         IOB2) or token accuracy, as one JSON line

``tag`` writes one output line per input line: a CoNLL word line becomes ``WORD<TAB>TAG``, a
CoNLL-U word line keeps its ten fields with the tag field (the model's, else UPOS) replaced, and
blank lines, ``-DOCSTART-`` lines, comments, multiword ranges and empty nodes are copied as they
are. ``--output-format jsonl`` writes one record per sentence instead (JSONL input: one per input
line, a blank line kept blank). Span tags come out in IOB2, whatever scheme the training file used.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ...cliargs import add_dtype_arg, add_model_arg
from ...errors import UserError
from ...fileio import json_safe
from .formats import CONLLU_FIELDS, Layout, Sentence, read_sentences

OUTPUT_FORMATS = ("conll", "jsonl")


def _load(args):
    from ..classify.cli import load_for_inference
    from .align import WordEncoder
    from .files import load_tagger

    model, task, tok, device, autocast = load_for_inference(args, load_tagger, "a tagger")
    enc = WordEncoder(tok, task.get("max_length") or model.cfg.block_size, bool(task.get("special_tokens")))
    return model, task, enc, device, autocast


def _read_opts(args, task: dict) -> dict:
    """How to read an input file: this command line's options, else the model's training settings."""
    return {k: getattr(args, k, None) if getattr(args, k, None) is not None else task.get(k)
            for k in ("format", "tag_column", "tag_field", "word_field")}


def _common(p: argparse.ArgumentParser) -> None:
    from .train import add_format_args

    add_format_args(p, as_trained=True)
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default 32)")
    add_dtype_arg(p, default="fp32", help="autocast dtype: fp32 (default), bf16, fp16 or auto")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the model's files against its manifest.json (sha256 of each)")


# ----------------------------------------------------------------------------- scalelm tag

def add_tag_parser(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, help="a tagger's model directory (e.g. RUN_DIR/best), or a RUN_DIR (its latest)")
    p.add_argument("--input", metavar="FILE", help="words to tag: CoNLL columns (the first column is the word; "
                   "other columns are ignored), CoNLL-U or JSONL")
    p.add_argument("--text", action="append", help="a sentence to tag, words separated by spaces (repeatable; "
                   "JSONL out)")
    p.add_argument("--out", metavar="FILE", help="write the tagged file here (default: stdout)")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, help="conll: the input's lines with the tags filled "
                   "in (default for CoNLL and CoNLL-U input); jsonl: one {\"tokens\", \"tags\"} record per sentence "
                   "(default for JSONL input and --text)")
    _common(p)


def _conll_lines(layout: Layout, sents: list[Sentence], tags: list[list[str]], fmt: str,
                 tag_field: Optional[str]) -> list[str]:
    col = CONLLU_FIELDS.index((tag_field or "upos").lower()) if fmt == "conllu" else None
    out = []
    for line, slot in zip(layout.lines, layout.slots):
        if slot is None:
            out.append(line)
            continue
        s, i = slot
        if col is not None:
            fields = line.split("\t")
            fields[col] = tags[s][i]
            out.append("\t".join(fields))
        else:
            out.append(f"{sents[s].words[i]}\t{tags[s][i]}")
    return out


def _record(words: list[str], tags: list[str]) -> str:
    rec = json.dumps({"tokens": words, "tags": tags}, ensure_ascii=False)
    return rec.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def run_tag(args: argparse.Namespace) -> int:
    from ...checkpoint.kinds import ENCODER, GPT, LORA, require_kind
    from ...fileio import atomic_write_text
    from .metrics import tags_of, word_logits

    if bool(args.text) == bool(args.input):
        raise UserError("give the words to tag: --input FILE or --text SENTENCE (repeatable), not both"
                        if args.text else "give the words to tag: --input FILE or --text SENTENCE (repeatable)")
    require_kind(args.model, "scalelm tag", (GPT, ENCODER, LORA))
    model, task, enc, device, autocast = _load(args)
    opts = _read_opts(args, task)
    if args.input:
        sents, layout, fmt = read_sentences(args.input, opts["format"], labelled=False, tag_field=opts["tag_field"],
                                            word_field=opts["word_field"] or "tokens")
    else:
        if any(not t.split() for t in args.text):
            raise UserError("--text must not be empty")
        sents = [Sentence(t.split(), None, [], "--text") for t in args.text]
        layout, fmt = Layout([""] * len(sents), [(i, 0) for i in range(len(sents))]), "jsonl"
    out_fmt = args.output_format or ("jsonl" if fmt == "jsonl" else "conll")
    if out_fmt == "conll" and fmt == "jsonl":
        raise UserError("--output-format conll writes a CoNLL input's lines back: for JSONL input or --text, "
                        "the output is JSONL")
    words = [x.words for x in sents]
    tags = tags_of(word_logits(model, enc, words, args.batch_size, device, autocast), task["labels"],
                   task.get("fallback") or "O")
    if out_fmt == "conll":
        lines = _conll_lines(layout, sents, tags, fmt, opts["tag_field"])
    elif fmt == "jsonl":  # one record per input record, blank lines kept
        lines = ["" if slot is None else _record(words[slot[0]], tags[slot[0]]) for slot in layout.slots]
    else:
        lines = [_record(w, t) for w, t in zip(words, tags)]
    text = "".join(line + "\n" for line in lines)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"tagged {sum(map(len, words))} words in {len(words)} sentences -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# ----------------------------------------------------------------------------- scalelm eval --task tokens

def add_eval_args(p: argparse.ArgumentParser) -> None:
    """``eval --task tokens``'s options (``--data``, ``--batch-size``, ``--dtype``, ``--device`` are eval's)."""
    from .train import add_format_args

    g = p.add_argument_group("--task tokens (--data FILE: tagged sentences)")
    add_format_args(g, as_trained=True)


def run_eval_tokens(args: argparse.Namespace) -> int:
    from .data import label_ids, read_labelled
    from .metrics import loss_of, scores, tags_of, word_logits

    if not args.data or args.text or args.harness:
        raise UserError("--task tokens scores a tagged file: --data FILE (CoNLL columns, CoNLL-U or JSONL)")
    model, task, enc, device, autocast = _load(args)
    sents, _ = read_labelled(args.data, _read_opts(args, task), bool(task.get("spans")))
    gold = label_ids(sents, task["labels"], "the model's training file")
    words = [x.words for x in sents]
    print(f"evaluating {args.model} on {args.data} ({len(sents)} sentences) on {device}", file=sys.stderr)
    logits = word_logits(model, enc, words, args.batch_size, device, autocast)
    res = scores([x.tags for x in sents], tags_of(logits, task["labels"], task.get("fallback") or "O"),
                 bool(task.get("spans")))
    res["loss"] = loss_of(logits, gold)
    print(json.dumps(json_safe(res), allow_nan=False))
    return 0
