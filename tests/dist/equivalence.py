"""torchrun worker: train K steps under several layouts, compare with one process.

Usage: torchrun --nproc_per_node=N tests/dist/equivalence.py CHECK [CHECK ...]
CHECK = name:style:dtype:key=value,key=value  (keys are ParallelConfig fields, train.* and lora.*)
Rank 0 prints one ``RESULT {json}`` line per check: max parameter and loss differences.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import main_guard, make_cfg, max_param_diff, reference, report, setup, train_steps  # noqa: E402

STEPS = 3


def parse(spec: str):
    name, style, dtype, kv = (spec.split(":") + [""])[:4]
    opts = {}
    for item in filter(None, kv.split(",")):
        k, v = item.split("=")
        opts[k] = int(v) if v.lstrip("-").isdigit() else {"true": True, "false": False}.get(v, v)
    return name, style, dtype, opts


def run_check(spec: str) -> None:
    name, style, dtype, opts = parse(spec)
    torch.set_default_dtype(torch.float64 if dtype == "fp64" else torch.float32)
    train_opts = {k[6:]: opts.pop(k) for k in list(opts) if k.startswith("train.")}
    lora_opts = {k[5:]: opts.pop(k) for k in list(opts) if k.startswith("lora.")}
    cfg = make_cfg(style, **opts)
    for k, v in train_opts.items():
        setattr(cfg.train, k, v)
    for k, v in lora_opts.items():  # lora.targets=q;v -> "q,v" (commas separate the check's keys)
        setattr(cfg.lora, k, v.replace(";", ",") if isinstance(v, str) else v)
    t0 = time.perf_counter()
    ctx, model, opt, loader, accum = setup(cfg)
    losses = train_steps(model, opt, loader, ctx, STEPS, accum)
    ref, ref_losses = reference(cfg, STEPS)
    report(check=name, world=ctx.world_size, layout=ctx.layout.describe(), dtype=dtype,
           param_diff=max_param_diff(model, ref), loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)),
           losses=losses, seconds=round(time.perf_counter() - t0, 2))


def main():
    for spec in sys.argv[1:]:
        run_check(spec)


if __name__ == "__main__":
    main_guard(main)
