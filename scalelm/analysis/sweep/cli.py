"""``scalelm sweep``: plan a scaling-law grid within a budget, train it, fit it; ``scalelm report``.

    scalelm sweep --data DATA_DIR --minutes 45 --out SWEEP_DIR [--sizes auto|LIST] [--tokens auto|LIST]
    scalelm report SWEEP_DIR

``SWEEP_DIR/plan.json`` is written once, before any training; every run goes through the normal
trainer (``scalelm train``, a subprocess) into ``SWEEP_DIR/runs/<name>/`` and, when it finishes,
gets one line in ``SWEEP_DIR/records.jsonl``. Rerunning the same command continues a killed
sweep: finished runs are skipped and a half-trained run resumes from its last checkpoint (the
trainer's auto-resume). The report (fits, predictions, plots, ``report.md``) is rebuilt from the
records alone by ``scalelm report``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...errors import UserError
from ...fileio import atomic_write_text
from ...runs import check_output_dir
from ...train.scaling import ASPECT, HEAD_DIM
from .plan import human
from .runner import (
    PLAN,
    RECORDS,
    SweepLock,
    controlled_key_error,
    make_plan,
    read_jsonl,
    run_all,
)
from .system import dp_check

# ----------------------------------------------------------------------------- sweep

PLAN_KEYS = {"request": dict, "data": dict, "family": dict, "recipe": dict, "budget": dict, "runs": list}


def read_plan(out: Path) -> dict:
    """``SWEEP_DIR/plan.json``, or a UserError saying it is damaged and what to do."""
    p = Path(out) / PLAN
    try:
        plan = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"is not valid JSON ({e})"
    else:
        if not isinstance(plan, dict):
            problem = f"is damaged (a JSON {type(plan).__name__}, not an object)"
        else:
            bad = [k for k, t in PLAN_KEYS.items() if not isinstance(plan.get(k), t)]
            if not bad and not all(isinstance(r, dict) and "name" in r for r in plan["runs"]):
                bad = ["runs"]
            if not bad:
                return plan
            problem = f"is damaged ({', '.join(bad)} missing or malformed)"
    raise UserError(f"{p} {problem}: it is written once when the sweep is planned; restore it from a backup, "
                    f"or plan the sweep again into a new --out (the runs in {Path(out) / 'runs'} stay usable)")


def build_report(out: Path, bootstrap: int = 200, seed: int = 0) -> dict:
    """Fit, predict, plot and write ``fit.json`` + ``report.md``; returns {"summary", "text"}."""
    from .plots import plot_all  # matplotlib: imported only when a report is written
    from .report import analyze, json_default
    from .runner import SYSTEM
    from .text import render

    out = Path(out)
    plan = read_plan(out)
    records = read_jsonl(out / RECORDS)
    system = read_jsonl(out / SYSTEM)
    res = analyze(plan, records, system, bootstrap, seed)
    pngs = plot_all(out, plan, records, res) if res["runs_done"] else []
    summary = {k: v for k, v in res.items() if not k.startswith("_")}
    summary["plots"] = pngs
    text = render(plan, records, summary, res)
    atomic_write_text(out / "fit.json", json.dumps(summary, indent=2, default=json_default) + "\n")
    atomic_write_text(out / "report.md", text)
    return {"summary": json.loads(json.dumps(summary, default=json_default)), "text": text}


def add_sweep_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a DATA_DIR written by `scalelm prepare` (not needed to continue a sweep)")
    p.add_argument("--out", required=True, help="the sweep directory (plan.json, records.jsonl, runs/, report.md)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--budget", help="total training compute in FLOPs, e.g. 5e14")
    b.add_argument("--minutes", type=float, help="total wall time; converted to FLOPs with measured step times")
    p.add_argument("--sizes", default="auto", help="auto, or a list of widths (128), layers x width (4x128) or "
                   "non-embedding parameter counts (300k), comma separated")
    p.add_argument("--tokens", default="auto", help="auto, or training lengths in tokens (50k,200k,1M); with "
                   "--sizes LIST this makes a plain sizes x tokens grid")
    g = p.add_argument_group("grid (auto)")
    g.add_argument("--levels", type=int, default=3, help="IsoFLOP compute levels (default 3)")
    g.add_argument("--per-level", type=int, default=4, help="model sizes per IsoFLOP level (default 4)")
    g.add_argument("--level-ratio", type=float, default=3.0, help="compute ratio between levels (default 3)")
    g.add_argument("--iso-fraction", type=float, default=0.75,
                   help="share of the budget for IsoFLOP profiles; the rest trains a few sizes to several lengths")
    g.add_argument("--fixed-sizes", type=int, default=3, help="sizes in the fixed-size grid (default 3)")
    g.add_argument("--fixed-lengths", type=int, default=3, help="lengths per size in that grid (default 3)")
    g.add_argument("--min-steps", type=int, default=20, help="shortest run in optimizer steps (default 20)")
    f = p.add_argument_group("model family")
    f.add_argument("--aspect", type=float, default=ASPECT, help="width / layers (default 32: 128 wide = 4 layers)")
    f.add_argument("--head-dim", type=int, default=HEAD_DIM, help="attention head dimension (default 32)")
    p.add_argument("--threads", type=int, help="CPU threads per trainer (default: torch's, all cores); on a busy "
                   "machine 1 avoids OpenMP threads fighting for cores")
    p.add_argument("--no-dp-check", dest="dp_check", action="store_false",
                   help="skip the data-parallel efficiency runs (one process against torchrun with several)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200)")
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON and exit (nothing is written)")
    p.add_argument("--verbose", action="store_true", help="show each run's training log (else in SWEEP_DIR/logs/)")
    p.epilog = ("Training settings are overrides passed to every run, e.g. --model.block_size=128 "
                "--train.micro_batch_size=32 --optim.lr=1e-3 (default: Kaplan's learning rate per size).")
    p.set_defaults(accepts_overrides=True)


def _request(args: argparse.Namespace) -> dict:
    return {"data": str(Path(args.data).resolve()) if args.data else None,
            "budget": args.budget, "minutes": args.minutes, "sizes": args.sizes, "tokens": args.tokens,
            "levels": args.levels, "per_level": args.per_level, "level_ratio": args.level_ratio,
            "iso_fraction": args.iso_fraction, "fixed_sizes": args.fixed_sizes,
            "fixed_lengths": args.fixed_lengths, "min_steps": args.min_steps, "aspect": args.aspect,
            "head_dim": args.head_dim, "dp_check": args.dp_check, "threads": args.threads,
            "overrides": list(args.overrides)}


def _print_plan(plan: dict) -> None:
    runs, rec = plan["runs"], plan["recipe"]
    train_tokens = plan["data"]["train_tokens"]
    print(f"plan: {len(runs)} runs, {plan['budget']['planned_flops']:.3g} FLOPs, "
          f"{rec['tokens_per_step']:,} tokens/step (batch {rec['micro_batch']} x {rec['accum']} x seq {rec['seq_len']})"
          + (f", ~{plan['budget']['est_seconds'] / 60:.1f} min predicted" if plan["budget"].get("est_seconds") else ""),
          file=sys.stderr)
    print(f"  {'run':<22}{'groups':<12}{'N':>8}{'D':>8}{'C':>10}{'D/N':>7}{'epochs':>7}{'lr':>9}{'est':>7}",
          file=sys.stderr)
    for r in runs:
        est = f"{r['est_seconds'] / 60:.1f}m" if r.get("est_seconds") else ""
        print(f"  {r['name']:<22}{','.join(r['groups']):<12}{human(r['params']):>8}{human(r['tokens']):>8}"
              f"{r['flops']:>10.2e}{r['tokens'] / r['params']:>7.1f}{r['tokens'] / train_tokens:>7.1f}"
              f"{r['lr']:>9.2e}{est:>7}", file=sys.stderr)
    many = [r["name"] for r in runs if r["tokens"] > 4 * train_tokens]
    if many:
        print(f"warning: {len(many)} runs see the training data more than 4 times (repeated data lowers the "
              f"value of each token; Muennighoff et al. 2023): {', '.join(many[:6])}"
              f"{' ...' if len(many) > 6 else ''}. A larger corpus would make the fit cleaner.", file=sys.stderr)


def run_sweep(args: argparse.Namespace) -> int:
    out = Path(args.out)
    controlled_key_error(args.overrides)
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    req = _request(args)
    _warn_if_busy(args.threads)
    if args.dry_run:
        plan = make_plan(req)
        _print_plan(plan)
        print(json.dumps(plan, indent=2))
        return 0
    plan_path = out / PLAN
    if not plan_path.is_file():  # a new sweep: never into a run, the data, or a folder holding other files
        check_output_dir(out, "sweep", lambda d: (d / PLAN).is_file(), sources=[args.data] if args.data else [])
    fresh = None
    if not plan_path.is_file():  # plan before creating anything: a bad request leaves no trace
        if args.data is None:
            raise UserError(f"{out} holds no sweep yet: pass --data DATA_DIR and --budget or --minutes")
        fresh = make_plan(req)
    with SweepLock(out) as lock:
        if plan_path.is_file():
            plan = read_plan(out)
            if args.data is not None and _differs(plan["request"], req):
                raise UserError(f"{out} holds a sweep planned with other settings "
                                f"({_differs(plan['request'], req)}): rerun it with its own arguments (or just "
                                f"`scalelm sweep --out {out}`), or choose another --out")
            print(f"continuing the sweep in {out} ({len(read_jsonl(out / RECORDS))}/{len(plan['runs'])} runs done)",
                  file=sys.stderr)
        else:
            plan = fresh or make_plan(req)
            atomic_write_text(plan_path, json.dumps(plan, indent=2) + "\n")
        _print_plan(plan)
        failed = run_all(plan, out, lock, verbose=args.verbose, threads=args.threads or plan["request"].get("threads"))
        if args.dp_check:
            dp_check(plan, out, lock, verbose=args.verbose)
    report = build_report(out, bootstrap=args.bootstrap)
    print(report["text"])
    if failed:
        print(f"{len(failed)} runs failed ({', '.join(failed)}): see {out / 'failures.jsonl'} and {out / 'logs'}; "
              f"rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _warn_if_busy(threads) -> None:
    import os

    from .calibrate import usable_cores

    load, cores = os.getloadavg()[0], usable_cores()
    if threads is None and cores > 1 and load > cores:
        print(f"warning: this machine is busy (load {load:.1f} on {cores} cores); trainers with {cores} threads "
              f"each slow down badly when cores are shared (OpenMP threads wait for each other): consider "
              f"--threads 1", file=sys.stderr)


def _differs(old: dict, new: dict) -> str:
    keys = [k for k in new if k not in ("dp_check", "threads") and old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


# ----------------------------------------------------------------------------- report

def add_report_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", help="a directory written by `scalelm sweep`")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--json", action="store_true", help="print the fitted laws and predictions as JSON")


def run_report(args: argparse.Namespace) -> int:
    d = Path(args.sweep_dir)
    if not (d / PLAN).is_file():
        raise UserError(f"{d} is not a sweep directory ({PLAN} is missing): run `scalelm sweep --out {d}` first")
    read_plan(d)  # a damaged plan fails before the report files are touched
    report = build_report(d, bootstrap=args.bootstrap, seed=args.seed)
    print(json.dumps(report["summary"], indent=2) if args.json else report["text"])
    return 0
