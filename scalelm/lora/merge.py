"""``scalelm merge RUN --out MODEL_DIR``: fold a LoRA run's adapters into a plain model directory.

The result needs neither the base directory nor this package: ``model.safetensors`` holds the
base with ``W += alpha / r * B @ A`` folded in. A classifier's head (the trained tensors outside
the GPT) goes to ``head.safetensors`` (keys without ``head.``) and its ``"task"`` entry is kept, so
the classification loader reads the result as a full fine-tune.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..errors import CheckpointError
from ..fileio import publish_dir
from ..model.adapters import lora_entry
from ..model.io import (
    load_model_dir,
    read_adapters,
    read_tokenizer_json,
    save_model_dir,
)
from ..model.manifest import write_manifest
from ..runs import CONFIG, check_output_dir, is_scalelm_model_dir, resolve_checkpoint

HEAD = "head.safetensors"
_DROP = ("format", "model", "lora", "sharded", "world_size", "layout")  # what the merged dir does not inherit


def merge_dir(src: str | Path, out_dir: str | Path) -> Path:
    """LoRA checkpoint or RUN_DIR (its latest; ``RUN_DIR/best`` for the best) -> model directory."""
    from safetensors.torch import save_file

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
    meta = json.loads((ckpt / CONFIG).read_text())
    extra = {k: v for k, v in meta.items() if k not in _DROP}
    extra["merged_from"] = {"lora": str(ckpt.resolve()), "base": entry.get("base"),
                            "base_sha256": entry.get("base_sha256"), "r": entry.get("r"),
                            "alpha": entry.get("alpha"), "targets": entry.get("targets")}
    out = Path(out_dir)
    staging = out.parent / f".{out.name}.merge"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_model_dir(model, staging, read_tokenizer_json(ckpt), extra=extra, manifest=False)
        if head:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(staging / HEAD),
                      metadata={"format": "pt"})
        write_manifest(staging)
        publish_dir(staging, out)  # replaces an earlier model directory (check_output_dir allowed it)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def add_merge_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="RUN", help="a LoRA run (its latest checkpoint), RUN/best or RUN/ckpt-N")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds an earlier model directory (never a run or another folder)")


def run_merge(args: argparse.Namespace) -> int:
    src = resolve_checkpoint(args.ckpt)
    check_output_dir(args.out, "scalelm model directory", is_scalelm_model_dir, sources=[args.ckpt, src],
                     overwrite=args.overwrite)
    out = merge_dir(src, args.out)
    print(f"wrote {out}", file=sys.stderr)
    print(json.dumps({"out": str(out), "from": str(src)}))
    return 0
