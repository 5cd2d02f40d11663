"""``scalelm quantize``: weight-only int8 / int4 quantization of a model directory.

    scalelm quantize MODEL_DIR --scheme int8 --out DIR
    scalelm quantize MODEL_DIR --scheme int4 [--group-size 32|64|128] [--method rtn|gptq --calib DATA_DIR] --out DIR

Every Linear in the blocks (q, k, v, o, gate, up, down) is quantized; embeddings, norms and the
LM head stay float (``--include-head`` quantizes an untied head too). int8 is symmetric per output
channel; int4 asymmetric per group of ``--group-size`` inputs, by round-to-nearest or GPTQ
(:mod:`scalelm.compress.gptq`). The output is a model directory in the portable format of
:mod:`scalelm.model.quant` (safetensors, no pickle) that ``generate``, ``eval``, ``chat`` and
``serve`` load like any other; its ``config.json`` records what was done under ``"quantization"``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ..errors import UserError


def add_quantize_parser(p: argparse.ArgumentParser) -> None:
    p.description = (p.description or "") + (
        ". Quantizes every Linear in the blocks (q, k, v, o, gate, up, down); embeddings, norms and the LM head "
        "stay float (--include-head: an untied head too).")
    p.add_argument("model", help="a model directory, or a RUN_DIR (its latest checkpoint)")
    p.add_argument("--scheme", required=True, choices=["int8", "int4"],
                   help="int8: symmetric, one scale per output channel; int4: asymmetric, a scale and zero point "
                        "per group of --group-size inputs")
    p.add_argument("--group-size", type=int, default=None, help="int4 only: 32, 64 or 128 (default 128); must "
                   "divide every quantized layer's input width")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="rtn: round to nearest (no data); gptq: error-compensating (Frantar et al. 2022), needs "
                        "--calib")
    p.add_argument("--include-head", action="store_true", help="quantize the LM head too (only an untied one)")
    p.add_argument("--out", required=True, help="the quantized model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quantized model directory at --out")
    c = p.add_argument_group("calibration (--method gptq)")
    c.add_argument("--calib", metavar="DATA_DIR", help="a DATA_DIR from `scalelm prepare` (the model's tokenizer)")
    c.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--calib-seq-len", type=int, default=None, help="tokens per window (default: block_size)")
    c.add_argument("--calib-batch", type=int, default=8, help="windows per forward pass")
    c.add_argument("--seed", type=int, default=0, help="which windows are drawn")
    c.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, a fraction of mean(diag H)")
    p.add_argument("--device", default="auto", help="where to quantize: auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true", help="skip checking the model against its manifest.json")


def _check_args(args) -> None:
    if args.scheme == "int8" and args.group_size is not None:
        raise UserError("--group-size is for int4: int8 has one scale per output channel (leave out --group-size)")
    if args.method == "gptq" and not args.calib:
        raise UserError("--method gptq needs calibration data: --calib DATA_DIR (prepared by `scalelm prepare` with "
                        "the model's tokenizer)")
    if args.method == "rtn" and args.calib:
        raise UserError("--calib is used only by --method gptq (round to nearest needs no data)")
    if args.calib_batch < 1 or not args.damp > 0:
        raise UserError("--calib-batch must be positive and --damp above 0")


def is_quantized_dir(path) -> bool:
    from ..model.quant import read_quantization
    from ..runs import is_scalelm_model_dir

    try:
        return is_scalelm_model_dir(path) and read_quantization(path) is not None
    except UserError:
        return False


def run_quantize(args: argparse.Namespace) -> int:
    import torch

    from ..fileio import publish_dir
    from ..model.hf import TOKENIZER_FILES
    from ..model.io import load_model_dir, read_tokenizer_json, save_model_dir
    from ..model.manifest import write_manifest
    from ..model.quant import (
        QuantLinear,
        check_group_size,
        prepare_kernels,
        quant_meta,
        quantizable_linears,
        read_quantization,
        replace_module,
    )
    from ..precision import pick_device
    from ..runs import CONFIG, TOKENIZER, WEIGHTS, check_output_dir, resolve_checkpoint

    _check_args(args)
    group_size = (args.group_size or 128) if args.scheme == "int4" else 0
    src = resolve_checkpoint(args.model)
    done = read_quantization(src)
    if done is not None:
        raise UserError(f"{src} is already quantized ({done['scheme']}): quantize the float model it was made from")
    out = Path(args.out)
    check_output_dir(out, "quantized model directory", is_quantized_dir, sources=[args.model, src],
                     overwrite=args.overwrite)
    device = pick_device(args.device, option="--device")
    model = load_model_dir(src, device=device, dtype=torch.float32, verify=not args.no_verify, allow_quantized=False)
    names = list(quantizable_linears(model, args.include_head))
    check_group_size(model, args.scheme, group_size, names)
    tok = read_tokenizer_json(src)
    meta = quant_meta(args.scheme, group_size, args.method, names)
    t0 = time.perf_counter()
    print(f"quantizing {len(names)} linears of {src} to {args.scheme}"
          f"{f' g{group_size}' if group_size else ''} with {args.method} on {device}", file=sys.stderr)
    if args.method == "gptq":
        from .calib import calibration_windows
        from .gptq import gptq_model

        seq_len = args.calib_seq_len or model.cfg.block_size
        if seq_len > model.cfg.block_size:
            raise UserError(f"--calib-seq-len {seq_len} exceeds the model's block_size {model.cfg.block_size}")
        windows = calibration_windows(args.calib, args.calib_samples, seq_len, args.seed, tokenizer_json=tok,
                                      what=f"the model {src}")
        meta["calib"] = {"data": str(Path(args.calib).resolve()), "samples": args.calib_samples,
                         "seq_len": seq_len, "seed": args.seed, "damp": args.damp}
        qmods = gptq_model(model, names, args.scheme, group_size, windows, args.calib_batch, damp=args.damp,
                           log=lambda m: print(m, file=sys.stderr))
    else:
        with torch.no_grad():
            qmods = {n: QuantLinear.from_float(model.get_submodule(n), args.scheme, group_size) for n in names}
    for n, m in qmods.items():
        replace_module(model, n, m)
    model.to("cpu")
    seconds = time.perf_counter() - t0
    meta["source"] = str(Path(src).resolve())
    src_meta = json.loads((src / CONFIG).read_text())
    extra = {k: src_meta[k] for k in ("step", "hf") if k in src_meta}
    extra["quantization"] = meta
    # stage the whole directory (weights, config, tokenizer files, manifest), then publish it at once
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.quantize-staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_model_dir(model, staging, tok, extra=extra, manifest=False)
        for name in TOKENIZER_FILES:
            if name != TOKENIZER and (src / name).is_file():
                shutil.copyfile(src / name, staging / name)
        write_manifest(staging)
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    kernels = prepare_kernels(model)
    before, after = (src / WEIGHTS).stat().st_size, (out / WEIGHTS).stat().st_size
    print(f"wrote {out} in {seconds:.1f} s: {WEIGHTS} {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB; "
          f"kernels here: {', '.join(f'{k} x{v}' for k, v in kernels.items())}", file=sys.stderr)
    print(json.dumps({"out": str(out), "scheme": args.scheme, "group_size": group_size or None,
                      "method": args.method, "modules": len(names), "bytes_before": before, "bytes": after,
                      "seconds": round(seconds, 3), "kernels": kernels}))
    return 0
