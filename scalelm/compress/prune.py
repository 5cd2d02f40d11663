"""``scalelm prune``: remove weights (unstructured or N:M) or whole units (structured) of a model.

    scalelm prune MODEL_DIR --method magnitude|wanda|sparsegpt --sparsity 0.5 [--pattern 2:4] \\
        --calib DATA_DIR [--calib-samples 128] --out DIR
    scalelm prune MODEL_DIR --method structured [--heads H] [--ffn-dim F] [--n-layer L] [--embd E] \\
        --calib DATA_DIR --out DIR

The output is an ordinary model directory (pruned weights stored as zeros, or a smaller dense
model), so ``eval``, ``generate``, ``convert --to-hf`` and ``train --init-from`` / ``distill
--student`` take it as they are. Its ``config.json`` records what was done under ``"pruning"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..cliargs import add_deprecated, add_model_arg, add_overwrite_arg
from ..errors import UserError


def add_prune_parser(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt", "structured"])
    p.add_argument("--out", required=True, help="the pruned model directory to write")
    add_overwrite_arg(p, "model directory")
    u = p.add_argument_group("unstructured (magnitude, wanda, sparsegpt)")
    u.add_argument("--sparsity", type=float, help="fraction of each layer's weights to remove (e.g. 0.5)")
    u.add_argument("--pattern", help="N:M: keep at most N nonzero weights in every M consecutive inputs (2:4)")
    u.add_argument("--blocksize", type=int, default=128, help="SparseGPT: columns per lazy-update block")
    u.add_argument("--damp", type=float, default=0.01, help="SparseGPT: dampening, a fraction of mean(diag H)")
    s = p.add_argument_group("structured (a smaller dense model)")
    s.add_argument("--heads", type=int, help="attention heads to keep per layer (with GQA, whole kv groups)")
    s.add_argument("--ffn-dim", type=int, help="MLP neurons to keep per layer")
    s.add_argument("--n-layer", type=int, help="layers to keep")
    s.add_argument("--embd", type=int, help="embedding (residual) channels to keep")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", metavar="DATA_DIR", help="a DATA_DIR (prepared with the model's tokenizer)")
    c.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's block_size)")
    c.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    add_deprecated(c, "--calib-seq-len", "--seq-len")
    add_deprecated(c, "--calib-batch", "--batch-size")
    c.add_argument("--seed", type=int, default=0, help="which windows are drawn")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true", help="skip checking the model against its manifest.json")


def _check_args(args) -> None:
    structured = args.method == "structured"
    unstructured_given = [o for o, v in (("--sparsity", args.sparsity), ("--pattern", args.pattern)) if v is not None]
    structured_given = [o for o, v in (("--heads", args.heads), ("--ffn-dim", args.ffn_dim),
                                       ("--n-layer", args.n_layer), ("--embd", args.embd)) if v is not None]
    if structured and unstructured_given:
        raise UserError(f"--method structured removes whole units: {' and '.join(unstructured_given)} belong to "
                        f"magnitude, wanda or sparsegpt")
    if not structured and structured_given:
        raise UserError(f"{' and '.join(structured_given)} belong to --method structured")
    if not structured and args.sparsity is None and args.pattern is None:
        raise UserError(f"--method {args.method} needs --sparsity S (e.g. 0.5) or --pattern N:M (e.g. 2:4)")
    if args.method in ("wanda", "sparsegpt", "structured") and not args.calib:
        raise UserError(f"--method {args.method} needs calibration data: --calib DATA_DIR (prepared with the "
                        f"model's tokenizer)")
    if args.batch_size < 1 or args.blocksize < 1 or not args.damp > 0:
        raise UserError("--batch-size and --blocksize must be positive, --damp above 0")
    if args.seq_len is not None and args.seq_len < 1:  # 0 is refused, not read as "the default"
        raise UserError(f"--seq-len must be a positive number of tokens (default: the model's block_size), got "
                        f"{args.seq_len}")


def run_prune(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint.kinds import CLASSIFIER, GPT, LORA, QUANTIZED, require_kind
    from ..model.io import load_model_dir, read_tokenizer_json, save_model_dir
    from ..precision import pick_device
    from ..runs import check_output_dir, is_scalelm_model_dir, resolve_checkpoint
    from .calib import calibration_windows, check_prunable
    from .unstructured import log_stderr, parse_pattern, prune_unstructured, sparsity_report

    _check_args(args)
    nm = parse_pattern(args.pattern)
    sparsity = args.sparsity
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise UserError(f"--pattern {args.pattern} means a sparsity of {implied:g}, not --sparsity {sparsity:g}: "
                            f"give one of them")
        sparsity = implied
    if sparsity is not None and not 0 <= sparsity < 1:
        raise UserError(f"--sparsity must be in [0, 1), got {sparsity:g}")
    src = resolve_checkpoint(args.model)
    require_kind(src, "scalelm prune", (GPT, LORA),
                 hint={CLASSIFIER: "the pruned model would lose the head; prune the language model it was fine-tuned "
                                   "from, then fine-tune the classifier on the pruned one",
                       QUANTIZED: "prune the float model it was made from (and quantize the pruned one)"})
    check_output_dir(args.out, "scalelm model directory", is_scalelm_model_dir, sources=[args.model, src],
                     overwrite=args.overwrite)
    device = pick_device(args.device, option="--device")
    model = load_model_dir(src, device=device, dtype=torch.float32, verify=not args.no_verify, allow_quantized=False)
    check_prunable(model)
    tok = read_tokenizer_json(src)
    seq_len = model.cfg.block_size if args.seq_len is None else args.seq_len
    if seq_len > model.cfg.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's block_size {model.cfg.block_size}")
    windows = None
    if args.calib:
        windows = calibration_windows(args.calib, args.calib_samples, seq_len, args.seed, tokenizer_json=tok,
                                      what=f"the model {src}")
    record = {"method": args.method, "source": str(Path(src).resolve()),
              "calib": str(Path(args.calib).resolve()) if args.calib else None,
              "calib_samples": args.calib_samples if args.calib else 0, "calib_seq_len": seq_len, "seed": args.seed}
    params_before = model.num_params()
    t0 = time.perf_counter()
    print(f"pruning {src} ({params_before:,} parameters) with {args.method} on {device}", file=sys.stderr)
    if args.method == "structured":
        from .structured import prune_structured

        model.eval()
        model, plan = prune_structured(model, windows, args.heads, args.ffn_dim, args.n_layer, args.embd,
                                       args.batch_size)
        record.update(targets={"heads": args.heads, "ffn_dim": args.ffn_dim, "n_layer": args.n_layer,
                               "embd": args.embd}, kept=plan.describe(), params_before=params_before,
                      params=model.num_params())
        summary = {"params_before": params_before, "params": model.num_params(),
                   "pruned_weights": params_before - model.num_params(),  # removed with their units
                   "fraction": model.num_params() / params_before}
        c = model.cfg
        print(f"kept layers {plan.layers}; config n_layer={c.n_layer} n_head={c.n_head} n_kv_head={c.kv_heads} "
              f"n_embd={c.n_embd} ffn={c.ffn_dim} head_dim={c.head_dim}", file=sys.stderr)
    else:
        per_layer = prune_unstructured(model, args.method, sparsity, nm, windows, args.batch_size, args.blocksize,
                                       args.damp, log=log_stderr)
        summary = sparsity_report(model, per_layer)
        record.update(sparsity=sparsity, pattern=args.pattern, blocksize=args.blocksize if args.method == "sparsegpt"
                      else None, damp=args.damp if args.method == "sparsegpt" else None, achieved=summary,
                      layers=per_layer)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    model.to("cpu")
    out = save_model_dir(model, args.out, tok, extra={"pruning": record})
    print(f"wrote {out} in {record['seconds']:.1f} s", file=sys.stderr)
    print(json.dumps({"out": str(out), "method": args.method, "seconds": record["seconds"], **summary}))
    return 0
