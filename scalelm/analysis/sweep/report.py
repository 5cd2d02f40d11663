"""A sweep's report, from ``plan.json`` and ``records.jsonl`` alone: fits, predictions, tables, plots.

Laws fitted (N = non-embedding parameters unless said otherwise, D = training tokens, L = final
validation loss in nats per token):

* ``L(N, D) = E + A/N^alpha + B/D^beta`` on every run (Chinchilla approach 3), also with N
  counting the embeddings;
* ``L(N)``, ``L(D)`` and ``L(C)`` on the Pareto frontiers: the runs no smaller (cheaper, shorter)
  run beats. These are what a compute-limited sweep can say about Kaplan's L(N) and L(D),
  which assume the other resource unlimited;
* IsoFLOP minima (approach 2): a parabola in log N per compute level, then N_opt and D_opt as
  power laws of C.

Compute-optimal predictions for 10x and 100x the sweep's compute come from L(N, D) minimised
over the sweep's own model family with its exact FLOPs per token (the model to train), from
Chinchilla's closed form under C = 6ND, and from the approach-2 power laws.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ...train.scaling import CHINCHILLA, kaplan_lr
from ..scaling_fit import (
    MAX_EXPONENT,
    Fit,
    FitError,
    chinchilla_optimum,
    fit_isoflop,
    fit_law,
)
from .plan import Family
from .system import dp_efficiency

PUBLISHED = {
    "kaplan": {"alpha_N": 0.076, "alpha_D": 0.095, "alpha_C": 0.050,
               "note": "Kaplan et al. 2020: WebText2, BPE, N non-embedding 768 to 1.5e9, early-stopped"},
    "chinchilla": {**CHINCHILLA, "a": 0.50, "b": 0.50,
                   "note": "Hoffmann et al. 2022: MassiveText, 70M to 16B parameters, approach 3 (and 2)"},
}
MULTIPLIERS = (10, 100)


def pareto(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of runs that no run with smaller-or-equal x beats, in increasing x."""
    order = np.lexsort((loss, x))
    keep, best = [], math.inf
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=int)


def _try_fit(xs, loss, variables, bootstrap, seed) -> tuple[Optional[Fit], Optional[str]]:
    try:
        return fit_law(xs, loss, bootstrap=bootstrap, seed=seed, variables=variables), None
    except FitError as e:
        return None, str(e)


# ----------------------------------------------------------------------------- predictions

class FamilyCosts:
    """N, N_total and FLOPs per token of every family member up to ``max_width`` (for optima)."""

    def __init__(self, family: Family):
        ms = family.members()
        self.members = ms
        self.n = np.array([m.params for m in ms], dtype=float)
        self.n_total = np.array([m.params_total for m in ms], dtype=float)
        self.fpt = np.array([m.flops_per_token for m in ms], dtype=float)

    def optimum(self, p: dict, compute: float, total: bool = False) -> tuple[int, float, float]:
        """(member index, D, predicted loss) minimising L(N, C / flops_per_token(N))."""
        n = self.n_total if total else self.n
        d = compute / self.fpt
        loss = p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]
        i = int(np.argmin(loss))
        return i, float(d[i]), float(loss[i])


def predictions(fit_nd: Optional[Fit], iso, costs: FamilyCosts, c_sweep: float) -> list[dict]:
    out = []
    for mult in MULTIPLIERS:
        c = c_sweep * mult
        if fit_nd is not None:
            i, d, loss = costs.optimum(fit_nd.params, c)
            m = costs.members[i]

            def ratio(p, c=c):
                j, dd, _ = costs.optimum(p, c)
                return dd / costs.n[j]

            row = {"multiplier": mult, "compute": c, "method": "L(N,D), family FLOPs", "model": m.shape,
                   "n": m.params, "n_total": m.params_total, "d": d, "tokens_per_param": d / m.params,
                   "loss": loss, "at_family_edge": i in (0, len(costs.members) - 1),
                   "n_ci": list(fit_nd.interval(lambda p, c=c: costs.n[costs.optimum(p, c)[0]])),
                   "d_ci": list(fit_nd.interval(lambda p, c=c: costs.optimum(p, c)[1])),
                   "tokens_per_param_ci": list(fit_nd.interval(ratio)),
                   "loss_ci": list(fit_nd.interval(lambda p, c=c: costs.optimum(p, c)[2]))}
            out.append(row)
            n6, d6 = chinchilla_optimum(fit_nd.params, c)
            if math.isfinite(n6):
                out.append({"multiplier": mult, "compute": c, "method": "L(N,D), C = 6ND", "n": n6, "d": d6,
                            "tokens_per_param": d6 / n6, "loss": float(fit_nd.predict(n6, d6)),
                            "n_ci": list(fit_nd.interval(lambda p, c=c: chinchilla_optimum(p, c)[0])),
                            "tokens_per_param_ci": list(fit_nd.interval(
                                lambda p, c=c: chinchilla_optimum(p, c)[1] / chinchilla_optimum(p, c)[0]))})
        if iso is not None and iso.n_law is not None:
            n2, d2 = iso.predict(c)
            out.append({"multiplier": mult, "compute": c, "method": "IsoFLOP minima (approach 2)", "n": n2,
                        "d": d2, "tokens_per_param": d2 / n2,
                        "n_ci": list(iso.interval(lambda s, c=c: math.exp(s[0]) * c ** s[1])),
                        "d_ci": list(iso.interval(lambda s, c=c: math.exp(s[2]) * c ** s[3]))})
    return out


def diagnose(fits: dict, records: list[dict], preds: list[dict]) -> list[str]:
    """Plain warnings where the data do not pin a law down (so a number is not over-read)."""
    out = []
    min_loss = min(r["val_loss"] for r in records) if records else 0.0
    for key, f in fits.items():
        if f is None:
            continue
        p, ci = f.params, f.ci
        for name in ("alpha", "beta"):
            if name in p and (p[name] < 0.01 or ci[name][1] >= 0.99 * MAX_EXPONENT):
                out.append(f"{key}: {name} is not pinned down (estimate {p[name]:.3g}, interval "
                           f"[{ci[name][0]:.3g}, {ci[name][1]:.3g}] reaches a bound)")
        if p["E"] < 0.05 * min_loss:
            out.append(f"{key}: the irreducible loss E went to ~0: these runs do not show the loss levelling off, "
                       f"so E and the exponents trade off freely")
    levels: dict[str, list[dict]] = {}
    for r in records:
        for g in r["groups"]:
            if g.startswith("iso"):
                levels.setdefault(g, []).append(r)
    for g, rs in sorted(levels.items()):
        if len({r["params"] for r in rs}) < 3:
            continue
        rs = sorted(rs, key=lambda r: r["params"])
        best = min(range(len(rs)), key=lambda i: rs[i]["val_loss"])
        if best in (0, len(rs) - 1):
            side = "smallest" if best == 0 else "largest"
            where = "at or below" if best == 0 else "at or above"
            out.append(f"IsoFLOP level {g} (C = {rs[0]['flops']:.2g}): the {side} size was best, so the compute-optimal "
                       f"size is {where} {rs[best]['n_layer']}x{rs[best]['width']}; the level has no interior minimum")
    for pr in preds:
        if pr.get("at_family_edge"):
            out.append(f"the {pr['multiplier']}x optimum is at the edge of the family ({pr['model']}): the law "
                       f"prefers a size the family does not have")
    return out


def train_command(plan: dict, pred: dict) -> str:
    """The `scalelm train` line for a predicted compute-optimal family member (the sweep's recipe)."""
    layers, width = map(int, pred["model"].split("x"))
    rec = plan["recipe"]
    steps = max(1, round(pred["d"] / rec["tokens_per_step"]))
    lr = [] if rec["lr"] == "fixed" else [f"--optim.lr={kaplan_lr(pred['n']):.6f}",
                                          f"--optim.min_lr={kaplan_lr(pred['n']) / 10:.7f}"]
    args = ["scalelm", "train", "--data", plan["data"]["path"], "--out", f"runs/opt-{pred['multiplier']}x",
            f"--model.n_layer={layers}", f"--model.n_embd={width}", f"--model.n_head={width // plan['family']['head_dim']}",
            f"--model.block_size={rec['seq_len']}", f"--train.micro_batch_size={rec['micro_batch']}",
            f"--train.max_steps={steps}", f"--optim.warmup_steps={max(1, min(100, steps // 10))}", *lr,
            *[o for o in rec["overrides"] if not o.startswith(("--model.block_size", "--train.micro_batch_size"))]]
    return " ".join(args)


# ----------------------------------------------------------------------------- analysis

def analyze(plan: dict, records: list[dict], system: list[dict], bootstrap: int = 200, seed: int = 0) -> dict:
    ok = [r for r in records if r.get("val_loss") is not None and math.isfinite(r["val_loss"]) and r["val_loss"] > 0]
    n = np.array([r["params"] for r in ok], dtype=float)
    nt = np.array([r["params_total"] for r in ok], dtype=float)
    d = np.array([r["tokens"] for r in ok], dtype=float)
    c = np.array([r["flops"] for r in ok], dtype=float)
    loss = np.array([r["val_loss"] for r in ok], dtype=float)
    fits, notes = {}, {}
    if len(ok):
        fits["L(N,D)"], notes["L(N,D)"] = _try_fit([n, d], loss, ("N", "D"), bootstrap, seed)
        fits["L(Ntotal,D)"], notes["L(Ntotal,D)"] = _try_fit([nt, d], loss, ("N_total", "D"), bootstrap, seed)
        for key, x, var in (("L(N)", n, "N"), ("L(D)", d, "D"), ("L(C)", c, "C")):
            idx = pareto(x, loss)
            fits[key], notes[key] = _try_fit(x[idx], loss[idx], (var,), bootstrap, seed)
    level_ids = [next((g for g in r["groups"] if g.startswith("iso")), None) for r in ok]
    iso = fit_isoflop(c, n, d, loss, level_ids, bootstrap=bootstrap, seed=seed) if len(ok) else None
    c_sweep = float(c.sum()) if len(ok) else 0.0
    preds = predictions(fits.get("L(N,D)"), iso, FamilyCosts(Family.from_dict(plan["family"])), c_sweep) if len(ok) else []
    for p in preds:
        if p.get("model"):
            p["command"] = train_command(plan, p)
    return {"runs_planned": len(plan["runs"]), "runs_done": len(ok), "compute": c_sweep,
            "fits": {k: (v.to_dict() if v is not None else {"error": notes[k]}) for k, v in fits.items()},
            "isoflop": iso.to_dict() if iso is not None else None, "predictions": preds,
            "warnings": diagnose(fits, ok, preds),
            "system": system_scaling(ok, system), "published": PUBLISHED, "_fits": fits, "_iso": iso}


def system_scaling(records: list[dict], system: list[dict]) -> dict:
    by_shape: dict[str, list[dict]] = {}
    for r in records:
        by_shape.setdefault(f"{r['n_layer']}x{r['width']}", []).append(r)
    sizes = []
    for shape, rs in sorted(by_shape.items(), key=lambda kv: kv[1][0]["params"]):
        med = lambda k: float(np.median([r[k] for r in rs if r.get(k) is not None])) if any(
            r.get(k) is not None for r in rs) else None
        sizes.append({"shape": shape, "params": rs[0]["params"], "params_total": rs[0]["params_total"],
                      "runs": len(rs), "tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"),
                      "peak_mem_mb": max((r["peak_mem_mb"] for r in rs if r.get("peak_mem_mb")), default=None),
                      "flops_per_s": (med("tokens_per_s") or 0) * rs[0]["flops_per_token"] or None})
    dp = {row["config"]: row for row in system if row.get("check") == "data_parallel"}
    eff = dp_efficiency(list(dp.values()))
    return {"sizes": sizes, "data_parallel": list(dp.values()), "dp_efficiency": eff}


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
