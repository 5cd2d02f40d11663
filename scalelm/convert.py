"""``scalelm convert``: checkpoints to and from other formats.

The conversions themselves live in their layers (``scalelm.model.hf`` for Hugging Face models,
``scalelm.lora.peft_export`` for PEFT adapters); this module, above them all, is only the command line:

    scalelm convert --from-hf HF_DIR --out CKPT_DIR     import a Hugging Face model
    scalelm convert CKPT --to-hf OUT_DIR                export a model to Hugging Face
    scalelm convert LORA_RUN --to-peft OUT_DIR          export a LoRA run's adapters for PEFT
"""

from __future__ import annotations

import argparse
import json
import sys

from .model.hf import (
    DTYPES,
    ConversionError,
    export_hf_dir,
    import_hf_dir,
    is_hf_model_dir,
)
from .runs import check_output_dir, is_scalelm_model_dir, resolve_checkpoint


def add_convert_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("examples:\n  scalelm convert --from-hf ./gpt2 --out ckpt/gpt2\n"
                "  scalelm convert runs/baby --to-hf export/baby\n"
                "  scalelm convert runs/baby-lora --to-peft export/baby-lora")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("ckpt", nargs="?", help="scalelm model directory or RUN_DIR to export (with --to-hf/--to-peft)")
    p.add_argument("--from-hf", metavar="HF_DIR", help="import this Hugging Face model directory")
    p.add_argument("--out", metavar="CKPT_DIR", help="where the imported scalelm model directory goes")
    p.add_argument("--to-hf", metavar="OUT_DIR", help="export CKPT to this Hugging Face directory")
    p.add_argument("--to-peft", metavar="OUT_DIR", help="export a LoRA run's adapters to this PEFT adapter "
                   "directory (load with peft.PeftModel.from_pretrained on the base's --to-hf export)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype of the written weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it holds an "
                   "earlier output of the same kind (never a run directory, the source or another folder)")


def _to_hf(args: argparse.Namespace) -> str:
    from .tasks.classify.files import resolve_model_dir
    from .tasks.classify.hf import export_hf_classifier, is_classifier_dir

    classifier = is_classifier_dir(args.ckpt)  # -> *ForSequenceClassification
    src = resolve_model_dir(args.ckpt) if classifier else resolve_checkpoint(args.ckpt)
    check_output_dir(args.to_hf, "Hugging Face model directory", is_hf_model_dir,
                     sources=[args.ckpt, src], overwrite=args.overwrite, option="--to-hf")
    if classifier:
        return str(export_hf_classifier(args.ckpt, args.to_hf, DTYPES[args.dtype]))
    return str(export_hf_dir(args.ckpt, args.to_hf, DTYPES[args.dtype]))


def _to_peft(args: argparse.Namespace) -> str:
    from .lora.peft_export import export_peft_dir, is_peft_dir

    check_output_dir(args.to_peft, "PEFT adapter directory", is_peft_dir,
                     sources=[args.ckpt, resolve_checkpoint(args.ckpt)], overwrite=args.overwrite,
                     option="--to-peft")
    return str(export_peft_dir(args.ckpt, args.to_peft, DTYPES[args.dtype]))


def run_convert(args: argparse.Namespace) -> int:
    exports = [o for o in ("to_hf", "to_peft") if getattr(args, o)]
    if args.from_hf:
        if exports or args.ckpt:
            raise ConversionError("use either --from-hf HF_DIR --out CKPT_DIR or CKPT --to-hf OUT_DIR")
        if not args.out:
            raise ConversionError("--from-hf needs --out CKPT_DIR (where the scalelm checkpoint goes)")
        check_output_dir(args.out, "scalelm model directory", is_scalelm_model_dir, sources=[args.from_hf],
                         overwrite=args.overwrite)
        out = str(import_hf_dir(args.from_hf, args.out, DTYPES[args.dtype]))
    elif len(exports) > 1:
        raise ConversionError("give one of --to-hf OUT_DIR and --to-peft OUT_DIR per command")
    elif exports:
        flag = "--" + exports[0].replace("_", "-")
        if not args.ckpt:
            raise ConversionError(f"{flag} OUT_DIR needs the checkpoint to export: scalelm convert CKPT {flag} OUT_DIR")
        out = _to_hf(args) if exports[0] == "to_hf" else _to_peft(args)
    else:
        raise ConversionError("nothing to do: give --from-hf HF_DIR --out CKPT_DIR, or CKPT --to-hf OUT_DIR")
    print(f"wrote {out}", file=sys.stderr)
    print(json.dumps({"out": out}))
    return 0
