"""``--preset auto`` against three hand-picked shapes at the same time budget, on BPE corpora.

    python benchmarks/bench_auto.py                      # TinyStories sample and its first 1 MB, 10 min each
    python benchmarks/bench_auto.py --minutes 3          # a shorter budget
    python benchmarks/bench_auto.py --corpora slice      # one corpus
    python benchmarks/bench_auto.py --arms auto,4x128    # some arms (by the start of their names)

Each corpus is prepared with ``scalelm prepare`` (BPE 8192, the default split); every arm is one
``scalelm train`` process run alone, one after another, with the same ``--train.max_minutes``.
The hand-picked arms are what a user would reach for (nanoGPT's baby shape, a 6x256 middle and
nanoGPT's shakespeare-char shape with its dropout 0.2), each with lr 1e-3, 16 x 256 tokens per
step, warm-up 100, cosine over the minutes and the same evaluation cadence as auto; auto's
probing counts in its budget. The score is ``scalelm eval`` of each run's ``best/`` on the whole
validation split (nats per token, fp32), with the training command's wall time. Prints a table and writes
``benchmarks/results/auto_<M>min.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _util import machine, write_json  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_sample.txt"
HAND = {  # name -> overrides
    "4x128 (baby)": ["--model.n_layer=4", "--model.n_embd=128", "--model.n_head=4"],
    "6x256": ["--model.n_layer=6", "--model.n_embd=256", "--model.n_head=8"],
    "6x384 (shakespeare-char, dropout 0.2)": ["--model.n_layer=6", "--model.n_embd=384", "--model.n_head=6",
                                              "--model.dropout=0.2"],
}
HAND_COMMON = ["--model.block_size=256", "--train.micro_batch_size=16", "--optim.lr=1e-3", "--optim.min_lr=1e-4",
               "--optim.warmup_steps=100", "--train.max_steps=1000000000", "--train.save_every=1000000000"]


def scalelm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "scalelm", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def prepare(work: Path, name: str, nbytes: int | None) -> Path:
    data = work / f"data_{name}"
    if not (data / "meta.json").is_file():
        src = SAMPLE
        if nbytes:
            src = work / f"{name}.txt"
            src.write_bytes(SAMPLE.read_bytes()[:nbytes])
        p = scalelm("prepare", "--input", str(src), "--out", str(data), "--no-progress")
        if p.returncode:
            sys.exit(f"prepare failed:\n{p.stderr}")
    return data


def train(data: Path, out: Path, args: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = scalelm("train", "--data", str(data), "--out", str(out), *args)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"train failed ({' '.join(args)}):\n{p.stderr[-3000:]}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line]
    train_losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                    if '"loss"' in line and '"val_loss"' not in line]
    auto = json.loads((out / "auto.json").read_text()) if (out / "auto.json").is_file() else None
    # the score: best/ on the whole validation split (the runs' own evaluations read parts of it)
    e = scalelm("eval", str(out / "best"), "--data", str(data), "--split", "val", "--dtype", "fp32")
    if e.returncode:
        sys.exit(f"eval failed:\n{e.stderr[-2000:]}")
    full = json.loads(e.stdout.strip().splitlines()[-1])
    return {"val_loss": full["loss"], "val_bits_per_byte": full.get("bits_per_byte"),
            "best_val_loss": summary.get("best_val_loss"), "best_step": summary.get("best_step"),
            "final_val_loss": evals[-1]["val_loss"] if evals else None, "steps": summary.get("step"),
            "last_train_loss": train_losses[-1]["loss"] if train_losses else None,
            "wall_s": round(wall, 1), "stopped": summary.get("stopped"), "tokens": summary.get("tokens"),
            "auto": auto and {"chosen": auto["chosen"], "regime": auto["regime"], "config": auto["config"],
                              "probe_seconds": auto["probe_seconds"]}}


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--corpora", default="sample,slice", help="sample (2 MB), slice (its first 1 MB)")
    ap.add_argument("--arms", default="", help="comma-separated name prefixes (default: all four)")
    ap.add_argument("--work", default="/tmp/scalelm-bench-auto")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    corpora = {"sample": None, "slice": 1_000_000}
    results = {"minutes": a.minutes, "machine": machine(peaks=False), "corpora": {}}
    for name in a.corpora.split(","):
        data = prepare(work, name, corpora[name])
        meta = json.loads((data / "meta.json").read_text())
        rows = {}
        arms = [("auto", ["--preset", "auto"]), *HAND.items()]
        wanted = [w for w in a.arms.split(",") if w]
        for arm, extra in [x for x in arms if not wanted or any(x[0].startswith(w) for w in wanted)]:
            common = [] if arm == "auto" else HAND_COMMON + ["--train.eval_every=50", "--train.eval_iters=10"]
            rows[arm] = train(data, work / "runs" / name / arm.split()[0],
                              [*extra, *common, f"--train.max_minutes={a.minutes}"])
            print(f"{name:>7} {arm:<40} val {_f(rows[arm]['val_loss'])}", file=sys.stderr, flush=True)
        results["corpora"][name] = {"train_tokens": meta["splits"]["train"]["tokens"],
                                    "val_tokens": meta["splits"]["val"]["tokens"], "runs": rows}
    print("| corpus | arm | val loss (best/, whole split) | bits/byte | best at step | of steps | last train loss | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, c in results["corpora"].items():
        for arm, r in c["runs"].items():
            label = f"auto: {r['auto']['chosen']}" if r["auto"] else arm
            print(f"| {name} ({c['train_tokens']:,} tokens) | {label} | {_f(r['val_loss'])} | {_f(r['val_bits_per_byte'])} "
                  f"| {r['best_step']} | {r['steps']} | {_f(r['last_train_loss'], 3)} | {r['wall_s']:.0f} |")
    print(write_json(f"auto_{a.minutes:g}min" + ("_" + "_".join(a.corpora.split(",")) if a.corpora != "sample,slice" else "")
                     + ".json", results))


if __name__ == "__main__":
    main()
