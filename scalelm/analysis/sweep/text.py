"""The Markdown of a sweep report (``SWEEP_DIR/report.md``, also printed by ``scalelm report``)."""

from __future__ import annotations

import math
from typing import Optional

from .plan import human


def _ci(lo_hi, digits: int = 3) -> str:
    lo, hi = lo_hi
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f" [{lo:.{digits}g}, {hi:.{digits}g}]"


def _hci(lo_hi) -> str:
    lo, hi = lo_hi
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f" [{human(lo)}, {human(hi)}]"


def _param(fit: dict, name: str) -> str:
    return f"{fit['params'][name]:.3g}{_ci(fit['ci'][name])}"


def _contains(fit: dict, name: str, value: float) -> Optional[bool]:
    lo, hi = fit["ci"][name]
    if lo is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return lo <= value <= hi


def render(plan: dict, records: list[dict], summary: dict, res: dict) -> str:
    fits, iso = summary["fits"], summary["isoflop"]
    ok = [r for r in records if r.get("val_loss") is not None]
    L = []
    data = plan["data"]
    fam = plan["family"]
    rec = plan["recipe"]
    L.append(f"# Scaling study: {data['path']}\n")
    wall = sum(r.get("wall_seconds") or 0 for r in ok)
    L.append(f"{summary['runs_done']} of {summary['runs_planned']} planned runs done, "
             f"{summary['compute']:.3g} training FLOPs, {wall / 60:.1f} minutes of training processes. "
             f"Data: {data['tokenizer']} tokens, vocabulary {data['vocab_size']}, {human(data['train_tokens'])} "
             f"training tokens. Family: width = {fam['head_dim']} x heads, layers = width / {fam['aspect']:g}, "
             f"context {rec['seq_len']}, {rec['tokens_per_step']:,} tokens per step, learning rate "
             f"{'fixed' if rec['lr'] == 'fixed' else 'by Kaplan et al. eq. D.1 per size'}, cosine to 10%.\n")
    if not ok:
        L.append("No run has finished yet.\n")
        return "\n".join(L)
    L.append("N is the non-embedding parameter count (Kaplan's convention), N_total includes the token and "
             "position embeddings, D is training tokens, C training FLOPs (exact: 6N + attention + LM head, per "
             "token), L the final validation loss in nats per token. Intervals are 95% bootstrap percentiles "
             f"({summary['fits'].get('L(N,D)', {}).get('bootstrap', 0)} resamples that identify every exponent).\n")
    L.append("## Fitted laws\n")
    for key, title in (("L(N,D)", "all runs (approach 3)"), ("L(Ntotal,D)", "all runs, N with embeddings"),
                       ("L(N)", "frontier: best loss per size"), ("L(D)", "frontier: best loss per length"),
                       ("L(C)", "frontier: best loss per compute")):
        f = fits.get(key)
        if f is None:
            continue
        L.append(f"- {title}: `{f['formula']}`" if "formula" in f else f"- {title}: not fitted ({f['error']})")
    nd = fits.get("L(N,D)", {})
    if "params" in nd:
        fo = res["_fits"]["L(N,D)"]
        a = fo.interval(lambda p: p["beta"] / (p["alpha"] + p["beta"]))
        p = nd["params"]
        L.append(f"- implied compute-optimal scaling (C = 6ND): N_opt ~ C^{p['beta'] / (p['alpha'] + p['beta']):.3f}"
                 f"{_ci(a)}, D_opt ~ C^{p['alpha'] / (p['alpha'] + p['beta']):.3f}")
    if iso and iso.get("n_opt"):
        L.append(f"- IsoFLOP minima (approach 2, {len(iso['levels'])} levels): N_opt ~ C^{iso['n_opt']['a']:.3f}"
                 f"{_ci(iso['n_opt']['a_ci'])}, D_opt ~ C^{iso['d_opt']['b']:.3f}{_ci(iso['d_opt']['b_ci'])}")
    elif iso is not None:
        L.append(f"- IsoFLOP minima: {len(iso['levels'])} level(s) with an interior minimum; two are needed "
                 f"for power laws in C")
    if summary.get("warnings"):
        L.append("\nWarnings (read the numbers above with these in mind):\n")
        L += [f"- {w}" for w in summary["warnings"]]
    L.append("")
    L += _predictions(summary["predictions"], summary["compute"])
    L += _comparison(plan, ok, fits, iso)
    L += _runs_table(ok, data["train_tokens"])
    L += _system(summary["system"])
    if summary.get("plots"):
        L.append("## Plots\n")
        L += [f"![{p}]({p})" for p in summary["plots"]]
        L.append("")
    return "\n".join(L) + "\n"


def _predictions(preds: list[dict], c_sweep: float) -> list[str]:
    if not preds:
        return []
    L = ["## Compute-optimal predictions\n",
         f"For budgets 10x and 100x this sweep's {c_sweep:.3g} FLOPs (one run each).\n",
         "| budget | method | model | N | D | D/N | predicted loss |", "|---|---|---|---:|---:|---:|---:|"]
    for p in preds:
        loss = f"{p['loss']:.3f}{_ci(p.get('loss_ci', (None, None)))}" if p.get("loss") is not None else ""
        model = p.get("model", "")
        if p.get("at_family_edge"):
            model += " (family edge)"
        L.append(f"| {p['multiplier']}x ({p['compute']:.2g}) | {p['method']} | {model} | {human(p['n'])}"
                 f"{_hci(p.get('n_ci', (None, None)))} | {human(p['d'])}{_hci(p.get('d_ci', (None, None)))} | "
                 f"{p['tokens_per_param']:.1f}{_ci(p.get('tokens_per_param_ci', (None, None)))} | {loss} |")
    L.append("")
    for p in preds:
        if p.get("command"):
            L.append(f"To train the {p['multiplier']}x model ({p['d'] / 1e6:.3g}M tokens, the sweep's recipe):"
                     f"\n\n    {p['command']}\n")
    return L


def _comparison(plan: dict, ok: list[dict], fits: dict, iso: Optional[dict]) -> list[str]:
    L = ["## Against the published laws\n"]
    nd, ln = fits.get("L(N,D)", {}), fits.get("L(N)", {})
    if "params" in nd:
        for name, pub in (("alpha", 0.34), ("beta", 0.28)):
            inside = _contains(nd, name, pub)
            verdict = "" if inside is None else (" (inside the interval)" if inside else " (outside the interval)")
            L.append(f"- Chinchilla {name} = {pub}: here {_param(nd, name)}{verdict}")
    if "params" in ln:
        inside = _contains(ln, "alpha", 0.076)
        verdict = "" if inside is None else (" (inside the interval)" if inside else " (outside the interval)")
        L.append(f"- Kaplan alpha_N = 0.076 (L(N) at convergence): frontier L(N) here {_param(ln, 'alpha')}{verdict}")
    n = [r["params"] for r in ok]
    d = [r["tokens"] for r in ok]
    epochs = max(r["tokens"] for r in ok) / plan["data"]["train_tokens"]
    L.append("")
    L.append(f"What differs from those studies: N spans {human(min(n))} to {human(max(n))} non-embedding parameters "
             f"(Kaplan 768 to 1.5B, Chinchilla 44M to 16B); D spans {human(min(d))} to {human(max(d))} "
             f"{plan['data']['tokenizer']} tokens (loss per {plan['data']['tokenizer']} token is not loss per BPE token, "
             f"so E, A and B are in other units); the longest run reads the training data {epochs:.2g} times; one learning "
             f"rate per size from a rule, not tuned; {len(ok)} runs in total, so the intervals are wide. Kaplan's "
             f"alpha_N = 0.076 describes L = (N_c/N)^alpha with no irreducible term; a law with a fitted E "
             f"(Chinchilla's form, used here) puts the floor in E and gives the reducible part a larger exponent, "
             f"so 0.076 and 0.34 are not the same quantity.\n")
    return L


def _runs_table(ok: list[dict], train_tokens: int) -> list[str]:
    L = ["## Runs\n", "| run | groups | N | N_total | D | C | D/N | epochs | val loss | tokens/s | peak MB | minutes |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(ok, key=lambda r: (r["flops"], r["params"])):
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else ""
        mem = f"{r['peak_mem_mb']:,.0f}" if r.get("peak_mem_mb") else ""
        L.append(f"| {r['name']} | {','.join(r['groups'])} | {human(r['params'])} | {human(r['params_total'])} | "
                 f"{human(r['tokens'])} | {r['flops']:.2e} | {r['tokens'] / r['params']:.1f} | "
                 f"{r['tokens'] / train_tokens:.2f} | {r['val_loss']:.4f} | {tps} | {mem} | "
                 f"{(r.get('wall_seconds') or 0) / 60:.1f} |")
    L.append("")
    return L


def _system(sysd: dict) -> list[str]:
    L = ["## Scaling of the system\n", "Throughput (median over each run's log intervals, evaluation excluded), "
         "model FLOPs utilisation against the measured peak of the precision used, and peak memory (CPU: "
         "the trainer process's peak RSS, which includes ~0.3-0.5 GB of Python and torch).\n",
         "| shape | N | N_total | runs | tokens/s | model GFLOP/s | MFU | peak MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sysd["sizes"]:
        tps = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else ""
        gf = f"{s['flops_per_s'] / 1e9:.1f}" if s.get("flops_per_s") else ""
        mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else ""
        mem = f"{s['peak_mem_mb']:,.0f}" if s.get("peak_mem_mb") else ""
        L.append(f"| {s['shape']} | {human(s['params'])} | {human(s['params_total'])} | {s['runs']} | {tps} | {gf} | "
                 f"{mfu} | {mem} |")
    L.append("")
    dp = sysd["data_parallel"]
    if dp:
        L.append("Data parallelism (one size, same global batch, same micro-batch shape):\n")
        L += ["| processes x threads | tokens/s | load (1 min) | note |", "|---|---:|---:|---|"]
        for row in dp:
            tps = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else ""
            note = "failed: " + row["error"].strip().splitlines()[-1][:120] if row.get("error") else row["shape"]
            L.append(f"| {row['config']} | {tps} | {row.get('loadavg_1m', 0):.2f} | {note} |")
        L.append("")
        for e in sysd["dp_efficiency"]:
            unit = "GPUs" if e["threads"] is None else f"processes x {e['threads']} thread"
            parts = [f"{e['processes']} {unit}: {e['tokens_per_s']:,.0f} tokens/s"]
            if "per_process" in e:
                parts.append(f"efficiency {e['per_process']:.2f} of {e['processes']} x one process")
            if "same_cores" in e:
                parts.append(f"{e['same_cores']:.2f}x one process using the same {e['processes'] * e['threads']} cores")
            L.append("- " + ", ".join(parts))
        L.append("")
    else:
        L.append("Data-parallel check: not run (`--no-dp-check`, or the sweep has not reached it).\n")
    return L
