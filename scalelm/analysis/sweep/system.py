"""Scaling of the system: data-parallel throughput of one model size against the number of processes.

One mid-size model of the sweep trains ``DP_STEPS`` steps in each configuration, with the same
global batch and the same micro-batch shape (so only the parallelism changes): on a CPU,
1 process x 1 thread, P processes x 1 thread under ``torchrun`` (DDP) for P = 2, 4 up to the
cores, and 1 process x P threads (the same cores in one process); on GPUs, 1 GPU against all
of them. Throughput is the median of the run's ``metrics.jsonl`` intervals.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ...errors import UserError
from .calibrate import DP_STEPS, dp_configs
from .runner import (
    SYSTEM,
    SweepLock,
    append_jsonl,
    base_config,
    metrics_stats,
    read_jsonl,
    run_overrides,
    run_process,
)


def dp_check(plan: dict, out: Path, lock: SweepLock, verbose: bool = False) -> None:
    import torch

    from ...precision import pick_device

    device = pick_device(base_config(plan["recipe"]["overrides"]).train.device)
    configs = dp_configs(device.type, torch.cuda.device_count() if device.type == "cuda" else 0)
    if not configs:
        print("system: one device and one core: no data-parallel configuration to compare", file=sys.stderr)
        return
    runs = sorted(plan["runs"], key=lambda r: r["params"])
    member = runs[len(runs) // 2]
    have = {r.get("config") for r in read_jsonl(out / SYSTEM)}
    rec = plan["recipe"]
    p_max = max(p for _, p, _ in configs)
    glob = -(-rec["micro_batch"] * rec["accum"] // p_max) * p_max
    micro = glob // p_max  # every configuration runs micro-batches of this shape
    run = dict(member, steps=DP_STEPS, warmup=5)
    for name, procs, threads in configs:
        if name in have:
            continue
        run_dir = out / "system" / f"dp-{name}"
        # later overrides win: the same micro-batch shape everywhere, no evaluation
        args = run_overrides(plan, run) + [f"--train.micro_batch_size={micro}", f"--train.global_batch_size={glob}",
                                           "--train.eval_every=0", f"--train.save_every={DP_STEPS}"]
        train = ["-m", "scalelm", "train", "--data", plan["data"]["path"], "--out", str(run_dir), *args]
        if procs == 1:
            cmd = [sys.executable, *train]
        else:  # plain data parallelism (DDP: replicated weights), not FSDP's sharding
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *train,
                   f"--parallel.dp_replicate={procs}", "--parallel.dp_shard=1", "--parallel.tp=1", "--parallel.pp=1"]
        how = f"{procs} GPU{'s' if procs > 1 else ''}" if threads is None else \
            f"{procs} process{'es' if procs > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        print(f"system: data-parallel check, {how}, {member['n_layer']}x{member['width']}, global batch {glob}",
              file=sys.stderr, flush=True)
        env = {"OMP_NUM_THREADS": str(threads)} if threads else None
        rc, _, wall = run_process(cmd, lock, out / "logs" / f"dp-{name}.log", verbose, env=env)
        if rc >= 128 or rc < 0:
            raise UserError("the data-parallel check was interrupted: rerun the same command to finish it")
        stats = metrics_stats(run_dir) if rc == 0 else {}
        row = {"check": "data_parallel", "config": name, "processes": procs, "threads": threads,
               "device": device.type, "shape": f"{member['n_layer']}x{member['width']}", "params": member["params"],
               "global_batch": glob, "micro_batch": micro, "seq_len": rec["seq_len"], "steps": DP_STEPS,
               "wall_seconds": round(wall, 2), "loadavg_1m": os.getloadavg()[0], **stats}
        if rc != 0 or not stats.get("tokens_per_s"):
            row["error"] = (out / "logs" / f"dp-{name}.log").read_text(errors="replace")[-800:]
            print(f"  failed (exit {rc}): see {out / 'logs' / f'dp-{name}.log'}", file=sys.stderr)
        else:
            print(f"  {stats['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
        append_jsonl(out / SYSTEM, row)


def dp_efficiency(rows: list[dict]) -> list[dict]:
    """Per multi-process configuration: tokens/s over P x one process's, and over one process on the same cores."""
    tps = {(r["processes"], r.get("threads")): r["tokens_per_s"] for r in rows
           if r.get("check") == "data_parallel" and r.get("processes") and r.get("tokens_per_s") and not r.get("error")}
    out = []
    for (p, t), v in sorted(tps.items(), key=lambda kv: kv[0][0]):
        if p == 1:
            continue
        row = {"processes": p, "threads": t, "tokens_per_s": v}
        base = tps.get((1, t))
        if base:
            row["per_process"] = v / (p * base)
        same = tps.get((1, p * t)) if t else None
        if same:
            row["same_cores"] = v / same
        out.append(row)
    return out
