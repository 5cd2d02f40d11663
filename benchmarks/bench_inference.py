"""Compressed inference: fp32 / bf16 / int8 / int4 g32 / int4 g128 / onnxruntime against HF ``generate`` fp32.

    python benchmarks/bench_inference.py                   # 6L-384 and gpt2-124m, batch 1 and 8
    python benchmarks/bench_inference.py --model 6L-384=runs/x/best --data data/ts   # your trained model
    python benchmarks/bench_inference.py --speculative     # + a prompt-lookup speculative row
    python benchmarks/bench_inference.py --quick           # a smoke test (tiny shape, few tokens)

For each model shape (bench_generate.py's: 6L-384 with the GPT-2 vocabulary, and gpt2-124m): a
model is trained briefly on TinyStories (``scalelm prepare`` of the shared sample, BPE 8192, then
``--train-steps`` AdamW steps in this process) unless ``--model NAME=DIR`` gives one (with
``--data DATA_DIR`` prepared with its tokenizer). From it: an fp32 and a bf16 model directory,
``scalelm quantize`` int8, int4 g32 and int4 g128 (round to nearest) and ``scalelm export
--format onnx``. Every row is loaded from its directory the way ``scalelm generate`` loads it.

Columns, per batch size: size on disk (the weights file), perplexity on the val split (the same
``--ppl-windows`` windows for every row), decode tokens/s (greedy, ``--new-tokens`` after a
``--prompt-len`` prompt, median of ``--rounds`` runs alternating with HF fp32 in the same run;
tokens after the first over the time after the first), time to first token, the speed ratio to HF
fp32 (median of the per-round ratios), and the memory-bandwidth bound: bytes one decode step reads
(every weight matrix as stored, the LM head in full, the KV cache at the mean context) over the
best bandwidth measured beside the row (bench_generate.py's copy/read probe), against the
measured speed. Quantized rows keep their float parts (embeddings, norms, the tied head) in
``--quant-float-dtype`` (auto: bf16 where the CPU has it natively, as their int kernels run in bf16).
Writes ``benchmarks/results/inference.json`` (``--quick``: inference_quick.json).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import ROOT, log, machine, write_json  # noqa: E402
from bench_generate import MODELS, bandwidth, run_hf, run_scalelm  # noqa: E402

from scalelm.config import ModelConfig  # noqa: E402
from scalelm.data.loader import TokenData  # noqa: E402
from scalelm.generate.generator import Generator  # noqa: E402
from scalelm.model import GPT  # noqa: E402
from scalelm.model.io import load_model_dir, save_model_dir  # noqa: E402
from scalelm.model.quant import QuantLinear, kernel_summary  # noqa: E402

TINYSTORIES = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_sample.txt"
MODELS = dict(MODELS, tiny=lambda: ModelConfig(vocab_size=8192, block_size=128, n_layer=2, n_head=2, n_embd=128))
ROWS = ("fp32", "bf16", "int8", "int4-g32", "int4-g128", "onnxruntime")
QUANT = {"int8": ["--scheme", "int8"], "int4-g32": ["--scheme", "int4", "--group-size", "32"],
         "int4-g128": ["--scheme", "int4", "--group-size", "128"]}


def scalelm(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "scalelm", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if p.returncode:
        sys.exit(f"scalelm {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def prepare(work: Path, max_bytes: str | None) -> Path:
    data = work / "tinystories"
    if not (data / "meta.json").is_file():
        scalelm("prepare", "--input", TINYSTORIES, "--out", data, "--vocab-size", "8192", "--seq-len", "128",
                "--no-progress", *(["--max-bytes", max_bytes] if max_bytes else []))
    return data


def train_briefly(cfg: ModelConfig, data: TokenData, steps: int, batch: int, seq: int, lr: float = 1e-3) -> GPT:
    """A few AdamW steps on random train windows (bf16 autocast where native): a model whose
    perplexity means something, so quantization's effect on it does too."""
    from scalelm.precision import autocast_context, resolve_precision

    torch.manual_seed(0)
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = data.tokens("train")
    rng = np.random.default_rng(0)
    ctx = autocast_context(resolve_precision("auto", torch.device("cpu")), torch.device("cpu"))
    for step in range(steps):
        for g in opt.param_groups:  # linear warm-up over 10%, cosine to 10%
            w = min(1.0, (step + 1) / max(1, steps // 10))
            g["lr"] = lr * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        starts = rng.integers(0, len(tokens) - seq - 1, batch)
        xy = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq + 1], dtype=np.int64) for s in starts]))
        with ctx():
            _, loss = model(xy[:, :-1], xy[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"  train step {step}: loss {loss.item():.3f}")
    return model.eval()


def make_dirs(name: str, args, work: Path) -> tuple[dict[str, Path], Path]:
    """The model directory of every row (and the DATA_DIR for perplexity)."""
    d = work / name
    given = dict(x.split("=", 1) for x in args.model)
    if name in given:
        src = Path(given[name])
        data = Path(args.data) if args.data else sys.exit(f"--model {name}=DIR needs --data DATA_DIR for perplexity")
    else:
        data = prepare(work, "400KB" if args.quick else None)
        src = d / "fp32"
        if not (src / "config.json").is_file():
            td = TokenData(data)
            cfg = MODELS[name]()
            cfg.vocab_size = max(cfg.vocab_size, td.vocab_size)
            log(f"{name}: training {args.train_steps} steps on {data}")
            model = train_briefly(cfg, td, args.train_steps, args.train_batch, min(cfg.block_size, 256))
            save_model_dir(model, src, tokenizer_json=td.tokenizer_json)
    dirs = {"fp32": src}
    if not (d / "bf16" / "config.json").is_file():
        scalelm("export", src, "--dtype", "bf16", "--out", d / "bf16", "--overwrite")
    dirs["bf16"] = d / "bf16"
    for row, opts in QUANT.items():
        if not (d / row / "config.json").is_file():
            scalelm("quantize", src, *opts, "--out", d / row, "--overwrite")
        dirs[row] = d / row
    if not (d / "onnx" / "config.json").is_file():
        scalelm("export", src, "--format", "onnx", "--out", d / "onnx", "--overwrite")
    dirs["onnxruntime"] = d / "onnx"
    return dirs, data


def disk_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.name.startswith(("model.safetensors", "model.onnx")))


def step_bytes(model: GPT, batch: int, ctx: float, kv_elt: int, float_elt: int) -> float:
    """Bytes one decode step reads: every matrix as stored (quantized values + scales, or float),
    norms and biases, the LM head in full, the KV cache at context ``ctx``; embeddings one row each (0)."""
    cfg, total = model.cfg, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in (m.qweight, m.scale, m.zero, m.bias) if b is not None)
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * float_elt + (m.bias.numel() * float_elt if m.bias is not None else 0)
    return total + 2 * cfg.n_layer * batch * cfg.kv_heads * cfg.head_dim * ctx * kv_elt


@torch.inference_mode()
def perplexity(fn, data: TokenData, n: int, seq: int) -> float:
    """exp(mean next-token loss) over ``n`` val windows spread evenly over the split."""
    from scalelm.data.loader import eval_batches

    total, count = 0.0, 0
    for x, y in eval_batches(data.tokens("val"), 4, seq, max_batches=max(1, n // 4)):
        logits = fn(x).float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return math.exp(total / count)


def load_row(row: str, d: Path, float_dtype: torch.dtype):
    """(Generator, logits function, the model for byte counts) for one row, loaded as `generate` loads it."""
    if row == "onnxruntime":
        gen = Generator.from_checkpoint(d, backend="onnxruntime")
        return gen, gen.model.logits, None
    dtype = {"bf16": torch.bfloat16}.get(row, float_dtype if row in QUANT else torch.float32)
    model = load_model_dir(d, dtype=dtype).eval()
    return Generator(model), (lambda x: model(x)[0]), model


def bench_model(name: str, args, work: Path) -> list[dict]:
    from scalelm.model.hf import to_hf

    dirs, data_dir = make_dirs(name, args, work)
    data = TokenData(data_dir)
    float_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.quant_float_dtype]
    if float_dtype is None:
        from scalelm.hardware import cpu_has_bf16

        float_dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    rows = [r for r in ROWS if r in args.rows.split(",")]
    loaded = {r: load_row(r, dirs[r], float_dtype) for r in rows}
    if args.speculative:  # speculative decoding (scalelm.generate.speculative): prompt lookup, or --draft
        fp32 = loaded.get("fp32") or load_row("fp32", dirs["fp32"], float_dtype)
        from scalelm.runs import resolve_checkpoint

        spec = dict(draft=load_model_dir(resolve_checkpoint(args.draft)).eval()) if args.draft else dict(prompt_lookup=3)
        loaded["fp32+speculative"] = (Generator(fp32[2], **spec), fp32[1], fp32[2])
    fp32_model = load_model_dir(dirs["fp32"]).eval()  # for HF, and the byte counts of HF and onnxruntime
    hf = to_hf(fp32_model)
    seq = min(fp32_model.cfg.block_size, args.ppl_seq)
    ppl = {r: (None if r.endswith("speculative") else perplexity(fn, data, args.ppl_windows, seq))
           for r, (_, fn, _) in loaded.items()}
    ppl["hf-fp32"] = perplexity(lambda x: hf(x).logits, data, args.ppl_windows, seq)
    log(f"{name}: perplexity " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items() if v is not None))
    val = data.tokens("val")
    out = []
    for batch in map(int, args.batches.split(",")):
        rng = np.random.default_rng(batch)
        starts = rng.integers(0, len(val) - args.prompt_len, batch)  # real text: prompt lookup has something to find
        prompts = torch.from_numpy(np.stack([np.asarray(val[s:s + args.prompt_len], dtype=np.int64) for s in starts]))
        n = args.new_tokens

        def measure(fn, batch=batch, n=n):
            t0, first, end, tokens = fn()
            return {"ttft_ms": 1e3 * (first - t0), "decode_tok_s": batch * (n - 1) / (end - first), "tokens": tokens}

        systems = {r: (lambda g=g, p=prompts, n=n: measure(lambda: run_scalelm(g, p, n)))
                   for r, (g, _, _) in loaded.items()}
        systems["hf-fp32"] = lambda p=prompts, n=n: measure(lambda: run_hf(hf, p, n))
        for f in systems.values():  # warm-up: first-call allocations, kernel choices, ORT's arena
            f()
        bw = bandwidth()
        runs = {k: [] for k in systems}
        order = list(systems)
        for r in range(args.rounds):
            for k in (order if r % 2 == 0 else order[::-1]):
                runs[k].append(systems[k]())
                log(f"  {name} b{batch} round {r}: {k} {runs[k][-1]['decode_tok_s']:.1f} tok/s, "
                    f"ttft {runs[k][-1]['ttft_ms']:.0f} ms")
        after = bandwidth()
        best_bw = max(max(bw.values()), max(after.values())) * 1e9
        ctx = args.prompt_len + n / 2
        hf_runs = runs["hf-fp32"]
        for k, rs in runs.items():
            base = "fp32" if k == "hf-fp32" else k.split("+")[0]
            model = loaded[k][2] if k in loaded and loaded[k][2] is not None else fp32_model
            elt = 2 if base == "bf16" or (base in QUANT and float_dtype == torch.bfloat16) else 4  # float parts, cache
            need = step_bytes(model, batch, ctx, elt, elt)
            size = disk_bytes(dirs[base])
            dec = st.median(x["decode_tok_s"] for x in rs)
            row = {"model": name, "row": k, "batch": batch, "disk_bytes": size, "perplexity": ppl.get(k),
                   "decode_tok_s": dec, "ttft_ms": st.median(x["ttft_ms"] for x in rs),
                   "runs_decode_tok_s": [round(x["decode_tok_s"], 2) for x in rs],
                   "ratio_vs_hf_fp32": st.median(a["decode_tok_s"] / b["decode_tok_s"]
                                                 for a, b in zip(rs, hf_runs, strict=True)),
                   "same_greedy_tokens_as_fp32": rs[0]["tokens"] == runs["fp32"][0]["tokens"] if "fp32" in runs
                   else None,
                   "bytes_per_step": need, "bandwidth_GBps": best_bw / 1e9,
                   "bound_tok_s": batch * best_bw / need if need else None,
                   "kernels": kernel_summary(model) if k in QUANT else None}
            out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | row | batch | size MiB | ppl | decode tok/s | TTFT ms | vs HF fp32 | MB read/step | "
             "bound tok/s | % of bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] else "-"
        need = f"{r['bytes_per_step'] / 1e6:.1f}" if r["bytes_per_step"] else "-"
        bound = f"{r['bound_tok_s']:.0f}" if r["bound_tok_s"] else "-"
        pct = f"{100 * r['decode_tok_s'] / r['bound_tok_s']:.0f}%" if r["bound_tok_s"] else "-"
        lines.append(f"| {r['model']} | {r['row']} | {r['batch']} | {r['disk_bytes'] / 2**20:.1f} | {ppl} | "
                     f"{r['decode_tok_s']:.1f} | {r['ttft_ms']:.0f} | {r['ratio_vs_hf_fp32']:.2f}x | {need} | "
                     f"{bound} | {pct} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="6L-384,gpt2-124m", help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="use this trained model directory for NAME instead of training one (needs --data)")
    p.add_argument("--data", help="DATA_DIR for perplexity (prepared with the --model's tokenizer)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    p.add_argument("--speculative", action="store_true", help="add an fp32 speculative-decoding row "
                   "(prompt lookup, or --draft)")
    p.add_argument("--draft", help="with --speculative: a draft model directory (same tokenizer)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1)")
    p.add_argument("--train-steps", type=int, default=200, help="training steps of the models it trains")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--ppl-windows", type=int, default=32, help="val windows for perplexity")
    p.add_argument("--ppl-seq", type=int, default=256, help="tokens per perplexity window (at most block_size)")
    p.add_argument("--quant-float-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--work", default="/tmp/scalelm_bench_inference", help="where data and model dirs are kept")
    p.add_argument("--quick", action="store_true", help="a tiny model, batch 1, 8 tokens, 1 round (a smoke test)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.models, args.batches, args.new_tokens, args.rounds = "tiny", "1", 8, 1
        args.train_steps, args.ppl_windows, args.ppl_seq, args.prompt_len = 5, 4, 64, 16
    torch.set_num_threads(args.threads)
    work = Path(args.work) / ("quick" if args.quick else "full")
    if args.quick:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args, work)
    text = table(rows)
    print(text)
    import onnxruntime
    import transformers

    result = {"rows": rows, "threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "prompt_len": args.prompt_len, "train_steps": args.train_steps, "machine": machine(peaks=False),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "onnxruntime": onnxruntime.__version__},
              "command": " ".join(["python", "benchmarks/bench_inference.py", *sys.argv[1:]]), "table": text,
              "seconds": round(time.time() - t0, 1)}
    path = write_json(Path(args.out).name if args.out else ("inference_quick.json" if args.quick else "inference.json"),
                      result, Path(args.out).parent if args.out else None)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
