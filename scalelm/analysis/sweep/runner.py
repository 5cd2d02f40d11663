"""Running a sweep's plan: one trainer subprocess per run, records, locking, resume, the DP check.

A killed sweep must neither lose work nor repeat it. Each trainer runs with
``PR_SET_PDEATHSIG=SIGTERM`` (Linux), so when the sweep dies its trainer saves a checkpoint and
exits; the sweep's lock (``flock`` on ``SWEEP_DIR/.lock``) is inherited by the trainer, so a
restarted sweep waits for that save before it touches the run again. A run counts as done only
once its record is in ``records.jsonl`` (rewritten atomically); the trainer's auto-resume
continues anything else from its latest checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ...checkpoint.names import CKPT_GLOB, LOCK
from ...config import ConfigError, resolve
from ...errors import UserError
from ...fileio import atomic_write_text
from ...runs import LOCK_HOLDER, RunLock
from .plan import (
    Family,
    GridSettings,
    PlanError,
    assign_schedule,
    auto_grid,
    check_token_counts,
    fixed_runs,
    human,
    parse_count,
    total_flops,
)

PLAN, RECORDS, SYSTEM, FAILURES = "plan.json", "records.jsonl", "system.jsonl", "failures.jsonl"  # + LOCK, as a run's

# the sweep's training recipe; any of these can be overridden (--model.block_size=128 ...)
DEFAULTS = {"model.block_size": 256, "model.dropout": 0.0, "train.micro_batch_size": 16, "train.eval_iters": 20,
            "checkpoint.keep_last": 1}
# chosen per run by the sweep: an override of these would break the grid
CONTROLLED = ("model.n_layer", "model.n_embd", "model.n_head", "model.n_kv_head", "model.intermediate_size",
              "model.n_shared_blocks", "train.max_steps", "train.eval_every", "train.max_minutes",
              "train.early_stop_patience", "checkpoint.resume", "data.path")


def override_keys(overrides: list[str]) -> set[str]:
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in overrides if a.startswith("--")}


def controlled_key_error(overrides: list[str]) -> None:
    bad = sorted(override_keys(overrides) & set(CONTROLLED))
    if bad:
        raise ConfigError(f"the sweep chooses {', '.join(bad)} for each run; drop "
                          f"{' '.join('--' + k for k in bad)} (shape the family with --aspect/--head-dim, "
                          f"the lengths with --tokens or the budget)")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_jsonl(path: Path, record: dict) -> None:
    """Rewrite the whole file atomically: a kill never leaves half a record."""
    rows = read_jsonl(path) + [record]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- planning

def base_config(overrides: list[str]):
    user = override_keys(overrides)
    args = [f"--{k}={v}" for k, v in DEFAULTS.items() if k not in user] + list(overrides)
    return resolve(overrides=args)


def make_plan(req: dict) -> dict:
    from ...data.loader import TokenData
    from ...train.trainer import batch_geometry

    if req["data"] is None:
        raise UserError("pass --data DATA_DIR (made by `scalelm prepare`)")
    minutes = req.get("minutes")
    if minutes is not None and not 0 < minutes < float("inf"):  # before any step is timed
        raise PlanError(f"--minutes must be a positive number of minutes, got {minutes}")
    data = TokenData(req["data"])
    cfg = base_config(req["overrides"])
    if "model.vocab_size" not in override_keys(req["overrides"]):
        cfg.model.vocab_size = data.vocab_size
    T = cfg.model.block_size
    data.check_window("train", T)
    data.check_window("val", T)
    B, accum = batch_geometry(cfg, 1)
    tokens_per_step = B * accum * T
    family = Family(cfg.model, req["aspect"], req["head_dim"])
    g = GridSettings(levels=req["levels"], per_level=req["per_level"], level_ratio=req["level_ratio"],
                     iso_fraction=req["iso_fraction"], fixed_sizes=req["fixed_sizes"],
                     fixed_lengths=req["fixed_lengths"], min_steps=req["min_steps"])
    _check_grid_settings(g)
    sizes = None if req["sizes"] == "auto" else [family.parse_size(s) for s in req["sizes"].split(",") if s.strip()]
    tokens = None if req["tokens"] == "auto" else [parse_count(t, "token count") for t in req["tokens"].split(",") if t.strip()]
    if tokens is not None:
        check_token_counts(tokens, tokens_per_step, g.min_steps)
    budget = parse_count(req["budget"], "--budget") if req["budget"] else None
    est_seconds, calibration = None, None
    if sizes and tokens:
        runs = fixed_runs(sizes, tokens, tokens_per_step, 1, group="grid")
        if budget is not None and total_flops(runs) > budget * 1.001:
            raise PlanError(f"the {len(sizes)} x {len(tokens)} grid needs {total_flops(runs):.3g} FLOPs, more than "
                            f"--budget {budget:.3g}: drop sizes or lengths, or raise the budget")
    elif req["minutes"] is not None:
        runs, est_seconds, calibration = _plan_minutes(req, family, cfg, B, accum, g, sizes, tokens)
    elif budget is not None:
        runs = auto_grid(family, budget, tokens_per_step, g, sizes, tokens)
    else:
        raise PlanError("give a budget: --budget FLOPS or --minutes M (or both --sizes and --tokens as lists)")
    user = override_keys(req["overrides"])
    assign_schedule(runs, cfg.optim.lr if "optim.lr" in user else None,
                    cfg.optim.warmup_steps if "optim.warmup_steps" in user else None)
    return {
        "format": "scalelm-sweep", "version": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "request": req,
        "data": {"path": str(data.dir.resolve()), "vocab_size": data.vocab_size,
                 "train_tokens": len(data.tokens("train")), "val_tokens": len(data.tokens("val")),
                 "tokenizer": data.meta["tokenizer"].get("kind"), "tokenizer_sha256": data.tokenizer_sha256},
        "family": family.to_dict(),
        "recipe": {"seq_len": T, "micro_batch": B, "accum": accum, "tokens_per_step": tokens_per_step,
                   "eval_iters": cfg.train.eval_iters, "precision": cfg.train.precision,
                   "lr": "fixed" if "optim.lr" in user else "kaplan", "overrides": req["overrides"]},
        "budget": {"flops": budget, "minutes": req["minutes"], "planned_flops": total_flops(runs),
                   "est_seconds": est_seconds, "calibration": calibration},
        "runs": [r.__dict__ for r in runs],
    }


def _plan_minutes(req: dict, family: Family, cfg, B: int, accum: int, g: GridSettings, sizes, tokens):
    """Runs whose predicted wall time (measured step times) fits ``--minutes``, less the DP check."""
    import torch

    from .calibrate import StepTimer, dp_check_seconds, plan_for_seconds

    def probe_cmd(m, steps: int, run_dir: Path) -> list[str]:
        plan = {"recipe": {"overrides": req["overrides"]}, "data": {"vocab_size": cfg.model.vocab_size}}
        run = {"steps": steps, "lr": 1e-3, "warmup": 1, "n_layer": m.n_layer, "width": m.width, "n_head": m.n_head}
        return [sys.executable, "-m", "scalelm", "train", "--data", req["data"], "--out", str(run_dir),
                *run_overrides(plan, run), "--log.progress=false"]

    timer = StepTimer(family, cfg, B, accum, probe_cmd=probe_cmd)
    prev = torch.get_num_threads()
    if req.get("threads"):  # time the steps with the threads the runs will have
        torch.set_num_threads(req["threads"])
    try:
        reserve = dp_check_seconds(family, timer) if req["dp_check"] else 0.0
        seconds = 60 * req["minutes"] - reserve
        if seconds <= 0:
            raise PlanError(f"the data-parallel check alone needs ~{reserve / 60:.1f} minutes on this machine now: "
                            f"give more --minutes, or add --no-dp-check")
        runs, est = plan_for_seconds(family, seconds, B * accum * family.base.block_size, g, timer, sizes, tokens)
    finally:
        torch.set_num_threads(prev)
    calibration = {"step_seconds": {f"{layers}x{w}": t for (w, layers), t in timer.cache.items()},
                   "startup_seconds": timer.startup_seconds(), "dp_check_seconds": reserve,
                   "threads": req.get("threads") or prev,
                   "loadavg_1m": os.getloadavg()[0]}
    return runs, est, calibration


def _check_grid_settings(g: GridSettings) -> None:
    if g.levels < 1 or g.per_level < 1 or g.min_steps < 1 or g.fixed_sizes < 0 or g.fixed_lengths < 0:
        raise PlanError("--levels, --per-level and --min-steps must be positive (--fixed-* may be 0)")
    if g.level_ratio <= 1:
        raise PlanError("--level-ratio must be above 1")
    if not 0 < g.iso_fraction <= 1:
        raise PlanError("--iso-fraction must be in (0, 1]")


# ----------------------------------------------------------------------------- locking, processes

class SweepLock:
    """An exclusive ``flock`` on ``SWEEP_DIR/.lock``, shared with the trainer subprocesses."""

    def __init__(self, out: Path, wait_s: float = 300.0):
        self.out, self.wait_s, self.fd = Path(out), wait_s, -1

    def __enter__(self) -> "SweepLock":
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file: choose a directory")
        self.out.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, said = time.monotonic() + self.wait_s, False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                (self.out / LOCK_HOLDER).write_text(json.dumps({"pid": os.getpid(), "command": "sweep"}) + "\n")
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    holder = RunLock(self.out).holder()
                    who = f" (process {holder['pid']})" if "pid" in holder else ""
                    raise UserError(f"{self.out} is in use by another sweep{who} (or a trainer it started) for "
                                    f"more than {self.wait_s:.0f} s: wait for it to finish, or stop it") from None
                if not said:
                    print(f"waiting for another sweep (or the trainer of a killed one) to release {self.out} ...",
                          file=sys.stderr)
                    said = True
                time.sleep(0.25)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _child_setup(parent: int):
    def setup():
        if sys.platform.startswith("linux"):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the trainer saves and stops if the sweep dies
            if os.getppid() != parent:  # the sweep died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
    return setup


def run_process(cmd: list[str], lock: SweepLock, log_path: Path, verbose: bool,
                env: Optional[dict] = None) -> tuple[int, str, float]:
    """Run ``cmd`` holding the sweep's lock; returns (exit code, what it wrote to the log, wall seconds).

    Both streams go to the log file, not to pipes: a trainer whose sweep was killed must still
    be able to print its last words after it saved.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    e = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {}))
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        start = log.tell()
        proc = subprocess.Popen(cmd, stdout=log, stderr=None if verbose else log, env=e,
                                pass_fds=(lock.fd,), preexec_fn=_child_setup(os.getpid()))
        prev = signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(signal.SIGTERM))
        try:
            proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the trainer too: let it save, then stop the sweep
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, prev)
    with open(log_path, "rb") as log:
        log.seek(start)
        text = log.read().decode(errors="replace")
    return proc.returncode, text, time.perf_counter() - t0


def _last_json(text: str) -> Optional[dict]:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def run_overrides(plan: dict, run: dict) -> list[str]:
    user_list = plan["recipe"]["overrides"]
    user = override_keys(user_list)
    args = [f"--{k}={v}" for k, v in DEFAULTS.items() if k not in user] + list(user_list)
    steps = run["steps"]
    per_run = {"optim.lr": run["lr"], "optim.min_lr": run["lr"] / 10, "optim.warmup_steps": run["warmup"],
               "train.log_every": max(1, steps // 20), "train.save_every": max(1, -(-steps // 5)),
               "model.vocab_size": plan["data"]["vocab_size"]}
    args += [f"--{k}={v}" for k, v in per_run.items() if k not in user]
    args += [f"--model.n_layer={run['n_layer']}", f"--model.n_embd={run['width']}", f"--model.n_head={run['n_head']}",
             f"--train.max_steps={steps}", f"--train.eval_every={steps}"]
    return args


# ----------------------------------------------------------------------------- runs and records

def metrics_stats(run_dir: Path) -> dict:
    from ...train.metrics import read_metrics

    try:
        recs = [r for r in read_metrics(run_dir) if r.get("tokens_per_s")]
    except UserError:
        return {}
    steady = recs[1:] or recs  # the first interval holds warm-up
    med = lambda k: statistics.median([r[k] for r in steady if r.get(k) is not None]) if any(
        r.get(k) is not None for r in steady) else None
    return {"tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"),
            "peak_mem_mb": max((r["peak_mem_mb"] for r in recs if r.get("peak_mem_mb")), default=None)}


def make_record(plan: dict, run: dict, summary: dict, run_dir: Path, wall: float) -> dict:
    keys = ("name", "width", "n_layer", "n_head", "params", "params_total", "flops_per_token", "steps", "tokens",
            "flops", "groups", "lr")
    rec = {k: run[k] for k in keys}
    rec.update(val_loss=summary.get("val_loss"), val_bits_per_byte=summary.get("val_bits_per_byte"),
               initial_val_loss=summary.get("initial_val_loss"), train_loss=summary.get("train_loss"),
               stopped=summary.get("stopped"), trained_steps=summary.get("step"),
               train_seconds=summary.get("elapsed_s"), wall_seconds=round(wall, 2),
               precision=summary.get("precision"), epochs=run["tokens"] / plan["data"]["train_tokens"],
               loadavg_1m=summary.get("loadavg_1m"), threads=summary.get("threads"),
               finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    rec.update(metrics_stats(run_dir))
    return rec


def run_all(plan: dict, out: Path, lock: SweepLock, verbose: bool = False, threads: Optional[int] = None) -> list[str]:
    """Train every run without a record, in plan order; returns the names that failed."""
    done = {r["name"] for r in read_jsonl(out / RECORDS)}
    todo = [r for r in plan["runs"] if r["name"] not in done]
    failed = []
    for i, run in enumerate(todo):
        run_dir = out / "runs" / run["name"]
        resumed = run_dir.is_dir() and any(run_dir.glob(CKPT_GLOB))
        left = sum(r.get("est_seconds") or 0 for r in todo[i:])
        est = f", ~{run['est_seconds'] / 60:.1f} min (sweep: ~{left / 60:.0f} min left)" if run.get("est_seconds") else ""
        print(f"[{len(done) + i + 1}/{len(plan['runs'])}] {run['name']}: N={human(run['params'])}, "
              f"D={human(run['tokens'])}, C={run['flops']:.2e}{est}{' (resuming)' if resumed else ''}",
              file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "scalelm", "train", "--data", plan["data"]["path"], "--out", str(run_dir),
               *run_overrides(plan, run)]
        rc, stdout, wall = run_process(cmd, lock, out / "logs" / f"{run['name']}.log", verbose,
                                       env={"OMP_NUM_THREADS": str(threads)} if threads else None)
        if rc >= 128 or rc < 0:
            sig = rc - 128 if rc >= 128 else -rc
            raise UserError(f"run {run['name']} was stopped by signal {sig} (its checkpoint is saved): "
                            f"rerun the same command to continue the sweep")
        summary = _last_json(stdout) if rc == 0 else None
        val = summary.get("val_loss") if summary else None
        if rc != 0 or val is None or not (val == val):
            tail = (out / "logs" / f"{run['name']}.log").read_text(errors="replace")[-1500:]
            append_jsonl(out / FAILURES, {"name": run["name"], "returncode": rc, "log_tail": tail,
                                          "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            print(f"  failed (exit {rc}); log: {out / 'logs' / (run['name'] + '.log')}", file=sys.stderr)
            failed.append(run["name"])
            continue
        rec = make_record(plan, run, summary, run_dir, wall)
        append_jsonl(out / RECORDS, rec)
        tps = f", {rec['tokens_per_s']:,.0f} tok/s" if rec.get("tokens_per_s") else ""
        print(f"  val loss {val:.4f} in {wall / 60:.1f} min{tps}", file=sys.stderr, flush=True)
    return failed
