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
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..cliargs import add_deprecated, add_model_arg, add_overwrite_arg
from ..errors import UserError


def add_quantize_parser(p: argparse.ArgumentParser) -> None:
    p.description = (p.description or "") + (
        ". Quantizes every Linear in the blocks (q, k, v, o, gate, up, down); embeddings, norms and the LM head "
        "stay float (--include-head: an untied head too).")
    add_model_arg(p)
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
    add_overwrite_arg(p, "quantized model directory")
    c = p.add_argument_group("calibration (--method gptq)")
    c.add_argument("--calib", metavar="DATA_DIR", help="a DATA_DIR from `scalelm prepare` (the model's tokenizer)")
    c.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's block_size)")
    c.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    add_deprecated(c, "--calib-seq-len", "--seq-len")
    add_deprecated(c, "--calib-batch", "--batch-size")
    c.add_argument("--seed", type=int, default=0, help="which windows are drawn")
    c.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, a fraction of mean(diag H)")
    p.add_argument("--device", default="auto", help="where to quantize: auto | cpu | cuda | cuda:N")
    p.add_argument("--no-verify", action="store_true", help="skip checking the model against its manifest.json")


def _check_args(args) -> None:
    if args.scheme == "int8" and args.group_size is not None:
        raise UserError("--group-size is for int4: int8 has one scale per output channel (leave out --group-size)")
    # 0 is refused, not read as "the default": a value given is a value meant
    if args.group_size is not None and args.group_size < 1:
        raise UserError(f"--group-size must be a positive number of inputs (32, 64 or 128), got {args.group_size}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len must be a positive number of tokens (default: the model's block_size), got "
                        f"{args.seq_len}")
    if args.method == "gptq" and not args.calib:
        raise UserError("--method gptq needs calibration data: --calib DATA_DIR (prepared by `scalelm prepare` with "
                        "the model's tokenizer)")
    if args.method == "rtn" and args.calib:
        raise UserError("--calib is used only by --method gptq (round to nearest needs no data)")
    if args.batch_size < 1 or not args.damp > 0:
        raise UserError("--batch-size must be positive and --damp above 0")


def is_quantized_dir(path) -> bool:
    from ..model.quant import read_quantization
    from ..runs import is_scalelm_model_dir

    try:
        return is_scalelm_model_dir(path) and read_quantization(path) is not None
    except UserError:
        return False


def _float_size(src: Path, model) -> tuple[int, str]:
    """``(bytes, what)`` of the float model being quantized: its ``model.safetensors``; a LoRA run's
    checkpoint (adapters only, merged into its base on load) or a sharded one has no such file, so
    there it is the float32 tensors as loaded (a tied head counted once)."""
    from ..checkpoint.names import WEIGHTS

    if (src / WEIGHTS).is_file():
        return (src / WEIGHTS).stat().st_size, WEIGHTS
    sizes = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(sizes.values()), f"float32 weights (no {WEIGHTS} in {src})"


def run_quantize(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint.model_dir import read_config, read_tokenizer_json
    from ..checkpoint.names import WEIGHTS
    from ..checkpoint.quantized import save_quantized_dir
    from ..model.io import load_model_dir
    from ..model.quant import (
        QuantLinear,
        check_group_size,
        prepare_kernels,
        quant_meta,
        quantizable_linears,
        read_quantization,
        replace_module,
    )
    from ..checkpoint.kinds import CLASSIFIER, ENCDEC, GPT, LORA, QUANTIZED, require_kind
    from ..precision import pick_device
    from ..runs import check_output_dir, resolve_checkpoint

    _check_args(args)
    group_size = (128 if args.group_size is None else args.group_size) if args.scheme == "int4" else 0
    src = resolve_checkpoint(args.model)
    require_kind(src, "scalelm quantize", (GPT, LORA),
                 hint={QUANTIZED: "it is already quantized: quantize the float model it was made from",
                       CLASSIFIER: "the quantized model would lose the head and the labels; use the float classifier",
                       ENCDEC: "scalelm loads quantized decoder-only models only; translate with the float model"})
    done = read_quantization(src)
    if done is not None:
        raise UserError(f"{src} is already quantized ({done['scheme']}): quantize the float model it was made from")
    out = Path(args.out)
    check_output_dir(out, "quantized model directory", is_quantized_dir, sources=[args.model, src],
                     overwrite=args.overwrite)
    device = pick_device(args.device, option="--device")
    model = load_model_dir(src, device=device, dtype=torch.float32, verify=not args.no_verify, allow_quantized=False)
    before, before_what = _float_size(src, model)
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

        seq_len = model.cfg.block_size if args.seq_len is None else args.seq_len
        if seq_len > model.cfg.block_size:
            raise UserError(f"--seq-len {seq_len} exceeds the model's block_size {model.cfg.block_size}")
        windows = calibration_windows(args.calib, args.calib_samples, seq_len, args.seed, tokenizer_json=tok,
                                      what=f"the model {src}")
        meta["calib"] = {"data": str(Path(args.calib).resolve()), "samples": args.calib_samples,
                         "seq_len": seq_len, "seed": args.seed, "damp": args.damp}
        qmods = gptq_model(model, names, args.scheme, group_size, windows, args.batch_size, damp=args.damp,
                           log=lambda m: print(m, file=sys.stderr))
    else:
        with torch.no_grad():
            qmods = {n: QuantLinear.from_float(model.get_submodule(n), args.scheme, group_size) for n in names}
    for n, m in qmods.items():
        replace_module(model, n, m)
    model.to("cpu")
    seconds = time.perf_counter() - t0
    meta["source"] = str(Path(src).resolve())
    src_meta = read_config(src)
    extra = {k: src_meta[k] for k in ("step", "hf") if k in src_meta}
    extra["quantization"] = meta
    save_quantized_dir(out, dataclasses.asdict(model.cfg), model.state_dict(), tok, extra, src=src)
    kernels = prepare_kernels(model)
    after = (out / WEIGHTS).stat().st_size
    print(f"wrote {out} in {seconds:.1f} s: {before_what} {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB; "
          f"kernels here: {', '.join(f'{k} x{v}' for k, v in kernels.items())}", file=sys.stderr)
    print(json.dumps({"out": str(out), "scheme": args.scheme, "group_size": group_size or None,
                      "method": args.method, "modules": len(names), "bytes_before": before, "bytes": after,
                      "seconds": round(seconds, 3), "kernels": kernels}))
    return 0
