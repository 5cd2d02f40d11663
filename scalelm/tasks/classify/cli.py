"""``scalelm classify`` (label texts) and ``scalelm eval --task classify`` (score a labelled file).

    scalelm classify RUN_OR_MODEL --text "a gripping film" --text "dull"     one JSON line per text
    scalelm classify RUN_OR_MODEL --input FILE                               .jsonl/.csv/.tsv text field, or lines
    scalelm eval RUN_OR_MODEL --task classify --data FILE                    accuracy, macro-F1, per class, confusion
"""

from __future__ import annotations

import argparse
import json
import sys

from ...errors import UserError
from ...fileio import json_safe


def _load(args):
    from ...precision import autocast_context, pick_device, resolve_precision
    from .data import TextEncoder
    from .files import load_classifier

    if args.batch_size < 1:
        raise UserError("--batch-size must be positive")
    device = pick_device(args.device)
    model, task, d = load_classifier(args.ckpt, device=device, verify=not args.no_verify)
    tok = (d / "tokenizer.json")
    if not tok.is_file():
        raise UserError(f"{d} has no tokenizer.json: a classifier reads text with its tokenizer")
    enc = TextEncoder(tok.read_text(), task.get("max_length") or model.cfg.block_size, task.get("append_eos", True),
                      eos_id=task.get("eos_id"), pad_id=task.get("pad_id"), lowercase=task.get("lowercase", False))
    precision = resolve_precision(args.precision, device)
    return model, task, enc, device, autocast_context(precision, device)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="fp32",
                   help="fp32 (default: exact probabilities), bf16 or auto")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the model's files against its manifest.json (sha256 of each)")


def add_classify_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="a classifier's model directory (e.g. RUN_DIR/best), or a RUN_DIR (its latest)")
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
    model, task, enc, device, autocast = _load(args)
    if args.input:
        fmt = detect_format(args.input)
        texts = [e.text for e in read_examples(args.input, fmt, args.text_field or task.get("text_field") or "text",
                                               label_field=None)]
    else:
        if any(not t.strip() for t in args.text):
            raise UserError("--text must not be empty")
        texts = args.text
    probs = torch.softmax(predict_logits(model, enc.encode(texts), args.batch_size, enc.fill_id, device, autocast), -1)
    names = task["labels"]
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        print(json.dumps({"label": names[best], "probs": {n: round(p, 6) for n, p in zip(names, row)}},
                         ensure_ascii=False))
    return 0


def add_eval_args(p) -> None:
    """``scalelm eval``'s option for this task (the eval parser's own --data/--batch-size/... are reused)."""
    p.add_argument("--task", choices=["lm", "classify", "translate", "qa"], default="lm",
                   help="lm (default): loss/perplexity on --data DATA_DIR; classify: accuracy, macro-F1, per-class "
                        "precision/recall and the confusion matrix of a classifier on --data FILE (labelled texts); "
                        "translate: BLEU/chrF on --source/--reference; qa: exact match of final answers on --data FILE")


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
    print(f"evaluating {args.ckpt} on {args.data} ({len(examples)} texts) on {device}", file=sys.stderr)
    logits = predict_logits(model, enc.encode([e.text for e in examples]), args.batch_size, enc.fill_id, device,
                            autocast)
    res = scores(y, logits.argmax(1).numpy(), task["labels"])
    res["loss"] = float(F.cross_entropy(logits, torch.from_numpy(y)))
    print(json.dumps(json_safe(res), allow_nan=False))
    return 0
