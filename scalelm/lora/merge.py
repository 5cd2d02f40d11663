"""``scalelm merge RUN --out MODEL_DIR``: fold a LoRA run's adapters into a plain model directory.

The result needs neither the base directory nor this package: ``model.safetensors`` holds the
base with ``W += alpha / r * B @ A`` folded in. A classifier's head (the trained tensors outside
the GPT) goes to ``head.safetensors`` (keys without ``head.``) and its ``"task"`` entry is kept, so
the classification loader reads the result as a full fine-tune.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..cliargs import add_model_arg, add_overwrite_arg
from ..checkpoint import staged_dir
from ..checkpoint.adapters import lora_entry, read_adapters
from ..checkpoint.head import write_head
from ..checkpoint.kinds import CLASSIFIER, ENCDEC, GPT, LORA, require_kind
from ..checkpoint.model_dir import read_config, read_tokenizer_json, write_model_files
from ..checkpoint.names import CONFIG
from ..errors import CheckpointError, UserError
from ..model.io import load_model_dir
from ..runs import check_output_dir, is_scalelm_model_dir, resolve_checkpoint

_DROP = ("format", "model", "lora", "sharded", "world_size", "layout")  # what the merged dir does not inherit


def merge_dir(src: str | Path, out_dir: str | Path) -> Path:
    """LoRA checkpoint or RUN_DIR (its latest; ``RUN_DIR/best`` for the best) -> model directory."""
    ckpt = resolve_checkpoint(src)
    entry = lora_entry(ckpt)
    if entry is None:
        raise CheckpointError(f"{ckpt} holds no LoRA adapters (its {CONFIG} has no lora entry): it is a model "
                              f"directory already")
    model = load_model_dir(ckpt)  # the base (hash checked) with the adapters folded in
    prefix = str(entry.get("prefix", ""))
    head = {}
    if prefix:  # trained tensors outside the GPT: a task head
        _, tensors = read_adapters(ckpt, verify=False)
        head = {(k.removeprefix("head.")): v for k, v in tensors.items()
                if not k.startswith(prefix)}
    meta = read_config(ckpt)
    extra = {k: v for k, v in meta.items() if k not in _DROP}
    extra["merged_from"] = {"lora": str(ckpt.resolve()), "base": entry.get("base"),
                            "base_sha256": entry.get("base_sha256"), "r": entry.get("r"),
                            "alpha": entry.get("alpha"), "targets": entry.get("targets")}
    out = Path(out_dir)
    with staged_dir(out) as d:  # replaces an earlier model directory (check_output_dir allowed it)
        write_model_files(d, dataclasses.asdict(model.cfg), model.state_dict(), read_tokenizer_json(ckpt), extra)
        if head:
            write_head(d, head)
    return out


def add_merge_parser(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, help="a LoRA run directory (its latest checkpoint), RUN_DIR/best or RUN_DIR/ckpt-N")
    p.add_argument("--out", required=True, help="the model directory to write")
    add_overwrite_arg(p, "model directory")


def run_merge(args: argparse.Namespace) -> int:
    src = resolve_checkpoint(args.model)
    require_kind(src, "scalelm merge", (GPT, LORA, CLASSIFIER, ENCDEC), needs=LORA,
                 hint={LORA: "it holds no LoRA adapters (it is a model directory already)"})
    entry = lora_entry(src) or {}
    base = entry.get("base")  # the model the adapters were trained on: the run needs it to load and resume
    if base and Path(args.out).resolve() == Path(base).resolve():
        raise UserError(f"--out {args.out} is the base model {src} was trained on: replacing it would leave the "
                        f"LoRA run unable to load or resume; choose another directory (nothing was touched)")
    check_output_dir(args.out, "scalelm model directory", is_scalelm_model_dir,
                     sources=[args.model, src, *([base] if base else [])], overwrite=args.overwrite)
    out = merge_dir(src, args.out)
    print(f"wrote {out}", file=sys.stderr)
    print(json.dumps({"out": str(out), "from": str(src)}))
    return 0
