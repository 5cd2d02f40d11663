"""``scalelm plot RUN_DIR [RUN_DIR ...]``: loss and throughput curves of runs, as PNG files.

``loss.png``: training loss (thin line) and validation loss (markers) against steps or tokens;
``throughput.png``: tokens per second and, when known, MFU (dashed, on its own axis at the right).
Several runs share the axes, so two configurations compare at a glance. Reads ``metrics.jsonl`` only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write
from ..train.metrics import read_metrics


def _series(records: list[dict], key: str, x: str) -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in records if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _with_tokens(records: list[dict]) -> list[dict]:
    """Validation records carry no token count: take it from the training record of their step."""
    tokens = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    per_step = next((r["tokens"] / r["step"] for r in records if r.get("tokens") and r.get("step")), 0)
    return [dict(r, tokens=r.get("tokens", tokens.get(r["step"], r["step"] * per_step))) for r in records]


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, x: str = "step") -> dict[str, str]:
    out = Path(out_dir)
    first = next((p for p in (out, *out.parents) if p.exists()), out)  # the part that exists already
    if first.exists() and not first.is_dir():  # checked first: nothing is drawn or written
        raise UserError(f"--out {out} is {'a file' if first == out else f'inside the file {first}'}: plot writes loss.png and throughput.png into a directory; "
                        f"give a directory (a new one is created)")
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    runs = [(Path(d).name or str(d), _with_tokens(read_metrics(d))) for d in run_dirs]
    for name, recs in runs:
        if not any("loss" in r or "val_loss" in r for r in recs):
            raise UserError(f"{name}: metrics.jsonl has no loss records yet (train for at least log_every steps)")
    xlabel = "optimizer step" if x == "step" else "tokens seen"
    paths = {}

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, recs) in enumerate(runs):
        color = f"C{i}"
        xs, ys = _series(recs, "loss", x)
        ax.plot(xs, ys, color=color, alpha=0.45, linewidth=1, label=f"{name} train")
        xs, ys = _series(recs, "val_loss", x)
        ax.plot(xs, ys, color=color, marker="o", markersize=4, linewidth=1.8, label=f"{name} val")
        if ys:
            best = min(ys)
            ax.annotate(f"{best:.3f}", (xs[ys.index(best)], best), textcoords="offset points", xytext=(4, -12),
                        fontsize=8, color=color)
    ax.set(xlabel=xlabel, ylabel="cross-entropy (nats / token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths["loss"] = str(out / "loss.png")
    _save(fig, Path(paths["loss"]))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    ax2 = None
    top_tps = top_mfu = 0.0
    for i, (name, recs) in enumerate(runs):
        xs, ys = _series(recs, "tokens_per_s", x)
        ax.plot(xs, ys, color=f"C{i}", linewidth=1.2, label=f"{name} tokens/s")
        top_tps = max([top_tps, *ys])
        mx, my = _series(recs, "mfu", x)
        if my:
            ax2 = ax2 or ax.twinx()
            pct = [100 * v for v in my]
            ax2.plot(mx, pct, color=f"C{i}", linestyle="--", linewidth=1, label=f"{name} MFU")
            top_mfu = max([top_mfu, *pct])
    ax.set(xlabel=xlabel, ylabel="tokens / s", title="throughput")
    ax.set_ylim(0, top_tps * 1.05 or 1)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        # MFU is tokens/s times a constant (FLOPs per token over the peak): on two autoscaled axes its
        # line would lie exactly on the tokens/s line. Its own scale, with twice the headroom, draws it
        # in the lower half, under the tokens/s line, each read on its own axis.
        ax2.set_ylim(0, top_mfu * 2 or 1)
        ax2.set_ylabel("MFU (%, dashed)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    (ax2 or ax).legend(handles, labels, fontsize=8)  # on the top axes: no line drawn over it
    paths["throughput"] = str(out / "throughput.png")
    _save(fig, Path(paths["throughput"]))
    plt.close(fig)
    return paths


def add_plot_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="one or more RUN_DIRs (their metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: the first RUN_DIR)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis (default: step)")


def run_plot(args: argparse.Namespace) -> int:
    paths = plot_runs(args.runs, args.out or args.runs[0], args.x)
    print(json.dumps(paths))
    return 0
