"""``scalelm convert``: checkpoints to and from other formats.

The conversions themselves live in their layers (``scalelm.model.hf`` for Hugging Face models,
``scalelm.lora.peft_export`` for PEFT adapters); this module, above them all, is only the command line:

    scalelm convert --from-hf HF_DIR --out MODEL_DIR    import a Hugging Face model
    scalelm convert --from-hf ORG/NAME[@REV] --out DIR  ... downloaded from the Hub (safetensors only)
    scalelm convert MODEL --to-hf OUT_DIR               export a model to Hugging Face
    scalelm convert LORA_RUN --to-peft OUT_DIR          export a LoRA run's adapters for PEFT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint.kinds import CLASSIFIER, ENCDEC, ENCODER, GPT, LORA, QUANTIZED, require_kind
from .cliargs import add_dtype_arg, add_model_arg, add_overwrite_arg
from .data.hub import HubError, download_hub_model, is_hub_model_id
from .model.hf import (
    ConversionError,
    export_hf_dir,
    import_hf_dir,
    is_hf_model_dir,
)
from .precision import DTYPES
from .runs import check_output_dir, is_scalelm_model_dir, resolve_checkpoint


def add_convert_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("examples:\n  scalelm convert --from-hf ./gpt2 --out ckpt/gpt2\n"
                "  scalelm convert --from-hf openai-community/gpt2 --out ckpt/gpt2\n"
                "  scalelm convert runs/baby --to-hf export/baby\n"
                "  scalelm convert runs/baby-lora --to-peft export/baby-lora")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arg(p, nargs="?", help="a model directory, or a RUN_DIR (its latest checkpoint), to export (with "
                                     "--to-hf/--to-peft)")
    p.add_argument("--from-hf", metavar="HF_DIR", help="import this Hugging Face model directory, or a Hub model "
                   "ORG/NAME[@REVISION] (downloaded to the Hugging Face cache: config, tokenizer and safetensors "
                   "files only; HF_HUB_OFFLINE=1 reads the cache alone)")
    p.add_argument("--out", metavar="MODEL_DIR", help="where the imported scalelm model directory goes")
    p.add_argument("--to-hf", metavar="OUT_DIR", help="export MODEL to this Hugging Face directory")
    p.add_argument("--to-peft", metavar="OUT_DIR", help="export a LoRA run's adapters to this PEFT adapter "
                   "directory (load with peft.PeftModel.from_pretrained on the base's --to-hf export)")
    add_dtype_arg(p, choices=("fp32", "bf16"), default="fp32", help="dtype of the written weights (default fp32)")
    add_overwrite_arg(p, "output of the same kind", option="the output directory")


# the kinds a Hugging Face export takes (``scalelm push`` uploads the same export), and why the others not
HF_EXPORTABLE = (GPT, ENCODER, LORA, CLASSIFIER)  # an encoder: BertForMaskedLM / ModernBertForMaskedLM
HF_EXPORT_HINTS = {QUANTIZED: "a Hugging Face model holds float weights: export the float model it was made from",
                   ENCDEC: "Hugging Face export covers decoder-only models (GPT-2 and Llama layouts)"}


def export_to_hf(model, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """``model`` (checked with :data:`HF_EXPORTABLE` first) -> a directory ``transformers`` loads:
    ``*ForCausalLM``, a classifier's ``*ForSequenceClassification`` or a tagger's ``*ForTokenClassification``."""
    from .tasks.classify.hf import export_hf_classifier, is_classifier_dir
    from .tasks.tokens.files import is_tagger_dir

    if is_classifier_dir(model):
        return Path(export_hf_classifier(model, out_dir, dtype))
    if is_tagger_dir(model):
        from .tasks.tokens.hf import export_hf_tagger

        return Path(export_hf_tagger(model, out_dir, dtype))
    return Path(export_hf_dir(model, out_dir, dtype))


def _to_hf(args: argparse.Namespace) -> str:
    from .tasks.classify.files import resolve_model_dir
    from .tasks.classify.hf import is_classifier_dir

    require_kind(args.model, "scalelm convert --to-hf", HF_EXPORTABLE, hint=HF_EXPORT_HINTS)
    from .tasks.tokens.files import is_tagger_dir

    # -> *ForSequenceClassification / *ForTokenClassification
    classifier = is_classifier_dir(args.model) or is_tagger_dir(args.model)
    src = resolve_model_dir(args.model) if classifier else resolve_checkpoint(args.model)
    check_output_dir(args.to_hf, "Hugging Face model directory", is_hf_model_dir,
                     sources=[args.model, src], overwrite=args.overwrite, option="--to-hf")
    return str(export_to_hf(args.model, args.to_hf, DTYPES[args.dtype]))


def _to_peft(args: argparse.Namespace) -> str:
    from .checkpoint.kinds import CLASSIFIER, GPT, LORA, require_kind
    from .lora.peft_export import export_peft_dir, is_peft_dir

    require_kind(args.model, "scalelm convert --to-peft", (GPT, LORA), needs=LORA,
                 hint={LORA: "export a model with --to-hf",
                       CLASSIFIER: "its head trains too, which PEFT's adapter format does not hold: fold it into a "
                                   "model directory with `scalelm merge`, then export that with --to-hf"})
    check_output_dir(args.to_peft, "PEFT adapter directory", is_peft_dir,
                     sources=[args.model, resolve_checkpoint(args.model)], overwrite=args.overwrite,
                     option="--to-peft")
    return str(export_peft_dir(args.model, args.to_peft, DTYPES[args.dtype]))


def _download(spec: str):
    try:
        return download_hub_model(spec)
    except HubError as e:
        if spec.startswith("hf:"):
            raise
        raise HubError(f"{e} (nor is there a local folder '{spec}')") from None


def run_convert(args: argparse.Namespace) -> int:
    exports = [o for o in ("to_hf", "to_peft") if getattr(args, o)]
    if args.from_hf:
        if exports or args.model:
            raise ConversionError("use either --from-hf HF_DIR --out MODEL_DIR or MODEL --to-hf OUT_DIR")
        if not args.out:
            raise ConversionError("--from-hf needs --out MODEL_DIR (where the scalelm model directory goes)")
        hub = is_hub_model_id(args.from_hf)
        check_output_dir(args.out, "scalelm model directory", is_scalelm_model_dir,
                         sources=[] if hub else [args.from_hf], overwrite=args.overwrite)
        if hub:  # downloaded (or found in the cache), then converted as a local folder of safetensors
            src, source = _download(args.from_hf)
            out = str(import_hf_dir(src, args.out, DTYPES[args.dtype], source=source, safetensors_only=True))
        else:
            out = str(import_hf_dir(args.from_hf, args.out, DTYPES[args.dtype]))
    elif len(exports) > 1:
        raise ConversionError("give one of --to-hf OUT_DIR and --to-peft OUT_DIR per command")
    elif exports:
        flag = "--" + exports[0].replace("_", "-")
        if not args.model:
            raise ConversionError(f"{flag} OUT_DIR needs the model to export: scalelm convert MODEL {flag} OUT_DIR")
        out = _to_hf(args) if exports[0] == "to_hf" else _to_peft(args)
    else:
        raise ConversionError("nothing to do: give --from-hf HF_DIR --out MODEL_DIR, or MODEL --to-hf OUT_DIR")
    print(f"wrote {out}", file=sys.stderr)
    print(json.dumps({"out": out}))
    return 0
