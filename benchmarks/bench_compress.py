"""Pruning and distillation of one trained model, on its own validation data (Tiny Shakespeare characters).

    python benchmarks/bench_compress.py                       # train the base (char-shakespeare, 10.7M params)
    python benchmarks/bench_compress.py --base RUN_OR_MODEL   # or start from a trained model (its data: --data)
    python benchmarks/bench_compress.py --quick               # a tiny base and a few steps: checks the pipeline

Every step is the public command (``scalelm prepare / train / prune / distill / eval``, run in this
process), so the numbers are what a user gets:

1. unstructured: dense vs magnitude vs Wanda vs SparseGPT, at 50% and at 2:4 (128 calibration
   windows from the train split, no retraining);
2. structured, to 75% and 50% of the parameters (heads, MLP neurons and embedding channels cut by
   the same fraction): no recovery, a fine-tune (next-token CE) and a distillation from the dense
   model (``kd.alpha=1``, forward KL, T=1), both for the same number of tokens;
3. a half-depth student distilled from the base vs the same student trained from scratch at equal
   compute (its extra steps pay for the teacher's forward passes: FLOPs per token of the student's
   training plus the teacher's forward, PaLM's count), and the depth-pruned base distilled the same way.

Fine-tunes run as ``scalelm distill --kd.alpha=0`` (the same loop, data order and loss as ``train
--init-from``, with the teacher never called), so the recovery runs differ only in their loss. Per model:
parameters (and nonzeros), bytes on disk, validation loss and perplexity (fp32, ``--eval-batches``
batches spread over the split), greedy decode tokens/s (batch 1, fp32) and, for trained rows, tokens
used and median training tokens/s. Unstructured zeros are stored dense and run on dense kernels:
they shrink nothing and speed nothing up here. Writes ``benchmarks/results/compress.json``
(``compress_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _util import ROOT, log, machine, timed, write_json

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
QUICK_BASE = ["--model.n_layer=4", "--model.n_head=4", "--model.n_embd=64", "--model.block_size=32",
              "--model.dropout=0.0", "--train.micro_batch_size=8"]


def scalelm(*args) -> tuple[dict, str]:
    """`scalelm ARGS` in this process: (the JSON summary it prints last, its stderr)."""
    from scalelm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    if rc:
        sys.exit(f"scalelm {' '.join(map(str, args))} failed ({rc}):\n{err.getvalue()[-3000:]}")
    text = out.getvalue().strip()
    try:
        return json.loads(text or "{}"), err.getvalue()
    except json.JSONDecodeError:  # lines of output, the summary last
        return json.loads(text.splitlines()[-1]), err.getvalue()


def prepare(work: Path) -> Path:
    data = work / "shakespeare_char"
    if not (data / "meta.json").is_file():
        scalelm("prepare", "--input", SHAKESPEARE, "--out", data, "--tokenizer", "char", "--split-by", "tail",
                "--val-fraction", "0.1", "--no-progress")
    return data


def median_train_tps(run: Path):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
    return round(statistics.median(tps), 1) if tps else None


def decode_tps(model_dir: Path, new_tokens: int, quick: bool) -> float:
    """Greedy tokens/s of batch 1 after a 16-token prompt (``quick``: one sample, no warm-up)."""
    import torch

    from scalelm.generate.generator import Generator
    from scalelm.generate.sampling import SamplingParams

    gen = Generator.from_checkpoint(model_dir, dtype="float32")
    prompt = [list(range(1, 17))]
    n = min(new_tokens, gen.cfg.block_size - 16)

    def once():
        gen.generate(prompt, n, sampling=SamplingParams(temperature=0.0), ignore_eos=True)

    if not quick:
        once()  # warm-up
    with torch.inference_mode():
        dt, _, _ = timed(once, max_retries=0 if quick else 20)
    return round(n / dt, 1)


def measure(name: str, model_dir: Path, data: Path, args, **extra) -> dict:
    """Size, validation loss/perplexity and decode speed of one model directory."""
    from scalelm.model.io import load_model
    from scalelm.runs import WEIGHTS, resolve_checkpoint

    d = resolve_checkpoint(model_dir)
    model = load_model(d)
    params = model.num_params()
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    ev, _ = scalelm("eval", d, "--data", data, "--dtype", "fp32", "--max-batches", args.eval_batches)
    row = {"name": name, "params": params, "nonzero_params": nonzero, "bytes": (d / WEIGHTS).stat().st_size,
           "n_layer": model.cfg.n_layer, "n_embd": model.cfg.n_embd, "n_head": model.cfg.n_head,
           "ffn_dim": model.cfg.ffn_dim, "val_loss": round(ev["loss"], 4), "val_perplexity": round(ev["perplexity"], 3),
           "decode_tokens_per_s": decode_tps(d, args.decode_tokens, args.quick), **extra}
    log(f"  {name:<42} params {params:>11,}  nonzero {nonzero:>11,}  val loss {row['val_loss']:.4f}  "
        f"ppl {row['val_perplexity']:.3f}  decode {row['decode_tokens_per_s']:,.0f} tok/s")
    return row


def param_count(cfg) -> int:
    """Parameters of a ``GPT`` of ``cfg``, from its shapes (checked against the model below)."""
    E, V, hd, F = cfg.n_embd, cfg.vocab_size, cfg.head_dim, cfg.ffn_dim
    q, kv, b = cfg.n_head * hd, cfg.kv_heads * hd, int(cfg.bias)
    norm = E * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attn = E * (q + 2 * kv) + b * (q + 2 * kv) + q * E + b * E
    mlp = (3 if cfg.mlp == "swiglu" else 2) * E * F + b * (F * (2 if cfg.mlp == "swiglu" else 1) + E)
    emb = V * E + (cfg.block_size * E if cfg.pos_embedding == "learned" else 0)
    return emb + cfg.n_layer * (attn + mlp + 2 * norm) + norm + (0 if cfg.tie_embeddings else V * E)


def structured_targets(cfg, fraction: float) -> dict:
    """Heads, MLP neurons and embedding channels cut by one ratio, the one whose model is closest to
    ``fraction`` of the parameters."""
    import torch

    from scalelm.model.gpt import GPT

    total, g, best = param_count(cfg), cfg.n_head // cfg.kv_heads, None
    for r in (i / 200 for i in range(40, 200)):
        heads = max(g, round(cfg.n_head * r / g) * g)
        t = dict(heads=heads, ffn_dim=max(8, round(cfg.ffn_dim * r / 8) * 8),
                 embd=max(8, round(cfg.n_embd * r / 8) * 8))
        c = dataclasses.replace(cfg, n_head=heads, n_kv_head=None if cfg.n_kv_head is None else heads // g,
                                n_embd=t["embd"], intermediate_size=t["ffn_dim"], head_size=cfg.head_dim)
        n = param_count(c)
        if best is None or abs(n / total - fraction) < abs(best[0] / total - fraction):
            best = (n, t, c)
    with torch.device("meta"):
        assert GPT(best[2]).num_params() == best[0] and GPT(cfg).num_params() == total, "param_count is stale"
    return best[1]


def train_args(args, steps: int) -> list[str]:
    common = [f"--train.max_steps={steps}", "--train.eval_every=0", f"--train.save_every={steps}",
              "--train.log_every=10", "--log.progress=false", f"--optim.lr={args.recover_lr}",
              f"--optim.min_lr={args.recover_lr / 10}", "--optim.warmup_steps=10"]
    return common + (["--train.micro_batch_size=8"] if args.quick else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny base, few steps: proves the pipeline (< 1 min)")
    ap.add_argument("--base", help="a trained model directory or RUN_DIR (default: train one here)")
    ap.add_argument("--data", help="the base's DATA_DIR (default: Tiny Shakespeare characters, prepared here)")
    ap.add_argument("--work", help="where data and runs go (default: a temporary directory, removed)")
    ap.add_argument("--base-steps", type=int, default=2000, help="training steps of the char-shakespeare base")
    ap.add_argument("--recover-steps", type=int, default=300, help="steps of each fine-tune / distillation")
    ap.add_argument("--recover-lr", type=float, default=3e-4)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=50, help="validation batches of 8 windows")
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()
    if args.quick:
        import os

        os.environ.setdefault("SCALELM_PEAK_TFLOPS", "1")  # no CPU peak measurement per run (MFU is not reported)
        args.base_steps, args.recover_steps, args.calib_samples = 20, 4, 8
        args.eval_batches, args.decode_tokens, args.recover_lr = 2, 8, 1e-3
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-compress-"))
    t_start = time.perf_counter()
    try:
        result = run(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    path = write_json("compress_quick.json" if args.quick else "compress.json", result)
    log(f"wrote {path} ({result['wall_s']:.0f} s)")


def run(args, work: Path) -> dict:
    from scalelm.model.gpt import flops_per_token
    from scalelm.model.io import read_model_config
    from scalelm.runs import resolve_checkpoint

    data = Path(args.data) if args.data else prepare(work)
    if args.base:
        base = resolve_checkpoint(args.base)
        base_train = None
    else:
        log("training the base model")
        shape = QUICK_BASE if args.quick else ["--preset", "char-shakespeare"]
        summary, _ = scalelm("train", *shape, "--data", data, "--out", work / "base",
                             f"--train.max_steps={args.base_steps}", "--train.eval_every=0",
                             f"--train.save_every={args.base_steps}", "--log.progress=false", "--train.log_every=10")
        base = resolve_checkpoint(work / "base")
        base_train = {"steps": summary["step"], "tokens": summary["tokens"], "elapsed_s": summary["elapsed_s"],
                      "median_tokens_per_s": median_train_tps(work / "base")}
    cfg = read_model_config(base)
    calib = ["--calib", data, "--calib-samples", args.calib_samples]
    result = {"machine": machine(peaks=False), "quick": args.quick, "base": str(base), "base_training": base_train,
              "data": str(data), "settings": {k: v for k, v in vars(args).items() if k not in ("work",)}}

    log("unstructured pruning")
    dense = measure("dense", base, data, args)
    rows = [dense]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for how in (["--sparsity", "0.5"], ["--pattern", "2:4"]):
            out = work / f"{method}_{how[1].replace(':', 'of')}"
            s, _ = scalelm("prune", base, "--method", method, *how, *calib, "--out", out)
            rows.append(measure(f"{method} {'50%' if how[0] == '--sparsity' else '2:4'}", out, data, args,
                                prune_s=s["seconds"], linear_sparsity=round(s["linear_sparsity"], 4)))
    result["unstructured"] = rows

    log("structured pruning, then recovery at equal tokens")
    rows = []
    for fraction in (0.75, 0.5):
        t = structured_targets(cfg, fraction)
        small = work / f"structured_{int(fraction * 100)}"
        s, _ = scalelm("prune", base, "--method", "structured", "--heads", t["heads"], "--ffn-dim", t["ffn_dim"],
                       "--embd", t["embd"], *calib, "--out", small)
        tag = f"structured {int(fraction * 100)}%"
        rows.append(measure(f"{tag}, no recovery", small, data, args, targets=t, prune_s=s["seconds"],
                            recover_tokens=0))
        for how, kd in (("fine-tune", ["--kd.alpha=0"]), ("distill", ["--kd.alpha=1", "--kd.loss=forward_kl"])):
            run_dir = work / f"{small.name}_{how}"
            summ, _ = scalelm("distill", "--teacher", base, "--student", small, "--data", data, "--out", run_dir,
                              *kd, *train_args(args, args.recover_steps))
            rows.append(measure(f"{tag}, {how}", run_dir, data, args, targets=t, recover_tokens=summ["tokens"],
                                train_s=summ["elapsed_s"], train_tokens_per_s=median_train_tps(run_dir)))
    result["structured"] = rows

    log("half-depth students at equal compute")
    half = max(1, cfg.n_layer // 2)
    student_cfg = dataclasses.replace(cfg, n_layer=half)
    s_flops = flops_per_token(student_cfg, training=True)
    t_flops = flops_per_token(cfg, training=False)
    scratch_steps = math.ceil(args.recover_steps * (s_flops + t_flops) / s_flops)
    rows = []
    pruned = work / "depth_pruned"
    scalelm("prune", base, "--method", "structured", "--n-layer", half, *calib, "--out", pruned)
    runs = [("half-depth, distilled (random init)", "student_kd", ["--kd.alpha=1", f"--model.n_layer={half}"],
             args.recover_steps, True),
            ("half-depth, from scratch (equal FLOPs)", "student_ce", ["--kd.alpha=0", f"--model.n_layer={half}"],
             scratch_steps, False),
            ("half-depth, depth-pruned + distilled", "student_pruned_kd", ["--kd.alpha=1", "--student", pruned],
             args.recover_steps, True)]
    for name, dirname, extra, steps, teacher in runs:
        run_dir = work / dirname
        summ, _ = scalelm("distill", "--teacher", base, "--data", data, "--out", run_dir, *extra,
                          *train_args(args, steps))
        flops = summ["tokens"] * (s_flops + (t_flops if teacher else 0))
        rows.append(measure(name, run_dir, data, args, steps=steps, recover_tokens=summ["tokens"],
                            train_flops=float(flops), train_s=summ["elapsed_s"],
                            train_tokens_per_s=median_train_tps(run_dir)))
    result["students"] = rows
    return result


if __name__ == "__main__":
    main()
