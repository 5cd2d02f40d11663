"""A sweep's plots (PNG, matplotlib Agg): loss against compute with IsoFLOP profiles and the
fitted frontier, optimal N and D against compute, loss against N and D, throughput and memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...fileio import atomic_write
from .plan import Family
from .report import MULTIPLIERS, FamilyCosts, pareto


def _save(fig, path: Path) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def _arrays(records: list[dict]) -> dict[str, np.ndarray]:
    ok = [r for r in records if r.get("val_loss") is not None and np.isfinite(r["val_loss"])]
    get = lambda k: np.array([r[k] for r in ok], dtype=float)
    return {"n": get("params"), "d": get("tokens"), "c": get("flops"), "loss": get("val_loss"),
            "level": np.array([next((g for g in r["groups"] if g.startswith("iso")), "") for r in ok])}


def plot_all(out: Path, plan: dict, records: list[dict], res: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    a = _arrays(records)
    costs = FamilyCosts(Family.from_dict(plan["family"]))
    files = [_loss_vs_compute(out, a, res, costs), _loss_vs_n_d(out, a, res)]
    iso = res.get("_iso")
    if iso is not None and iso.levels:
        files.append(_optimum_vs_compute(out, res, costs))
    files.append(_system(out, res["system"]))
    return files


def _frontier(fit, costs: FamilyCosts, cs: np.ndarray) -> np.ndarray:
    return np.array([costs.optimum(fit.params, c)[2] for c in cs])


def _loss_vs_compute(out: Path, a: dict, res: dict, costs: FamilyCosts) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    norm = LogNorm(a["n"].min(), max(a["n"].max(), a["n"].min() * 1.01))
    sc = ax.scatter(a["c"], a["loss"], c=a["n"], norm=norm, cmap="viridis", s=30, zorder=3)
    fig.colorbar(sc, ax=ax, label="N (non-embedding parameters)")
    front = pareto(a["c"], a["loss"])
    ax.scatter(a["c"][front], a["loss"][front], facecolors="none", edgecolors="red", s=80, zorder=4,
               label="frontier runs")
    c_sweep = res["compute"]
    cs = np.geomspace(a["c"].min(), c_sweep * MULTIPLIERS[-1], 120)
    fit_nd, fit_c = res["_fits"].get("L(N,D)"), res["_fits"].get("L(C)")
    if fit_nd is not None:
        ax.plot(cs, _frontier(fit_nd, costs, cs), "k-", lw=1.5, label="L(N,D) fit: compute-optimal frontier")
    if fit_c is not None:
        ax.plot(cs, fit_c.predict(cs), "r--", lw=1, label="L(C) fit to the frontier runs")
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="validation loss (nats/token)",
           title="Loss against compute")
    for m in MULTIPLIERS:
        ax.axvline(c_sweep * m, color="grey", ls=":", lw=1)
        ax.text(c_sweep * m, ax.get_ylim()[0], f"{m}x sweep ", rotation=90, va="bottom", ha="right",
                fontsize=8, color="grey")
    ax.legend(fontsize=8)
    levels = sorted({lv for lv in a["level"] if lv}, key=lambda s: int(s[3:]))
    colors = plt.cm.plasma(np.linspace(0.1, 0.85, max(1, len(levels))))
    iso = res.get("_iso")
    minima = {round(np.log(lv["compute"]), 6): lv for lv in (iso.levels if iso else [])}
    for color, lv in zip(colors, levels):
        sel = a["level"] == lv
        c_lv = float(np.median(a["c"][sel]))
        order = np.argsort(a["n"][sel])
        ax2.plot(a["n"][sel][order], a["loss"][sel][order], "o", color=color, label=f"C = {c_lv:.2g}")
        m = minima.get(round(np.log(c_lv), 6))
        if m is not None:
            xs = np.geomspace(a["n"][sel].min(), a["n"][sel].max(), 60)
            ax2.plot(xs, np.polyval(m["parabola"], np.log(xs)), "-", color=color, lw=1)
            ax2.plot(m["n_opt"], m["loss_opt"], "*", color=color, ms=14, mec="k")
        if fit_nd is not None:
            near = (costs.n >= a["n"][sel].min() / 1.5) & (costs.n <= a["n"][sel].max() * 1.5)
            ax2.plot(costs.n[near], fit_nd.predict(costs.n[near], c_lv / costs.fpt[near]), ":", color=color, lw=1)
    ax2.set(xscale="log", xlabel="N (non-embedding parameters)", ylabel="validation loss",
            title="IsoFLOP profiles (parabola, * minimum; dotted: L(N,D) fit)")
    if levels:
        ax2.legend(fontsize=8)
    return _save(fig, out / "loss_vs_compute.png")


def _optimum_vs_compute(out: Path, res: dict, costs: FamilyCosts) -> str:
    import matplotlib.pyplot as plt

    iso, fit_nd = res["_iso"], res["_fits"].get("L(N,D)")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lv_c = np.array([lv["compute"] for lv in iso.levels])
    cs = np.geomspace(lv_c.min() / 2, res["compute"] * MULTIPLIERS[-1], 80)
    for ax, key, label, law in ((axes[0], "n_opt", "N_opt (non-embedding)", iso.n_law),
                                (axes[1], "d_opt", "D_opt (tokens)", iso.d_law)):
        ax.plot(lv_c, [lv[key] for lv in iso.levels], "o", color="C1", ms=8, label="IsoFLOP minima")
        if law is not None:
            ax.plot(cs, law[0] * cs ** law[1], "--", color="C1", label=f"approach 2: ~C^{law[1]:.2f}")
        if fit_nd is not None:
            opt = [costs.optimum(fit_nd.params, c) for c in cs]
            ys = [costs.n[i] for i, _, _ in opt] if key == "n_opt" else [d for _, d, _ in opt]
            ax.plot(cs, ys, "-", color="C0", label="L(N,D) fit, family FLOPs")
        for m in MULTIPLIERS:
            ax.axvline(res["compute"] * m, color="grey", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle("Compute-optimal size and length")
    return _save(fig, out / "optimum_vs_compute.png")


def _loss_vs_n_d(out: Path, a: dict, res: dict) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    fit_nd = res["_fits"].get("L(N,D)")
    for ax, x, other, key, xl, ol in ((axes[0], a["n"], a["d"], "L(N)", "N (non-embedding parameters)", "D (tokens)"),
                                      (axes[1], a["d"], a["n"], "L(D)", "D (training tokens)", "N")):
        norm = LogNorm(other.min(), max(other.max(), other.min() * 1.01))
        sc = ax.scatter(x, a["loss"], c=other, norm=norm, cmap="viridis", s=30, zorder=3)
        fig.colorbar(sc, ax=ax, label=ol)
        front = pareto(x, a["loss"])
        ax.scatter(x[front], a["loss"][front], facecolors="none", edgecolors="red", s=80, zorder=4,
                   label="frontier runs")
        fit = res["_fits"].get(key)
        xs = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        if fit is not None:
            p = fit.params
            ax.plot(xs, fit.predict(xs), "r--", label=f"{key} = {p['E']:.2f} + {p['A']:.3g}/x^{p['alpha']:.3f}")
        if fit_nd is not None and key == "L(D)":
            for nv in np.unique(a["n"]):
                ax.plot(xs, fit_nd.predict(np.full_like(xs, nv), xs), "-", lw=0.8, color=plt.cm.viridis(norm(nv)))
        ax.set(xscale="log", xlabel=xl, ylabel="validation loss (nats/token)")
        ax.legend(fontsize=8)
    axes[0].set_title("Loss against size")
    axes[1].set_title("Loss against tokens (lines: L(N,D) fit per size)")
    return _save(fig, out / "loss_vs_n_d.png")


def _system(out: Path, sysd: dict) -> str:
    import matplotlib.pyplot as plt

    sizes = [s for s in sysd["sizes"] if s.get("tokens_per_s")]
    dp = [r for r in sysd["data_parallel"] if r.get("tokens_per_s")]
    fig, axes = plt.subplots(1, 3 if dp else 2, figsize=(15 if dp else 11, 4.2))
    n = [s["params"] for s in sizes]
    axes[0].plot(n, [s["tokens_per_s"] for s in sizes], "o-", label="tokens/s")
    ax_f = axes[0].twinx()
    ax_f.plot(n, [(s["flops_per_s"] or 0) / 1e9 for s in sizes], "s--", color="C1", label="model GFLOP/s")
    ax_f.set_ylabel("model GFLOP/s", color="C1")
    axes[0].set(xscale="log", xlabel="N (non-embedding)", ylabel="training tokens/s", title="Throughput")
    mem = [(s["params"], s["peak_mem_mb"]) for s in sysd["sizes"] if s.get("peak_mem_mb")]
    if mem:
        axes[1].plot(*zip(*mem), "o-", color="C2")
    axes[1].set(xscale="log", xlabel="N (non-embedding)", ylabel="peak memory (MB)", title="Peak memory")
    if dp:
        axes[2].bar([r["config"] for r in dp], [r["tokens_per_s"] for r in dp], color="C4")
        axes[2].set(xlabel="processes x threads", ylabel="tokens/s", title=f"Data parallel ({dp[0]['shape']})")
    fig.tight_layout()
    return _save(fig, out / "system.png")
