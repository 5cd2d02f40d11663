"""``scalelm export``: a model directory from a sharded (DCP) checkpoint (``--format model``, the
default: :mod:`scalelm.distributed.dcp`), or an ONNX graph for onnxruntime (``--format onnx``:
:mod:`scalelm.compress.onnx_export`)."""

from __future__ import annotations

import argparse

from ..errors import UserError


def add_export_parser(p: argparse.ArgumentParser) -> None:
    from ..distributed.dcp import add_export_parser as add_model_export

    add_model_export(p)
    p.add_argument("--format", choices=["model", "onnx"], default="model",
                   help="model: a scalelm model directory (safetensors; consolidates a sharded checkpoint); "
                        "onnx: one prefill/decode graph for onnxruntime (`generate --backend onnxruntime`)")


def run_export(args: argparse.Namespace) -> int:
    from ..checkpoint.kinds import CLASSIFIER, ENCDEC, GPT, LORA, QUANTIZED, require_kind
    from ..runs import is_model_dir, latest_checkpoint

    onnx = args.format == "onnx"
    src = args.model
    src = src if is_model_dir(src) else (latest_checkpoint(src) or src)
    if is_model_dir(src):  # (else the exporter says what is missing)
        require_kind(src, "scalelm export --format onnx" if onnx else "scalelm export",
                     (GPT, LORA) if onnx else (GPT, LORA, ENCDEC),
                     hint={QUANTIZED: "its packed kernels have no ONNX form; export the float model it was made from"
                           if onnx else "copy it as it is (export would drop its quantization)",
                           CLASSIFIER: "export writes the language model without the head; a classifier goes to "
                                       "Hugging Face with `scalelm convert --to-hf`" if onnx else
                                       "export writes the language model without the head; `scalelm classify` and "
                                       "`scalelm eval --task classify` read the checkpoint as it is",
                           ENCDEC: "the ONNX graph is a decoder-only language model's prefill/decode step; "
                                   "translate with `scalelm translate`"})
    if args.format == "onnx":
        from .onnx_export import run_onnx_export

        return run_onnx_export(args)
    from ..distributed.dcp import run_export as run_model_export
    from ..model.quant import read_quantization

    q = read_quantization(src)
    if q is not None:
        raise UserError(f"{src} is a {q['scheme']}-quantized model directory already: copy it as it is (export would "
                        f"drop its quantization)")
    return run_model_export(args)
