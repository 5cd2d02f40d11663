"""``scalelm classify`` (label texts) and ``scalelm eval --task classify`` (score a labelled file).

    scalelm classify MODEL --text "a gripping film" --text "dull"    one JSON line per text
    scalelm classify MODEL --input FILE                              .jsonl/.csv/.tsv text field, or lines
    scalelm eval MODEL --task classify --data FILE                   accuracy, macro-F1, per class, confusion

Predictions are JSON lines, one per input in input order: ``{"index": i, "text": ..., "label": ...,
"probs": {...}}``; a blank line, blank row or empty text is an input too, with ``"label": null``
and ``"probs": null`` (lines end at ``\n`` only, see :mod:`scalelm.data.lines`).
"""

from __future__ import annotations

import argparse
import json
import sys

from ...cliargs import add_deprecated, add_dtype_arg, add_model_arg
from ...errors import UserError
from ...fileio import json_safe


def load_for_inference(args, loader, what: str):
    """``(model, task entry, tokenizer.json text, device, autocast)`` of a task model for ``--batch-size``,
    ``--device``, ``--dtype`` and ``--no-verify``; ``loader`` is ``load_classifier`` or the like."""
    from ...checkpoint.names import TOKENIZER
    from ...precision import autocast_context, pick_device, resolve_precision

    if args.batch_size < 1:
        raise UserError("--batch-size must be positive")
    device = pick_device(args.device)
    model, task, d = loader(args.model, device=device, verify=not args.no_verify)
    tok = d / TOKENIZER
    if not tok.is_file():
        raise UserError(f"{d} has no {TOKENIZER}: {what} reads text with its tokenizer")
    return model, task, tok.read_text(), device, autocast_context(resolve_precision(args.dtype, device), device)


def _load(args):
    from .data import TextEncoder
    from .files import load_classifier

    model, task, tok, device, autocast = load_for_inference(args, load_classifier, "a classifier")
    enc = TextEncoder(tok, task.get("max_length") or model.cfg.block_size, task.get("append_eos", True),
                      eos_id=task.get("eos_id"), pad_id=task.get("pad_id"), lowercase=task.get("lowercase", False),
                      special_tokens=task.get("special_tokens", False))
    return model, task, enc, device, autocast


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    add_dtype_arg(p, default="fp32", help="autocast dtype: fp32 (default: exact probabilities), bf16, fp16 or auto")
    add_deprecated(p, "--precision", "--dtype")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the model's files against its manifest.json (sha256 of each)")


def add_classify_parser(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, help="a classifier's model directory (e.g. RUN_DIR/best), or a RUN_DIR (its latest)")
    p.add_argument("--text", action="append", help="a text to label (repeatable)")
    p.add_argument("--input", metavar="FILE", help="texts to label: a .jsonl/.csv/.tsv file (its text field) or "
                   "one text per line")
    p.add_argument("--text-field", help="the text column / JSON field of --input (default: the model's)")
    _common(p)


def run_classify(args: argparse.Namespace) -> int:
    import torch

    from .data import detect_format, read_examples
    from .metrics import predict_logits

    if bool(args.text) == bool(args.input):
        raise UserError("give the texts to label: --text TEXT (repeatable) or --input FILE, not both"
                        if args.text else "give the texts to label: --text TEXT (repeatable) or --input FILE")
    from ...checkpoint.kinds import CLASSIFIER, ENCODER, GPT, LORA, require_kind

    require_kind(args.model, "scalelm classify", (GPT, ENCODER, LORA, CLASSIFIER), needs=CLASSIFIER)
    model, task, enc, device, autocast = _load(args)
    if args.input:
        fmt = detect_format(args.input)
        texts = [e.text for e in read_examples(args.input, fmt, args.text_field or task.get("text_field") or "text",
                                               label_field=None, keep_blank=True)]
    else:
        if any(not t.strip() for t in args.text):
            raise UserError("--text must not be empty")
        texts = args.text
    # one record per input, in input order: a blank input gets a record with no label
    idx = [i for i, t in enumerate(texts) if t.strip()]
    probs = torch.softmax(predict_logits(model, enc.encode([texts[i] for i in idx]), args.batch_size, enc.fill_id,
                                         device, autocast), -1).tolist() if idx else []
    names = task["labels"]
    rows = dict(zip(idx, probs))
    for i, t in enumerate(texts):
        row = rows.get(i)
        best = names[max(range(len(row)), key=row.__getitem__)] if row is not None else None
        rec = json.dumps({"index": i, "text": t, "label": best,
                          "probs": {n: round(p, 6) for n, p in zip(names, row)} if row is not None else None},
                         ensure_ascii=False)
        # escaped, as JSON allows: a reader splitting with str.splitlines() must not cut a record in two
        print(rec.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    if len(idx) < len(texts):
        print(f"note: {len(texts) - len(idx)} of {len(texts)} inputs are blank: their records have no label",
              file=sys.stderr)
    return 0


def add_eval_args(p) -> None:
    """``scalelm eval``'s option for this task (the eval parser's own --data/--batch-size/... are reused)."""
    p.add_argument("--task", choices=["lm", "classify", "tokens", "translate", "summarize", "qa", "preference"],
                   default="lm",
                   help="lm (default): loss/perplexity on --data DATA_DIR; classify: accuracy, macro-F1, per-class "
                        "precision/recall and the confusion matrix of a classifier on --data FILE (labelled texts); tokens: "
                        "entity precision/recall/F1 (seqeval, strict IOB2) or token accuracy of a tagger on --data FILE; "
                        "translate: BLEU/chrF on --source/--reference; qa: exact match of final answers on --data FILE; "
                        "preference: pairwise accuracy and margin on --data PAIRS")


def run_eval_classify(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from .data import detect_format, label_ids, read_examples
    from .metrics import predict_logits, scores

    if not args.data or args.text or args.harness:
        raise UserError("--task classify scores a labelled file: --data FILE (SST lines, .tsv/.csv, .jsonl)")
    model, task, enc, device, autocast = _load(args)
    fmt = detect_format(args.data)
    examples = read_examples(args.data, fmt, task.get("text_field") or "text", task.get("label_field") or "label")
    y = label_ids(examples, task["labels"], "the model's training file")
    print(f"evaluating {args.model} on {args.data} ({len(examples)} texts) on {device}", file=sys.stderr)
    logits = predict_logits(model, enc.encode([e.text for e in examples]), args.batch_size, enc.fill_id, device,
                            autocast)
    res = scores(y, logits.argmax(1).numpy(), task["labels"])
    res["loss"] = float(F.cross_entropy(logits, torch.from_numpy(y)))
    print(json.dumps(json_safe(res), allow_nan=False))
    return 0
