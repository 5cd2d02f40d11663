"""torchrun (or plain python) worker: save a checkpoint under one layout, resume under another.

Usage: reshard.py save|load CKPT_DIR STYLE key=value,...   (ParallelConfig fields)
``save`` trains 2 steps, writes CKPT_DIR (sharded under torchrun, the single-process trainer
format without it), trains 2 more and reports those losses; ``load`` resumes from CKPT_DIR and
reports the losses of the same 2 steps. fp64 throughout.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import main_guard, make_cfg, report, setup, train_steps  # noqa: E402

from scalelm.distributed.dcp import is_sharded_checkpoint
from scalelm.train.sharded_state import (load_full_training_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint)


def main():
    mode, ckpt, style = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    opts = dict(kv.split("=") for kv in filter(None, (sys.argv[4] if len(sys.argv) > 4 else "").split(",")))
    opts = {k: int(v) if v.lstrip("-").isdigit() else {"true": True, "false": False}.get(v, v) for k, v in opts.items()}
    torch.set_default_dtype(torch.float64)
    cfg = make_cfg(style, **opts)
    ctx, model, opt, loader, accum = setup(cfg)
    if mode == "save":
        train_steps(model, opt, loader, ctx, 2, accum)
        state = {"loader": loader.state_dict(), "world_size": ctx.world_size}
        if ctx.distributed:
            save_sharded_checkpoint(ckpt.parent, 2, model, opt, None, state, ctx)
        else:  # the single-process trainer's format
            from scalelm.train import state as ts

            ts.save_checkpoint(ckpt.parent, 2, model, opt, None, state)
    else:
        if is_sharded_checkpoint(ckpt):
            state = load_sharded_checkpoint(ckpt, model, opt, ctx)
        else:
            state = load_full_training_checkpoint(ckpt, model, opt)
        loader.load_state_dict(state["loader"])
    losses = train_steps(model, opt, loader, ctx, 2, accum)
    report(mode=mode, layout=ctx.layout.describe(), world=ctx.world_size, losses=losses)


if __name__ == "__main__":
    main_guard(main)
