"""Decode speed of scalelm's generation against Hugging Face ``generate`` on the same weights.

    python benchmarks/bench_generate.py                    # fp32 only, both models
    python benchmarks/bench_generate.py --dtypes float32,bfloat16 --plain 6L-384   # the README table
    python benchmarks/bench_generate.py --quick            # small model, batch 1, few tokens

For each model (random weights, moved to ``transformers`` with ``scalelm.model.hf.to_hf``), batch size
and dtype: greedy decoding of ``--new-tokens`` tokens after a ``--prompt-len`` token prompt, end of
text ignored, scalelm and HF alternating (who goes first alternates too), ``--rounds`` times.
Reported: medians of decode tokens/s (tokens after the first, over the time after the first),
time to first token (prefill + first sample), the median of the per-round speed ratios, and
the memory-bandwidth bound: weight bytes read per decode step (every matrix once, the LM head
in full, plus the KV cache at the mean context) over the best bandwidth measured just before
and after that row's runs (a 256 MiB tensor copy and a read; the load of a shared machine drifts). Whether both produced the same greedy tokens is checked too.
Writes ``benchmarks/results/generate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics as st
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scalelm.config import Config, ModelConfig, apply_preset  # noqa: E402
from scalelm.fileio import atomic_write_text  # noqa: E402
from scalelm.generate.generator import Generator  # noqa: E402
from scalelm.generate.sampling import SamplingParams  # noqa: E402
from scalelm.model import GPT  # noqa: E402
from scalelm.model.hf import to_hf  # noqa: E402

MODELS = {
    # the char-shakespeare shape (6 layers, 384 wide) with the GPT-2 vocabulary
    "6L-384": lambda: ModelConfig(vocab_size=50257, block_size=256, n_layer=6, n_head=6, n_embd=384),
    "gpt2-124m": lambda: apply_preset(Config(), "gpt2-124m").model,
}


def bandwidth(mib: int = 256, reps: int = 7) -> dict:
    """Best bytes/s of copying (read + write counted) and of reading a buffer far larger than L3."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    copy, read = [], []
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        copy.append(2 * a.numel() * 4 / (time.perf_counter() - t))
        t = time.perf_counter()
        a.sum()
        read.append(a.numel() * 4 / (time.perf_counter() - t))
    return {"copy_GBps": max(copy) / 1e9, "read_GBps": max(read) / 1e9}


def bytes_per_step(model: GPT, batch: int, ctx: float, elt: int) -> float:
    """Bytes one decode step must read: every weight once (the LM head in full; the embedding
    tables only one row per token, counted as nothing) plus the KV cache at context ``ctx``."""
    cfg = model.cfg
    emb = sum(m.weight.numel() for m in (model.tok_emb, model.pos_emb) if m is not None)
    weights = model.num_params() - emb + model.lm_head.weight.numel()
    kv = 2 * cfg.n_layer * batch * cfg.kv_heads * cfg.head_dim * ctx
    return (weights + kv) * elt


class FirstTokenTimer:
    """An HF streamer that only notes when the first generated tokens arrive."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def run_scalelm(gen: Generator, prompts: torch.Tensor, n: int):
    rows = [p.tolist() for p in prompts]
    t0 = time.perf_counter()
    first, out = None, {}
    for ev in gen.stream(rows, n, sampling=SamplingParams(temperature=0.0), ignore_eos=True, completions=out):
        if first is None and ev.token is not None:
            first = time.perf_counter()
    end = time.perf_counter()
    return t0, first, end, [out[i].tokens for i in sorted(out)]


def run_hf(hf, prompts: torch.Tensor, n: int):
    timer = FirstTokenTimer()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None, streamer=timer)
    end = time.perf_counter()
    return t0, timer.first, end, out[:, prompts.shape[1]:].tolist()


def measure(fn, batch: int, n: int) -> dict:
    t0, first, end, tokens = fn()
    return {"ttft_ms": 1e3 * (first - t0), "decode_tok_s": batch * (n - 1) / (end - first),
            "total_s": end - t0, "tokens": tokens}


def bench_one(name: str, dtype: torch.dtype, batch: int, args) -> dict:
    torch.manual_seed(0)
    cfg = MODELS[name]()
    model = GPT(cfg).eval().to(dtype)
    hf = to_hf(model)
    gen = Generator(model)
    gen_plain = Generator(model, pack=False) if name in args.plain.split(",") else None
    prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens
    systems = {"scalelm": lambda: measure(lambda: run_scalelm(gen, prompts, n), batch, n),
               "hf": lambda: measure(lambda: run_hf(hf, prompts, n), batch, n)}
    if gen_plain is not None:
        systems["scalelm_nn_linear"] = lambda: measure(lambda: run_scalelm(gen_plain, prompts, n), batch, n)
    systems["scalelm"]()  # warm-up: first-call allocations and kernel selection
    systems["hf"]()
    load = os.getloadavg()[0]
    bw = bandwidth()  # measured beside each row: the load of a shared machine drifts
    runs = {k: [] for k in systems}
    order = list(systems)
    for r in range(args.rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            runs[k].append(systems[k]())
            print(f"  {name} {str(dtype)[6:]} b{batch} round {r}: {k} {runs[k][-1]['decode_tok_s']:.1f} tok/s, "
                  f"ttft {runs[k][-1]['ttft_ms']:.0f} ms", file=sys.stderr, flush=True)
    elt = torch.finfo(dtype).bits // 8
    need = bytes_per_step(model, batch, args.prompt_len + n / 2, elt)
    bw_after = bandwidth()
    bw = {k: max(bw[k], bw_after[k]) for k in bw}
    best_bw = max(bw["copy_GBps"], bw["read_GBps"]) * 1e9
    row = {"model": name, "dtype": str(dtype)[6:], "batch": batch, "prompt_len": args.prompt_len,
           "bandwidth": bw, "load_avg_1m": [load, os.getloadavg()[0]],
           "new_tokens": n, "params": model.num_params(), "bytes_per_step": need,
           "bound_tok_s": batch * best_bw / need,
           "same_greedy_tokens": runs["scalelm"][0]["tokens"] == runs["hf"][0]["tokens"]}
    for k, rs in runs.items():
        row[k] = {"decode_tok_s": st.median(x["decode_tok_s"] for x in rs),
                  "best_decode_tok_s": max(x["decode_tok_s"] for x in rs),
                  "ttft_ms": st.median(x["ttft_ms"] for x in rs),
                  "runs_decode_tok_s": [round(x["decode_tok_s"], 2) for x in rs],
                  "runs_ttft_ms": [round(x["ttft_ms"], 1) for x in rs]}
    ratios = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs["scalelm"], runs["hf"])]
    row["speedup_vs_hf"] = st.median(ratios)
    row["speedup_runs"] = [round(x, 2) for x in ratios]
    row["ttft_ratio_hf_over_scalelm"] = st.median(
        b["ttft_ms"] / a["ttft_ms"] for a, b in zip(runs["scalelm"], runs["hf"]))
    return row


def table(rows: list[dict], bw: Optional[dict] = None) -> str:
    lines = ["| model | dtype | batch | scalelm tok/s | HF tok/s | speed-up (median of rounds) | "
             "scalelm TTFT ms | HF TTFT ms | GB/s | bandwidth bound tok/s | scalelm % of bound | same tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s, h = r["scalelm"], r["hf"]
        gbps = max((r.get("bandwidth") or bw).values())
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {s['decode_tok_s']:.1f} | "
                     f"{h['decode_tok_s']:.1f} | {r['speedup_vs_hf']:.2f}x | {s['ttft_ms']:.0f} | {h['ttft_ms']:.0f} | "
                     f"{gbps:.1f} | {r['bound_tok_s']:.0f} | {100 * s['decode_tok_s'] / r['bound_tok_s']:.0f}% | "
                     f"{'yes' if r['same_greedy_tokens'] else 'no'} |")
    fp32 = {(r["model"], r["batch"]): r for r in rows if r["dtype"] == "float32"}
    extra = [(r, fp32[(r["model"], r["batch"])]) for r in rows
             if r["dtype"] != "float32" and (r["model"], r["batch"]) in fp32]
    if extra:
        lines += ["", "scalelm in bf16 against HF in fp32 (its default on CPU): ratio of the medians above",
                  "| model | batch | scalelm bf16 tok/s | HF fp32 tok/s | speed-up |", "|---|---:|---:|---:|---:|"]
        for r, f in extra:
            a, b = r["scalelm"]["decode_tok_s"], f["hf"]["decode_tok_s"]
            lines.append(f"| {r['model']} | {r['batch']} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    plain = [r for r in rows if "scalelm_nn_linear" in r]
    if plain:
        lines += ["", "scalelm's packed weights against plain nn.Linear (same rounds)",
                  "| model | dtype | batch | packed tok/s | nn.Linear tok/s | speed-up (median of rounds) |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in plain:
            a, b = r["scalelm"], r["scalelm_nn_linear"]
            ratio = st.median(x / y for x, y in zip(a["runs_decode_tok_s"], b["runs_decode_tok_s"]))
            lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {a['decode_tok_s']:.1f} | "
                         f"{b['decode_tok_s']:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="alternating runs per system (median reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both systems (default 1: on a shared machine more threads "
                        "only contend; the same for both systems either way)")
    p.add_argument("--plain", default="", metavar="MODELS",
                   help="for these models (comma-separated) also time scalelm with plain nn.Linear weights")
    p.add_argument("--quick", action="store_true", help="6L-384, batch 1, 16 tokens, 1 round (a smoke test)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate.json"))
    p.add_argument("--table", metavar="JSON", help="only print the tables of an earlier results file")
    args = p.parse_args()
    if args.table:
        r = json.loads(Path(args.table).read_text())
        print(table(r["rows"], r.get("bandwidth")))
        return 0
    if args.quick:
        args.models, args.batches, args.new_tokens, args.rounds = "6L-384", "1", 16, 1
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for name in args.models.split(","):
        for dt in args.dtypes.split(","):
            for b in map(int, args.batches.split(",")):
                rows.append(bench_one(name, getattr(torch, dt), b, args))
    text = table(rows)
    print(text)
    import transformers

    result = {"rows": rows, "threads": args.threads, "rounds": args.rounds,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "command": " ".join(["python", "benchmarks/bench_generate.py", *sys.argv[1:]]), "table": text}
    if not args.quick:
        atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
