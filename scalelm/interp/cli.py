"""``scalelm inspect``, ``scalelm trace`` and ``scalelm steer``: the command lines of scalelm/interp.

    scalelm inspect MODEL --text "To be, or not to be" [--top-k 5] [--json] [--out DIR]
    scalelm trace MODEL --clean "..." --corrupt "..." --target " Paris" [--foil " Rome"] [--out DIR]
    scalelm steer MODEL --positive TEXT|FILE --negative TEXT|FILE --layer L --out VEC.safetensors

Steering vectors are used by ``scalelm generate --steer VEC`` and by ``serve`` requests (a ``steer``
object); see docs/interpretability.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..cliargs import DTYPES, TORCH_NAMES, add_dtype_arg, add_model_arg, add_overwrite_arg
from ..errors import UserError
from ..fileio import json_safe

INSPECT_KIND, TRACE_KIND = "inspect report", "trace report"


# ----------------------------------------------------------------------------- shared

def add_common_args(p) -> None:
    add_model_arg(p)
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (or a directory with one) instead of the "
                   "checkpoint's")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    add_dtype_arg(p, help="the model's number format (default fp32, the reference)", default="fp32", choices=DTYPES)
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the model's files against its manifest.json (sha256 of each)")


def add_bos_arg(p) -> None:
    p.add_argument("--bos", action="store_true", help="start from end-of-text (the document separator the model "
                   "was trained with), so the first token is predicted too")


def load_model_and_tokenizer(args, command: str):
    """``(model, tokenizer, bos id, checkpoint dir)`` of ``args.model``, a decoder-only LM, in eval mode."""
    import torch

    from ..checkpoint.kinds import LANGUAGE_MODELS, require_kind
    from ..data.tokenizer import load_tokenizer
    from ..model.hf import special_token_ids
    from ..model.io import load_model_dir
    from ..precision import pick_device
    from ..runs import TOKENIZER, resolve_checkpoint

    require_kind(args.model, f"scalelm {command}", LANGUAGE_MODELS)
    ckpt = resolve_checkpoint(args.model)
    if args.tokenizer is None and not (ckpt / TOKENIZER).is_file():
        raise UserError(f"{ckpt} has no tokenizer.json: pass --tokenizer PATH")
    tok = load_tokenizer(args.tokenizer or ckpt)
    dev = pick_device(args.device, option="--device")
    model = load_model_dir(ckpt, device=dev, dtype=getattr(torch, TORCH_NAMES[args.dtype]),
                           verify=not args.no_verify).eval()
    bos, _ = special_token_ids(ckpt)
    if args.tokenizer is not None:
        bos = tok.token_to_id("<|endoftext|>")
    if isinstance(bos, list):
        bos = bos[0]
    if getattr(args, "bos", False) and bos is None:
        raise UserError("--bos: this tokenizer has no end-of-text token")
    return model, tok, bos, ckpt


def encode(tok, text: str, option: str) -> list[int]:
    ids = tok.encode(text).ids
    if not ids:
        raise UserError(f"{option} is empty once tokenized")
    return ids


def one_token(tok, text: str, option: str) -> int:
    ids = tok.encode(text).ids
    if len(ids) != 1:
        pieces = [tok.decode([i]) for i in ids]
        raise UserError(f"{option} {text!r} is {len(ids)} tokens {pieces}: give one token (mind the leading space: "
                        f"' Paris' and 'Paris' differ), or its id with {option}-id")
    return ids[0]


def read_text(args) -> str:
    if (args.text is None) == (args.text_file is None):
        raise UserError("give the text: --text TEXT or --text-file FILE")
    if args.text is not None:
        return args.text
    f = Path(args.text_file)
    if not f.is_file():
        raise UserError(f"--text-file {f}: no such file")
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--text-file {f} is not valid UTF-8 (byte {e.start})") from None


def print_json(obj) -> None:
    print(json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False))


# ----------------------------------------------------------------------------- inspect

def add_inspect_parser(p) -> None:
    add_common_args(p)
    p.add_argument("--text", help="the text to inspect")
    p.add_argument("--text-file", metavar="FILE", help="read the text from a UTF-8 file")
    add_bos_arg(p)
    p.add_argument("--top-k", type=int, default=5, help="next-token predictions shown per position (default 5)")
    p.add_argument("--lens-k", type=int, default=3, help="tokens kept per layer and position in the logit lens "
                   "(default 3)")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object (attention included)")
    p.add_argument("--out", metavar="DIR", help="write report.html (self-contained), inspect.json and one attention "
                   "PNG per layer into DIR")
    add_overwrite_arg(p, INSPECT_KIND)


def run_inspect(args) -> int:
    from ..checkpoint.staging import staged_dir
    from ..fileio import atomic_write_bytes
    from ..runs import check_output_dir
    from .figures import attention_png
    from .inspect import format_table, inspect_text
    from .report_html import render_report

    text = read_text(args)
    for name in ("top_k", "lens_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: must be >= 1")
    if args.out:
        check_output_dir(args.out, INSPECT_KIND, lambda d: (d / "inspect.json").is_file(), sources=[args.model],
                         overwrite=args.overwrite)
    model, tok, bos, ckpt = load_model_and_tokenizer(args, "inspect")
    ins = inspect_text(model, tok, text, args.top_k, args.lens_k, bos if args.bos else None)
    ins.meta = {"model": str(args.model), "text": text, "bos": bool(args.bos)}
    if args.json:
        print_json(ins.to_json())
    else:
        print(format_table(ins))
    if args.out:
        with staged_dir(args.out, manifest=False) as d:
            atomic_write_bytes(d / "inspect.json", json.dumps(json_safe(ins.to_json()), ensure_ascii=False).encode())
            atomic_write_bytes(d / "report.html", render_report(ins, f"scalelm inspect: {args.model}").encode())
            for L in range(ins.attention.shape[0]):
                attention_png(ins.attention[L], ins.pieces, L, d / f"attention_layer{L}.png")
        print(f"wrote {args.out}: report.html, inspect.json, {ins.attention.shape[0]} attention PNGs", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- trace

def add_trace_parser(p) -> None:
    add_common_args(p)
    p.add_argument("--clean", required=True, help="the prompt whose prediction is traced")
    p.add_argument("--corrupt", required=True, help="the same prompt with the information removed (as many tokens)")
    p.add_argument("--target", help="the token the clean prompt predicts, as text (e.g. ' Paris')")
    p.add_argument("--target-id", type=int, help="... or as a token id")
    p.add_argument("--foil", help="the token it is compared with (default: the corrupted run's top token)")
    p.add_argument("--foil-id", type=int, help="... or as a token id")
    p.add_argument("--sites", default="resid_pre,attn_out,mlp_out",
                   help="comma-separated sites patched per (layer, position) (default: all three)")
    p.add_argument("--no-heads", action="store_true", help="skip patching each head (attn.z)")
    add_bos_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", metavar="DIR", help="write trace.json and trace.png (the heatmaps) into DIR")
    add_overwrite_arg(p, TRACE_KIND)


def _token_arg(tok, text, tid, option: str, required: bool):
    if text is not None and tid is not None:
        raise UserError(f"give {option} or {option}-id, not both")
    if text is not None:
        return one_token(tok, text, option)
    if tid is None and required:
        raise UserError(f"give the token to trace: {option} TEXT or {option}-id N")
    return tid


def run_trace(args) -> int:
    from ..checkpoint.staging import staged_dir
    from ..fileio import atomic_write_bytes
    from ..runs import check_output_dir
    from .figures import trace_png
    from .inspect import token_text
    from .patching import format_trace, trace

    if args.out:
        check_output_dir(args.out, TRACE_KIND, lambda d: (d / "trace.json").is_file(), sources=[args.model],
                         overwrite=args.overwrite)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    model, tok, bos, _ = load_model_and_tokenizer(args, "trace")
    first = [bos] if args.bos else []
    clean, corrupt = first + encode(tok, args.clean, "--clean"), first + encode(tok, args.corrupt, "--corrupt")
    target = _token_arg(tok, args.target, args.target_id, "--target", True)
    foil = _token_arg(tok, args.foil, args.foil_id, "--foil", False)
    r = trace(model, clean, corrupt, target, foil, sites=sites, heads=not args.no_heads)
    r.pieces = [token_text(tok, i) for i in clean]
    r.target_text, r.foil_text = token_text(tok, r.target), token_text(tok, r.foil)
    if args.json:
        print_json(r.to_json())
    else:
        print(format_trace(r))
    if args.out:
        with staged_dir(args.out, manifest=False) as d:
            atomic_write_bytes(d / "trace.json", json.dumps(json_safe(r.to_json()), ensure_ascii=False).encode())
            trace_png(r, d / "trace.png")
        print(f"wrote {args.out}: trace.json, trace.png", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- steer

def add_steer_parser(p) -> None:
    add_common_args(p)
    p.add_argument("--positive", action="append", required=True, metavar="TEXT|FILE",
                   help="prompts for the direction to steer towards: a text, or a file of one prompt per line "
                        "(repeatable)")
    p.add_argument("--negative", action="append", required=True, metavar="TEXT|FILE",
                   help="prompts for the direction to steer away from (same forms)")
    p.add_argument("--layer", type=int, help="the layer whose input stream (blocks.L.resid_pre) the vector is read "
                   "from and added to (required; middle layers usually steer best)")
    p.add_argument("--pool", choices=["mean", "last"], default="mean",
                   help="each prompt's stream: the mean over its tokens (default) or its last token")
    add_bos_arg(p)
    p.add_argument("--out", required=True, metavar="VEC.safetensors", help="the vector file to write")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_steer(args) -> int:
    import torch

    from ..runs import check_output_file
    from .steering import read_prompts, save_vector, steering_vector

    if args.layer is None:
        raise UserError("give the layer: --layer L (the vector is read from and added to blocks.L.resid_pre)")
    out = check_output_file(args.out, [args.model])
    pos = [x for v in args.positive for x in read_prompts(v)]
    neg = [x for v in args.negative for x in read_prompts(v)]
    model, tok, bos, _ = load_model_and_tokenizer(args, "steer")
    first = [bos] if args.bos else []
    vec = steering_vector(model, [first + encode(tok, t, "--positive") for t in pos],
                          [first + encode(tok, t, "--negative") for t in neg], args.layer, args.pool)
    save_vector(out, vec, args.layer, pool=args.pool, positive=len(pos), negative=len(neg), model=args.model,
                bos=args.bos)
    with torch.no_grad():  # what the direction says in words: the head read straight off the vector
        logits = model.lm_head(vec.to(model.lm_head.weight.dtype).to(next(model.parameters()).device)).float()
    up = [tok.decode([int(i)]) for i in logits.topk(10).indices]
    down = [tok.decode([int(i)]) for i in (-logits).topk(10).indices]
    summary = {"out": str(out), "layer": args.layer, "pool": args.pool, "positive": len(pos), "negative": len(neg),
               "norm": round(float(vec.norm()), 6), "promotes": up, "demotes": down}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {out}: layer {args.layer}, norm {summary['norm']:.4g}, from {len(pos)} positive and "
              f"{len(neg)} negative prompts ({args.pool} of each)")
        print("tokens the vector promotes through the LM head:", ", ".join(repr(t) for t in up))
        print("tokens it demotes:", ", ".join(repr(t) for t in down))
    return 0
