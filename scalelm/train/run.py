"""``scalelm train`` and what every training command does around its ``Trainer``.

    scalelm train --preset baby --data data/shakespeare --out runs/baby [--section.key=value ...]

``open_run`` starts the process group, refuses a wrong ``--out``, locks RUN_DIR (one writer) and
finds the checkpoint to resume; ``report_run`` prints the JSON summary. ``finetune``, ``distill``
and ``train`` all go through them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from ..config import Config
from ..distributed.mesh import ParallelContext, destroy_parallel, init_parallel
from ..errors import UserError
from ..fileio import json_safe
from . import state as ts
from .trainer import Trainer


def add_train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML config file (same keys as the dotted overrides)")
    p.add_argument("--preset", help="a named preset (see `scalelm presets`), or auto: the shape, batch, lr and "
                   "regularization for --train.max_minutes on this data and machine (scalelm/train/auto.py)")
    p.add_argument("--data", help="a DATA_DIR written by `scalelm prepare` (or data.path in the config)")
    p.add_argument("--out", required=True, help="the run directory (checkpoints, metrics.jsonl, best/)")
    p.add_argument("--resume", help="resume from this checkpoint or RUN_DIR instead of --out's latest")
    p.add_argument("--init-from", help="start a new run from the weights of this model directory")
    p.epilog = "Any config field is an override: --optim.lr=1e-3 --train.max_steps=2000 ..."
    p.set_defaults(accepts_overrides=True)


def vocab_is_explicit(args: argparse.Namespace) -> bool:
    """Did the user set model.vocab_size (a file or an override)? Otherwise it follows the data."""
    if any(a.lstrip("-").replace("-", "_").startswith("model.vocab_size") for a in args.overrides):
        return True
    if args.config:
        import tomllib

        try:
            return "vocab_size" in tomllib.loads(Path(args.config).read_text()).get("model", {})
        except (OSError, tomllib.TOMLDecodeError):
            return False  # resolve() reports the problem
    return False


def lock_run_dir(run_dir: Path, ctx: ParallelContext, command: str):
    """One writer per run directory: the main rank holds ``RUN_DIR/.lock`` for the whole run; under
    torchrun every rank learns whether it got it (so no rank waits on a barrier that never comes)."""
    from ..runs import RunDirLocked, RunLock

    lock, error = None, ""
    if ctx.is_main:
        try:
            lock = RunLock(run_dir, command).acquire()
        except RunDirLocked as e:
            error = str(e)
    if ctx.distributed:
        msg = [error]
        dist.broadcast_object_list(msg, src=0)
        error = msg[0]
    if error:
        raise RunDirLocked(error)
    return lock


@contextlib.contextmanager
def open_run(out: Path, cfg: Config, data, saved: Optional[Config], command: str = "train"):
    """What every training command does around its ``Trainer``: start the process group, refuse a
    wrong ``--out``, lock RUN_DIR (one writer), clean it and find the checkpoint to resume.
    Yields ``(ctx, resume_from)``; the lock and the process group are released at the end."""
    ctx = init_parallel(cfg)
    lock = None
    try:
        ts.prepare_run_dir(out, cfg, data, saved, write=False)  # refuse a wrong --out before locking it
        lock = lock_run_dir(out, ctx, command)
        resume_from = ts.prepare_run_dir(out, cfg, data, saved, write=ctx.is_main)
        ctx.barrier()
        yield ctx, resume_from
    finally:
        if lock is not None:
            lock.release()
        destroy_parallel(ctx)


def report_run(trainer: Trainer, summary: dict) -> int:
    """Print the run's JSON summary (main rank); the exit code (128 + signal when stopped by one)."""
    if trainer.is_main:
        print(json.dumps(json_safe(summary), allow_nan=False))  # a diverged run's NaN loss prints as null
    return 128 + trainer._signal if trainer._signal else 0


def run_train(args: argparse.Namespace) -> int:
    from ..config import resolve
    from ..data.loader import TokenData
    from ..model.io import load_model_dir
    from ..runs import resolve_checkpoint

    out = Path(args.out)
    saved = ts.read_run_config(out)
    auto = args.preset == "auto"
    if auto and saved is not None:  # resuming an auto run: its choice is in its recorded config
        print(f"auto: resuming with the recipe recorded in {out}", file=sys.stderr)
    base = saved if saved is not None and (auto or not (args.preset or args.config)) else None
    cfg = resolve(preset=None if auto else args.preset, config_file=args.config, overrides=args.overrides, base=base)
    if args.data:
        cfg.data.path = args.data
    if args.resume:
        cfg.checkpoint.resume = args.resume
    if not cfg.data.path:
        raise UserError("no training data: pass --data DATA_DIR (made by `scalelm prepare`)")
    data = TokenData(cfg.data.path)
    if base is None and not vocab_is_explicit(args):
        cfg.model.vocab_size = data.vocab_size
    cfg.validate()
    record = None
    if auto and saved is None:
        from .auto import choose

        cfg, record = choose(cfg, data, args.overrides)
    with open_run(out, cfg, data, saved, "train") as (ctx, resume_from):
        if record is not None and ctx.is_main:
            from ..fileio import atomic_write_text

            atomic_write_text(out / "auto.json", json.dumps(json_safe(record), indent=2) + "\n")
        model = base_dir = None
        if args.init_from:
            if resume_from is not None:
                raise UserError(f"{out} already holds a run to resume; --init-from starts a new one: "
                                f"use another --out")
            src = base_dir = resolve_checkpoint(args.init_from)
            ts.check_model_config(src, cfg.model)
            ts.check_tokenizer(src, data.dir)
            model = load_model_dir(src, allow_quantized=False)
        if cfg.lora.r > 0 or resume_from is not None:  # a LoRA run resumes on its recorded base (hash checked)
            from ..lora import lora_base_dir

            base_dir = lora_base_dir(cfg.lora, resume_from, base_dir)
            if resume_from is not None and base_dir is not None:
                model = load_model_dir(base_dir, allow_quantized=False)
        trainer = Trainer(cfg, data, out, ctx=ctx, model=model, resume_from=resume_from, base_dir=base_dir)
        if trainer.is_main:
            ts.write_run_config(out, cfg, data)
        summary = trainer.fit()
    return report_run(trainer, summary)
