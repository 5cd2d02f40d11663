"""Master weights vs bf16 autocast over a real run: do the loss curves overlay within seed noise?

    python benchmarks/bench_master.py                        # baby on Tiny Shakespeare chars, 2000 steps, seeds 1337 and 1
    python benchmarks/bench_master.py --preset char-shakespeare --steps 2000 --micro-batch 8

Each arm is ``scalelm train --preset P`` (nanoGPT's character split) with
``--train.master_weights=true`` (bf16 weights, fp32 masters: the default on a bf16 CPU) or
``=false`` (fp32 weights, bf16 autocast), on two seeds, one run at a time. The validation curves
(every ``eval_every`` steps) are compared: the largest gap between the two settings at equal seed
against the largest gap between the two seeds at equal setting. Prints a table, writes
``benchmarks/results/master_<preset>.json`` and an overlay plot ``master_<preset>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _util import RESULTS, machine, write_json  # noqa: E402
from bench_quality import prepare, scalelm  # noqa: E402


def curve(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--micro-batch", type=int, default=None, help="override the preset's micro-batch")
    ap.add_argument("--seeds", default="1337,1")
    ap.add_argument("--work", default="/tmp/scalelm-bench-master")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(work)
    runs, curves = {}, {}
    for seed in a.seeds.split(","):
        for master in ("true", "false"):
            name = f"master={master} seed={seed}"
            out = work / f"{a.preset}-m{master}-s{seed}"
            extra = [f"--train.micro_batch_size={a.micro_batch}"] if a.micro_batch else []
            t0 = time.perf_counter()
            p = scalelm("train", "--preset", a.preset, "--data", str(data), "--out", str(out), "--train.precision=bf16",
                        f"--train.master_weights={master}", f"--train.seed={seed}", f"--train.max_steps={a.steps}",
                        "--train.save_every=1000000", *extra)
            if p.returncode:
                sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
            s = json.loads(p.stdout.strip().splitlines()[-1])
            curves[name] = curve(out)
            runs[name] = dict(wall_s=round(time.perf_counter() - t0, 1), final_val_loss=curves[name][max(curves[name])],
                              master_weights=s.get("master_weights"), tokens=s.get("tokens"))
            print(f"{name}: final val {runs[name]['final_val_loss']:.4f} in {runs[name]['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
    seeds = a.seeds.split(",")
    steps = sorted(set.intersection(*(set(c) for c in curves.values())) - {0})

    def gap(x: str, y: str) -> float:
        return max(abs(curves[x][s] - curves[y][s]) for s in steps)

    setting_gap = max(gap(f"master=true seed={s}", f"master=false seed={s}") for s in seeds)
    seed_gap = max(gap(f"master={m} seed={seeds[0]}", f"master={m} seed={seeds[1]}") for m in ("true", "false"))
    print("| step | " + " | ".join(curves) + " |")
    print("|---:|" + "---:|" * len(curves))
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{c[s]:.4f}" for c in curves.values()) + " |")
    print(f"largest gap between settings (same seed): {setting_gap:.4f}; between seeds (same setting): {seed_gap:.4f}")
    result = dict(preset=a.preset, steps=a.steps, micro_batch=a.micro_batch, machine=machine(peaks=False), runs=runs,
                  curves={k: {str(s): v for s, v in c.items()} for k, c in curves.items()},
                  setting_gap=setting_gap, seed_gap=seed_gap)
    print(write_json(f"master_{a.preset}.json", result))
    plot(curves, RESULTS / f"master_{a.preset}.png", a.preset)


def plot(curves: dict, path: Path, preset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, c in curves.items():
        steps = sorted(s for s in c if s > 0)
        ax.plot(steps, [c[s] for s in steps], ls="-" if "true" in name else "--", marker="o", ms=3, label=name)
    ax.set(xlabel="step", ylabel="validation loss", title=f"{preset}: bf16 master weights vs bf16 autocast")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
