"""Predicted vs measured peak training memory on CPU (the planner's validation).

    python benchmarks/bench_memory.py [--quick] [--malloc-default]

Each config trains 3 steps (forward, backward, fused AdamW step) in a fresh process
(``scalelm.analysis.memprobe``). Measured: the peak RSS above the process's RSS before the
model was built, with glibc told to return freed memory (``MALLOC_MMAP_THRESHOLD_=65536``),
and the peak of live tensor bytes from the torch profiler's allocation events. Predicted:
``scalelm.analysis.memory.estimate_memory``. Writes ``benchmarks/results/memory.json``;
exits 1 if a prediction is off the RSS by more than 15%.
"""

from __future__ import annotations

import argparse
import sys

from _util import log, machine, wait_quiet, write_json

from scalelm.analysis.memory import Layout, estimate_memory
from scalelm.analysis.memprobe import measure
from scalelm.config import ModelConfig

GPT = dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256)
LLAMA = dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
             pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)

# name, model, batch, seq, precision, activation checkpointing: spans width, depth, length, batch, AC
CASES = [
    ("base 4x256", GPT, 8, 256, "fp32", False),
    ("base bf16", GPT, 8, 256, "bf16", False),
    ("base +AC", GPT, 8, 256, "fp32", True),
    ("wide 4x768", dict(GPT, n_embd=768, n_head=12, vocab_size=4096), 2, 128, "fp32", False),
    ("deep 16x256", dict(GPT, n_layer=16, vocab_size=2048), 8, 256, "fp32", False),
    ("long seq 1024", dict(GPT, block_size=1024, vocab_size=2048), 4, 1024, "fp32", False),
    ("long +AC bf16", dict(GPT, block_size=1024, vocab_size=2048, n_layer=8), 4, 1024, "bf16", True),
    ("batch 32", dict(GPT, vocab_size=2048), 32, 256, "fp32", False),
    ("llama GQA", LLAMA, 8, 256, "fp32", False),
    ("llama bf16 +AC", LLAMA, 8, 256, "bf16", True),
]
QUICK = {"base 4x256", "wide 4x768", "long +AC bf16", "batch 32", "llama bf16 +AC"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK)} configs instead of {len(CASES)}")
    ap.add_argument("--malloc-default", action="store_true",
                    help="also measure with glibc's default malloc (keeps freed memory: RSS runs high)")
    ap.add_argument("--tolerance", type=float, default=0.15)
    args = ap.parse_args()
    if not wait_quiet(60):
        log("warning: the machine is busy; memory does not depend on load, timings are not taken")
    rows = []
    hdr = f"{'config':<16}{'prec':<6}{'AC':<4}{'params':>11}{'predicted':>11}{'RSS':>10}{'ratio':>7}{'tensors':>10}{'ratio':>7}  peak at"
    print(hdr)
    for name, m, B, T, prec, ac in CASES:
        if args.quick and name not in QUICK:
            continue
        spec = dict(model=m, batch=B, seq_len=T, precision=prec, ac=ac)
        got = measure(spec)
        est = estimate_memory(ModelConfig(**m), Layout(ac=ac), B, T, prec, device_type="cpu")
        row = dict(name=name, spec=spec, params=got["params"], predicted=est.peak, phase=est.phase,
                   rss=got["peak"], ratio_rss=est.peak / got["peak"], tensor_peak=got["tensor_peak"],
                   ratio_tensors=est.peak / got["tensor_peak"] if got["tensor_peak"] else None)
        if args.malloc_default:
            row["rss_default_malloc"] = measure(spec, malloc_default=True)["peak"]
        rows.append(row)
        mib = lambda x: f"{x / 2**20:.1f}M" if x else "-"  # noqa: E731
        print(f"{name:<16}{prec:<6}{'yes' if ac else '-':<4}{row['params']:>11,}{mib(est.peak):>11}"
              f"{mib(got['peak']):>10}{row['ratio_rss']:>7.3f}{mib(got['tensor_peak']):>10}"
              f"{row['ratio_tensors'] or float('nan'):>7.3f}  {est.phase}"
              + (f"   default malloc RSS {mib(row['rss_default_malloc'])}" if args.malloc_default else ""),
              flush=True)
    worst = max(abs(r["ratio_rss"] - 1) for r in rows)
    ok = worst <= args.tolerance
    print(f"\nworst |predicted/RSS - 1| = {worst:.1%} over {len(rows)} configs: "
          f"{'within' if ok else 'OUTSIDE'} ±{args.tolerance:.0%}")
    path = write_json("memory.json", dict(machine=machine(peaks=False), tolerance=args.tolerance, worst=worst, ok=ok,
                                          rows=rows, command="python benchmarks/bench_memory.py"
                                          + (" --quick" if args.quick else "")))
    log(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
