"""Data-parallel scaling on this machine, and communication bytes per training step per layout.

    python benchmarks/bench_scaling.py                 # all three parts (a few minutes on 2 cores)
    python benchmarks/bench_scaling.py --part scaling  # or: --part comm, --part ddp

Scaling: the same global batch (8 x 256 tokens, a 4-layer 256-wide GPT, fp32) trained by
1 process x 2 threads (2 micro-batches of 4, accumulated), by 2 processes x 1 thread (DDP, and
FSDP2, under ``torchrun``), and by 1 process x 1 thread. "vs 1x2 threads" = tokens/s of a run
over tokens/s of the 1-process 2-thread run (same two cores: 1.0 means communication cost
nothing); "per core" = tokens/s per core over the 1-thread run's (1.0 = perfect scaling). Each round runs the three in turn (ABBA order); we report medians of per-step
times (after warm-up steps) and the share of the cores other processes used meanwhile.

Communication: one training step of each layout under ``torch.profiler`` with
``record_shapes``; every ``gloo:*`` collective / point-to-point record's input tensor sizes
are summed per rank (measured, not estimated), then averaged over the ranks.

DDP: where the per-core loss goes. In one ``torchrun`` of 2 processes x 1 thread, fresh DDP
models with the same init are timed in turn (ABBA over the rounds): the default buckets, smaller
and larger ``bucket_cap_mb``, ``gradient_as_bucket_view``, and every step under ``no_sync`` (no communication: the
compute-only floor of this layout), plus one bare ``all_reduce`` of the gradients' size. A
1-process 1-thread run per round gives the per-core reference.

Prints tables; writes ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODEL = dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256, dropout=0.0)
GLOBAL_BATCH, MICRO = 8, 4
LAYOUTS_2 = {"ddp": dict(dp_replicate=2, dp_shard=1), "fsdp": {}, "tp": dict(tp=2),
             "tp+sp": dict(tp=2, sequence_parallel=True), "pp 1f1b": dict(pp=2)}
LAYOUTS_4 = {"fsdp": {}, "fsdp x tp": dict(tp=2), "hsdp": dict(dp_replicate=2, dp_shard=2),
             "pp x fsdp": dict(pp=2), "pp x tp": dict(pp=2, tp=2)}
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv", "all_to_all", "other")
DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
               "unsigned char": 1, "signed char": 1, "bool": 1}


# ----------------------------------------------------------------------------- worker side

def _setup(parallel: dict, threads: int):
    import numpy as np
    import torch

    from scalelm.config import Config, ModelConfig
    from scalelm.data import BatchLoader
    from scalelm.distributed import init_parallel, parallelize
    from scalelm.model import GPT
    from scalelm.train.optim import build_optimizer

    torch.set_num_threads(threads)
    cfg = Config()
    cfg.model = ModelConfig(**MODEL)
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    ctx = init_parallel(cfg)
    torch.manual_seed(0)
    model = parallelize(GPT(cfg.model), cfg, ctx)
    opt = build_optimizer(model, cfg.optim)
    micro = min(MICRO, GLOBAL_BATCH // ctx.dp_world)
    accum = GLOBAL_BATCH // (micro * ctx.dp_world)
    tokens = np.random.default_rng(0).integers(0, MODEL["vocab_size"], 2_000_000).astype(np.uint16)
    loader = BatchLoader(tokens, micro, MODEL["block_size"], accum, dp_rank=ctx.dp_rank, dp_world=ctx.dp_world)
    return ctx, model, opt, loader, accum


def _step(ctx, model, opt, loader, accum) -> None:
    from scalelm.distributed import clip_grad_norm, grad_sync

    if hasattr(model, "forward_backward"):
        model.forward_backward([loader.next_batch() for _ in range(accum)])
    else:
        for m in range(accum):
            x, y = loader.next_batch()
            with grad_sync(model, enabled=m == accum - 1):
                (model(x, y)[1] / accum).backward()
    clip_grad_norm(model, 1.0, ctx)
    opt.step()
    opt.zero_grad(set_to_none=True)


def worker_time(parallel: dict, threads: int, steps: int, warmup: int) -> None:
    import torch.distributed as dist

    from scalelm.distributed import destroy_parallel

    ctx, model, opt, loader, accum = _setup(parallel, threads)
    times = []
    for i in range(warmup + steps):
        if ctx.distributed:
            dist.barrier()
        t = time.perf_counter()
        _step(ctx, model, opt, loader, accum)
        if ctx.distributed:
            dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    if ctx.is_main:
        print("RESULT " + json.dumps({"step_s": times}), flush=True)
    destroy_parallel(ctx)


def worker_comm(parallel: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from scalelm.distributed import destroy_parallel

    ctx, model, opt, loader, accum = _setup(parallel, 1)
    _step(ctx, model, opt, loader, accum)  # warm-up: lazy pipeline shape inference, optimizer state
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _step(ctx, model, opt, loader, accum)
    kinds: dict[str, float] = {}
    for e in prof.events():
        if not e.name.startswith("gloo:"):
            continue
        nbytes = 0
        for dims, dtype in zip(e.input_shapes or [], e.input_dtypes or []):
            if dims and dtype in DTYPE_BYTES:
                n = 1
                for d in dims:
                    n *= d
                nbytes += n * DTYPE_BYTES[dtype]
        kind = e.name[5:] if e.name[5:] in KINDS else "other"
        kinds[kind] = kinds.get(kind, 0) + nbytes
    t = torch.tensor([kinds.get(k, 0.0) for k in KINDS], dtype=torch.float64)
    dist.all_reduce(t)  # ranks differ (pipeline stages): report the mean over ranks
    if ctx.is_main:
        n_params = sum(p.numel() for p in __import__("scalelm.model", fromlist=["GPT"]).GPT(
            __import__("scalelm.config", fromlist=["ModelConfig"]).ModelConfig(**MODEL)).parameters())
        print("RESULT " + json.dumps({"bytes_per_rank": dict(zip(KINDS, (t / ctx.world_size).tolist())),
                                      "layout": ctx.layout.describe(), "param_bytes": 4 * n_params}), flush=True)
    destroy_parallel(ctx)


DDP_VARIANTS = {"default (25 MB buckets)": {}, "1 MB buckets": dict(bucket_cap_mb=1),
                "4 MB buckets": dict(bucket_cap_mb=4), "64 MB buckets": dict(bucket_cap_mb=64),
                "gradient_as_bucket_view": dict(gradient_as_bucket_view=True),
                "no_sync: no communication": dict(no_sync=True)}  # (DDP's bf16 compression hook needs NCCL)


def worker_ddp(steps: int, warmup: int, rounds: int) -> None:
    """Each DDP variant on a fresh model (same init), in turn; then a bare all_reduce of the grads' size."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from scalelm.config import ModelConfig, OptimConfig
    from scalelm.distributed import destroy_parallel
    from scalelm.model import GPT
    from scalelm.train.optim import build_optimizer

    ctx, _, _, loader, accum = _setup(dict(dp_replicate=2, dp_shard=1), 1)
    cfg_model, cfg_optim = ModelConfig(**MODEL), OptimConfig()

    def build(v: dict):
        torch.manual_seed(0)
        kw = {k: x for k, x in v.items() if k != "no_sync"}
        model = DDP(GPT(cfg_model), process_group=ctx.group("dp_replicate"), **kw)
        return model, build_optimizer(model, cfg_optim)

    def time_variant(v: dict) -> float:
        model, opt = build(v)
        times = []
        for i in range(warmup + steps):
            dist.barrier()
            t = time.perf_counter()
            if v.get("no_sync"):
                with model.no_sync():
                    _step(ctx, model, opt, loader, accum)
            else:
                _step(ctx, model, opt, loader, accum)
            dist.barrier()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    out = {k: [] for k in DDP_VARIANTS}
    for r in range(rounds):
        for name in (list(DDP_VARIANTS) if r % 2 == 0 else list(DDP_VARIANTS)[::-1]):
            out[name].append(time_variant(DDP_VARIANTS[name]))
    n = sum(p.numel() for p in GPT(cfg_model).parameters())
    buf, ar = torch.zeros(n), []
    for i in range(warmup + steps):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(buf)
        if i >= warmup:
            ar.append(time.perf_counter() - t)
    if ctx.is_main:
        print("RESULT " + json.dumps({"step_s": out, "all_reduce_s": statistics.median(ar), "grad_bytes": 4 * n}),
              flush=True)
    destroy_parallel(ctx)


# ----------------------------------------------------------------------------- driver side

def launch(nproc: int, args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    script = [str(Path(__file__).resolve()), *args]
    cmd = ([sys.executable, *script] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script])
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-4000:]}")
    return json.loads(next(line[7:] for line in p.stdout.splitlines() if line.startswith("RESULT ")))


def scaling(rounds: int, steps: int, warmup: int) -> dict:
    from _util import log, wait_quiet

    from scalelm.hardware import LoadMeter

    runs = {"1 proc x 2 threads": (1, {}, 2), "1 proc x 1 thread": (1, {}, 1),
            "2 procs x 1 thread, DDP": (2, LAYOUTS_2["ddp"], 1), "2 procs x 1 thread, FSDP2": (2, LAYOUTS_2["fsdp"], 1)}
    out = {k: dict(step_medians=[], loads=[]) for k in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            nproc, layout, threads = runs[name]
            wait_quiet(max_wait=30)  # the 2-thread run collapses when another process takes a core
            with LoadMeter() as lm:
                res = launch(nproc, ["--worker", "time", "--layout", json.dumps(layout), "--threads", str(threads),
                                     "--steps", str(steps), "--warmup", str(warmup)], threads)
            # others' share: the meter counts our children, so it is everyone else's use of the cores
            out[name]["step_medians"].append(statistics.median(res["step_s"]))
            out[name]["loads"].append(round(lm.other, 3))
            log(f"  round {r + 1} {name}: {statistics.median(res['step_s']) * 1e3:.0f} ms/step "
                f"(others used {lm.other:.0%} of the cores)")
    tokens = GLOBAL_BATCH * MODEL["block_size"]
    base = out["1 proc x 2 threads"]["step_medians"]
    one = out["1 proc x 1 thread"]["step_medians"]
    for name, v in out.items():
        v["median_step_s"] = statistics.median(v["step_medians"])
        v["tokens_per_s"] = tokens / v["median_step_s"]
        v["efficiency_vs_1proc"] = statistics.median(b / s for b, s in zip(base, v["step_medians"]))
        # per core: the same work on 2 cores should take half the 1-core time
        cores = 1 if name == "1 proc x 1 thread" else 2
        v["efficiency_per_core"] = statistics.median(o / (cores * s) for o, s in zip(one, v["step_medians"]))
    return out


def ddp(rounds: int, steps: int, warmup: int) -> dict:
    from _util import log, wait_quiet

    from scalelm.hardware import LoadMeter

    one, loads = [], []
    for r in range(rounds):  # the 1-thread reference, once per round around the DDP launch
        wait_quiet(max_wait=30)
        one.append(statistics.median(launch(1, ["--worker", "time", "--threads", "1", "--steps", str(steps),
                                                 "--warmup", str(warmup)], 1)["step_s"]))
        log(f"  round {r + 1} 1 proc x 1 thread: {one[-1] * 1e3:.0f} ms/step")
    wait_quiet(max_wait=30)
    with LoadMeter() as lm:
        res = launch(2, ["--worker", "ddp", "--rounds", str(rounds), "--steps", str(steps), "--warmup", str(warmup)], 1)
    loads.append(round(lm.other, 3))
    t1 = statistics.median(one)
    rows = {name: dict(median_step_s=statistics.median(v), step_medians=v,
                       efficiency_per_core=t1 / (2 * statistics.median(v))) for name, v in res["step_s"].items()}
    return dict(one_thread_step_s=t1, variants=rows, all_reduce_s=res["all_reduce_s"], grad_bytes=res["grad_bytes"],
                others_load=loads)


def comm() -> dict:
    out = {}
    for nproc, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4)):
        for name, layout in layouts.items():
            res = launch(nproc, ["--worker", "comm", "--layout", json.dumps(layout)], 1)
            out[f"{nproc} procs: {name}"] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["all", "scaling", "comm", "ddp"], default="all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--worker", choices=["time", "comm", "ddp"], help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "time":
        return worker_time(json.loads(a.layout), a.threads, a.steps, a.warmup)
    if a.worker == "comm":
        return worker_comm(json.loads(a.layout))
    if a.worker == "ddp":
        return worker_ddp(a.steps, a.warmup, a.rounds)

    from _util import machine, write_json

    result = {"machine": machine(), "model": MODEL, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO,
              "loadavg_before": os.getloadavg()}
    if a.part in ("all", "scaling"):
        result["scaling"] = s = scaling(a.rounds, a.steps, a.warmup)
        print(f"\nData-parallel scaling, same global batch ({GLOBAL_BATCH} x {MODEL['block_size']} tokens), "
              f"medians of {a.rounds} rounds x {a.steps} steps")
        print(f"{'run':<28}{'ms/step':>9}{'tokens/s':>10}{'vs 1x2 threads':>16}{'per core':>10}{'others load':>13}")
        for name, v in s.items():
            print(f"{name:<28}{v['median_step_s'] * 1e3:>9.0f}{v['tokens_per_s']:>10.0f}"
                  f"{v['efficiency_vs_1proc']:>16.2f}{v['efficiency_per_core']:>10.2f}"
                  f"{statistics.median(v['loads']):>12.0%}")
    if a.part in ("all", "ddp"):
        result["ddp"] = d = ddp(a.rounds, a.steps, a.warmup)
        print(f"\nDDP, 2 processes x 1 thread: where the per-core loss goes (1 proc x 1 thread: "
              f"{d['one_thread_step_s'] * 1e3:.0f} ms/step; per core = that / (2 x ms/step))")
        print(f"{'variant':<30}{'ms/step':>9}{'per core':>10}")
        for name, v in d["variants"].items():
            print(f"{name:<30}{v['median_step_s'] * 1e3:>9.0f}{v['efficiency_per_core']:>10.2f}")
        print(f"bare all_reduce of the gradients ({d['grad_bytes'] / 1e6:.1f} MB fp32): {d['all_reduce_s'] * 1e3:.1f} ms")
    if a.part in ("all", "comm"):
        result["comm"] = c = comm()
        p = next(iter(c.values()))["param_bytes"]
        print(f"\nBytes handed to collectives per rank per optimizer step (measured with torch.profiler); "
              f"fp32 parameters = {p / 1e6:.2f} MB")
        print(f"{'layout':<22}{'total MB':>10}{'x params':>10}  by operation (MB)")
        for name, v in c.items():
            tot = sum(v["bytes_per_rank"].values())
            ops = ", ".join(f"{k} {b / 1e6:.2f}" for k, b in sorted(v["bytes_per_rank"].items()) if b)
            print(f"{name:<22}{tot / 1e6:>10.2f}{tot / p:>10.2f}  {ops}")
    result["loadavg_after"] = os.getloadavg()
    from _util import RESULTS

    old = RESULTS / "scaling.json"
    if a.part != "all" and old.is_file():  # keep the other part's last measurement
        prev = json.loads(old.read_text())
        result = {**prev, **result}
    path = write_json("scaling.json", result)
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
