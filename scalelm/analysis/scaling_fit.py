"""Scaling-law fits: L(x) = E + A/x^alpha, L(N, D) = E + A/N^alpha + B/D^beta, IsoFLOP minima.

Fitted as in Chinchilla (Hoffmann et al. 2022, appendix D.2): in log space,
``log L = LSE(a - alpha log N, b - beta log D, e)`` with ``A, B, E = exp(a), exp(b), exp(e)``,
minimising a Huber loss (delta 1e-3) of the log-loss residuals with L-BFGS from a grid of
initialisations. Confidence intervals come from a case-resampling bootstrap: every replicate
is refitted from the best full-data optima, and any derived quantity (compute-optimal N and D,
tokens per parameter) gets its interval from the same replicates.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
# Chinchilla's initialisation grid
GRID_EXP = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
MAX_EXPONENT = 5.0


class FitError(ValueError):
    """Too few or degenerate points to fit a law."""


# ----------------------------------------------------------------------------- objective

def _objective(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float):
    """Huber loss of log-space residuals and its gradient (hand-written: this runs 10^5 times)."""
    k = logx.shape[0]  # variables: 1 (N or D) or 2 (N and D)
    z = np.empty((k + 1, logx.shape[1]))
    z[0] = theta[2 * k]
    for j in range(k):
        z[j + 1] = theta[j] - theta[k + j] * logx[j]
    m = z.max(axis=0)
    s = np.exp(z - m)
    tot = s.sum(axis=0)
    r = m + np.log(tot) - logy
    w = s / tot  # softmax weights: d pred / d z
    a = np.abs(r)
    f = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)).sum()
    g_r = np.clip(r, -delta, delta)
    gw = g_r * w
    grad = np.empty_like(theta)
    grad[:k] = gw[1:].sum(axis=1)
    grad[k:2 * k] = -(gw[1:] * logx).sum(axis=1)
    grad[2 * k] = gw[0].sum()
    scale = 1.0 / delta ** 2  # L-BFGS-B's ftol is absolute below 1: keep the objective large
    return float(f) * scale, grad * scale


def _minimise(theta0: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float):
    k = logx.shape[0]
    bounds = [(None, None)] * k + [(0.0, MAX_EXPONENT)] * k + [(None, None)]
    res = minimize(_objective, theta0, args=(logx, logy, delta), jac=True, method="L-BFGS-B",
                   bounds=bounds, options=dict(maxiter=1000, ftol=1e-12, gtol=1e-8))
    return res.x, float(res.fun)


def init_grid(k: int) -> np.ndarray:
    """Chinchilla's grid of starting points, laid out as theta = (a[, b], alpha[, beta], e)."""
    rows = [list(ab) + list(ex) + [e] for ab in itertools.product(GRID_AB, repeat=k)
            for ex in itertools.product(GRID_EXP, repeat=k) for e in GRID_E]
    return np.array(rows, dtype=float)


def _screen(grid: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float, keep: int) -> np.ndarray:
    """The ``keep`` grid points with the lowest objective (evaluated vectorised)."""
    k = logx.shape[0]
    z = [np.broadcast_to(grid[:, 2 * k:2 * k + 1], (len(grid), logx.shape[1]))]
    z += [grid[:, j:j + 1] - grid[:, k + j:k + j + 1] * logx[j][None] for j in range(k)]
    pred = logsumexp(np.stack(z), axis=0)
    f = huber(delta, pred - logy[None]).sum(axis=1)
    return grid[np.argsort(f, kind="stable")[:keep]]


def _best_fit(starts: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float):
    best, best_f, optima = None, math.inf, []
    for t0 in starts:
        theta, f = _minimise(t0, logx, logy, delta)
        if not np.all(np.isfinite(theta)):
            continue
        optima.append((f, theta))
        if f < best_f:
            best, best_f = theta, f
    if best is None:
        raise FitError("the fit did not converge from any starting point")
    optima.sort(key=lambda t: t[0])
    return best, best_f, [t for _, t in optima]


# ----------------------------------------------------------------------------- results

@dataclass
class Fit:
    """A fitted law with bootstrap samples of its parameters (natural scale: E, A, alpha, ...)."""

    variables: tuple[str, ...]  # ("N",), ("D",), ("C",) or ("N", "D")
    theta: np.ndarray  # log-space parameters (a[, b], alpha[, beta], e)
    samples: np.ndarray  # bootstrap replicates of theta, shape (B, len(theta))
    n_points: int
    objective: float
    level: float = 0.95

    @property
    def k(self) -> int:
        return len(self.variables)

    @staticmethod
    def natural(theta: np.ndarray, k: int) -> dict[str, float]:
        names = (("A", "alpha"), ("B", "beta"))
        out = {"E": float(np.exp(theta[2 * k]))}
        for j in range(k):
            out[names[j][0]] = float(np.exp(theta[j]))
            out[names[j][1]] = float(theta[k + j])
        return out

    @property
    def params(self) -> dict[str, float]:
        return self.natural(self.theta, self.k)

    def interval(self, fn: Callable[[dict[str, float]], float]) -> tuple[float, float]:
        """Percentile bootstrap interval of any function of the natural parameters."""
        if len(self.samples) < 2:
            return (math.nan, math.nan)
        vals = np.array([fn(self.natural(t, self.k)) for t in self.samples], dtype=float)
        vals = vals[np.isfinite(vals)]
        if len(vals) < 2:
            return (math.nan, math.nan)
        q = (1 - self.level) / 2
        return float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))

    @property
    def ci(self) -> dict[str, tuple[float, float]]:
        return {name: self.interval(lambda p, n=name: p[n]) for name in self.params}

    def predict(self, *xs) -> np.ndarray:
        p = self.params
        out = p["E"] + p["A"] / np.asarray(xs[0], dtype=float) ** p["alpha"]
        if self.k == 2:
            out = out + p["B"] / np.asarray(xs[1], dtype=float) ** p["beta"]
        return out

    def formula(self, digits: int = 3) -> str:
        p, ci = self.params, self.ci
        v = self.variables

        def fmt(name: str) -> str:
            lo, hi = ci[name]
            return f"{p[name]:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"

        s = f"L({', '.join(v)}) = {fmt('E')} + {fmt('A')} / {v[0]}^{fmt('alpha')}"
        if self.k == 2:
            s += f" + {fmt('B')} / {v[1]}^{fmt('beta')}"
        return s

    def to_dict(self) -> dict:
        return {"law": f"L({', '.join(self.variables)})", "variables": list(self.variables),
                "params": self.params, "ci": {k: list(v) for k, v in self.ci.items()},
                "ci_level": self.level, "n_points": self.n_points, "bootstrap": len(self.samples),
                "formula": self.formula()}


def single_threaded(fn):
    """Run ``fn`` with one BLAS thread: L-BFGS-B's tiny BLAS calls are ~20x slower threaded."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)
    return wrapper


@single_threaded
def fit_law(xs: Sequence[Sequence[float]] | Sequence[float], losses: Sequence[float], *,
            bootstrap: int = 200, seed: int = 0, delta: float = HUBER_DELTA,
            variables: Optional[tuple[str, ...]] = None, screen: Optional[int] = 32,
            level: float = 0.95) -> Fit:
    """Fit ``L = E + A/x1^alpha [+ B/x2^beta]`` to points ``xs`` (one array per variable).

    ``screen`` keeps that many best points of the initialisation grid (all of it with None:
    Chinchilla's 4,500 starts for two variables, slower for no difference we could measure). 32
    found the same optimum as 128 on 50 random laws (1 and 2 variables, noise 0.2-5%) in 28% of
    the time; the report fits five laws, each again per bootstrap sample.
    """
    arr = np.asarray(xs, dtype=float)
    logx = np.log(arr.reshape(1, -1) if arr.ndim == 1 else arr)
    y = np.asarray(losses, dtype=float)
    k = logx.shape[0]
    if k not in (1, 2):
        raise FitError(f"expected 1 or 2 variables, got {k}")
    variables = variables or (("N",) if k == 1 else ("N", "D"))
    ok = np.all(np.isfinite(logx), axis=0) & np.isfinite(y) & (y > 0)
    logx, y = logx[:, ok], y[ok]
    n_params = 2 * k + 1
    if y.size < n_params:
        raise FitError(f"{y.size} valid points are too few to fit {n_params} parameters "
                       f"of L({', '.join(variables)})")
    if any(np.ptp(logx[j]) == 0 for j in range(k)):
        raise FitError(f"all points share one value of {variables[int(np.argmin(np.ptp(logx, axis=1)))]}")
    logy = np.log(y)
    grid = init_grid(k)
    if screen is not None and screen < len(grid):
        grid = _screen(grid, logx, logy, delta, screen)
    theta, f, optima = _best_fit(grid, logx, logy, delta)
    starts = _distinct(optima, 3)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, y.size, y.size)
        if any(np.ptp(logx[j, idx]) == 0 for j in range(k)):
            continue  # a degenerate resample identifies no exponent
        try:
            samples.append(_best_fit(starts, logx[:, idx], logy[idx], delta)[0])
        except FitError:
            continue
    return Fit(variables, theta, np.array(samples).reshape(-1, n_params), int(y.size), f, level)


def _distinct(optima: list[np.ndarray], n: int, tol: float = 1e-3) -> np.ndarray:
    out: list[np.ndarray] = []
    for t in optima:
        if all(np.max(np.abs(t - o)) > tol for o in out):
            out.append(t)
        if len(out) == n:
            break
    return np.array(out)


# ----------------------------------------------------------------------------- compute-optimal

def chinchilla_optimum(p: dict[str, float], compute: float, flops_per_param_token: float = 6.0):
    """Closed-form argmin of L(N, D) subject to C = 6 N D (Hoffmann et al., eq. 4)."""
    a, b = p["alpha"], p["beta"]
    if a <= 0 or b <= 0:
        return math.nan, math.nan
    g = (a * p["A"] / (b * p["B"])) ** (1.0 / (a + b))
    n = g * (compute / flops_per_param_token) ** (b / (a + b))
    return n, compute / (flops_per_param_token * n)


@dataclass
class IsoFlopResult:
    """Chinchilla approach 2: a parabola in log N per compute level, then power laws in C."""

    levels: list[dict]  # per level: compute, n_opt, loss_opt, coef (parabola), points
    n_law: Optional[tuple[float, float]] = None  # (G, a): N_opt = G * C^a
    d_law: Optional[tuple[float, float]] = None  # (H, b): D_opt = H * C^b
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # (logG, a, logH, b)
    level: float = 0.95

    def interval(self, fn: Callable[[np.ndarray], float]) -> tuple[float, float]:
        if len(self.samples) < 2:
            return (math.nan, math.nan)
        vals = np.array([fn(s) for s in self.samples], dtype=float)
        vals = vals[np.isfinite(vals)]
        if len(vals) < 2:
            return (math.nan, math.nan)
        q = (1 - self.level) / 2
        return float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))

    def predict(self, compute: float) -> tuple[float, float]:
        if self.n_law is None or self.d_law is None:
            return math.nan, math.nan
        return self.n_law[0] * compute ** self.n_law[1], self.d_law[0] * compute ** self.d_law[1]

    def to_dict(self) -> dict:
        out = {"levels": self.levels, "bootstrap": len(self.samples)}
        if self.n_law is not None:
            out["n_opt"] = {"G": self.n_law[0], "a": self.n_law[1], "a_ci": list(self.interval(lambda s: s[1]))}
            out["d_opt"] = {"H": self.d_law[0], "b": self.d_law[1], "b_ci": list(self.interval(lambda s: s[3]))}
        return out


def _level_minima(groups: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]]):
    """For each (compute, N, D, loss) group whose parabola has its minimum inside the sizes tried:
    (C, N_opt, D_opt, L_opt, coef)."""
    out = []
    for c, n, d, loss in groups:
        if len(np.unique(n)) < 3:
            continue
        x = np.log(n)
        coef = np.polyfit(x, loss, 2)
        if coef[0] <= 0:
            continue  # concave or flat: no interior minimum at this level
        x_opt = -coef[1] / (2 * coef[0])
        if not x.min() <= x_opt <= x.max():
            continue  # the vertex lies outside the sizes tried: an extrapolation, not a measured minimum
        # D at the optimum from the level's own tokens-per-FLOP relation (log-linear in N)
        dcoef = np.polyfit(x, np.log(d), 1)
        out.append((c, float(np.exp(x_opt)), float(np.exp(np.polyval(dcoef, x_opt))),
                    float(np.polyval(coef, x_opt)), coef))
    return out


def _power_law(cs: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.log(cs), np.log(ys), 1)
    return float(intercept), float(slope)


@single_threaded
def fit_isoflop(compute: Sequence[float], n: Sequence[float], d: Sequence[float], loss: Sequence[float],
                level_ids: Sequence, *, bootstrap: int = 200, seed: int = 0, level: float = 0.95) -> IsoFlopResult:
    """Approach 2 over runs grouped by ``level_ids`` (the IsoFLOP level each run belongs to)."""
    c, n, d, loss = (np.asarray(v, dtype=float) for v in (compute, n, d, loss))
    ids = np.asarray(level_ids)
    keys = [k for k in dict.fromkeys(ids.tolist()) if k is not None]

    def groups(resample: Optional[np.random.Generator] = None):
        out = []
        for key in keys:
            sel = np.flatnonzero(ids == key)
            if resample is not None:
                sel = resample.choice(sel, size=len(sel), replace=True)
            out.append((float(np.median(c[sel])), n[sel], d[sel], loss[sel]))
        return out

    minima = _level_minima(groups())
    levels = [{"compute": m[0], "n_opt": m[1], "d_opt": m[2], "loss_opt": m[3],
               "parabola": [float(v) for v in m[4]]} for m in minima]
    res = IsoFlopResult(levels=levels, level=level)
    if len(minima) < 2:
        return res
    cs = np.array([m[0] for m in minima])
    lg, a = _power_law(cs, np.array([m[1] for m in minima]))
    lh, b = _power_law(cs, np.array([m[2] for m in minima]))
    res.n_law, res.d_law = (math.exp(lg), a), (math.exp(lh), b)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        mins = _level_minima(groups(rng))
        if len(mins) < 2:
            continue
        cs_b = np.array([m[0] for m in mins])
        samples.append([*_power_law(cs_b, np.array([m[1] for m in mins])),
                        *_power_law(cs_b, np.array([m[2] for m in mins]))])
    res.samples = np.array(samples).reshape(-1, 4)
    return res
