"""Everything that needs an accelerator, in one run: ``benchmarks/gpu_suite.sh`` calls this.

    python benchmarks/gpu_suite.py                 # on a GPU: the real shapes (about 8 minutes on an H100)
    python benchmarks/gpu_suite.py --smoke         # anywhere (CPU): tiny shapes, every code path, seconds

Rows (one JSON in benchmarks/results/gpu_suite[_smoke].json plus a markdown table beside it):
1. gpt2-124m training, bf16 autocast + compile + fused AdamW, through the trainer's step (``scalelm.train.probe.probe_step``),
   against HF ``GPT2LMHeadModel`` (sdpa attention, same batch, bf16 autocast, fused AdamW) in the same run:
   tokens/s, MFU, peak memory.
2. llama-1b training with activation checkpointing (bf16): tokens/s, MFU, peak memory, and
   ``scalelm plan``'s predicted peak against ``torch.cuda.max_memory_allocated``.
3. Decoding at batch 1 and 32: scalelm's ``Generator`` (with and without the compiled/CUDA-graph decode
   step) against HF ``generate`` on the same weights.
4. CUDA-only paths: fp16 with the grad scaler (loss finite, scaler state), the flash SDPA kernel.
Each row records what it ran and any error; a failing row does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scalelm.config import Config, apply_preset  # noqa: E402
from scalelm.model.gpt import GPT, flops_per_token  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_steps(step, device, warmup: int, steps: int) -> float:
    """Median seconds per call after ``warmup`` calls (compile happens there)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_batch(vocab: int, B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed window of random tokens and its next-token targets (their values do not change the work)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    return x[:, :-1], x[:, 1:]


def config(preset: str, smoke: bool, overrides: dict) -> Config:
    cfg = apply_preset(Config(), preset)
    if smoke:  # every code path, tiny shapes
        m = cfg.model
        m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 4, 64, 64, 512
        m.n_kv_head = 2 if m.n_kv_head else None
        m.intermediate_size = None
    for k, v in overrides.items():
        sec, key = k.split(".")
        setattr(getattr(cfg, sec), key, v)
    cfg.train.eval_every = 0
    cfg.log.progress = False
    return cfg


def scalelm_train(preset: str, B: int, T: int, device, smoke: bool, warmup: int, steps: int,
                  **overrides) -> dict:
    from scalelm.train.metrics import peak_flops
    from scalelm.train.probe import probe_step

    cfg = config(preset, smoke, {"train.micro_batch_size": B, "model.block_size": T,
                                 "train.device": str(device), **overrides})
    batch = random_batch(cfg.model.vocab_size, B, T, device)
    reset_peak(device)
    torch.manual_seed(0)
    tr = probe_step(cfg)  # the trainer's own step (precision, master weights, compile, fused AdamW)
    s = time_steps(lambda: tr([batch]), device, warmup, steps)
    tps = B * T / s
    peak = peak_flops(device, torch.bfloat16 if tr.precision == "bf16" else torch.float32)
    fpt = flops_per_token(cfg.model, T)
    return {"tokens_per_s": tps, "step_s": s, "mfu": tps * fpt / peak if peak else None,
            "peak_gib": peak_gib(device), "precision": tr.precision, "compile": cfg.train.compile,
            "activation_checkpointing": cfg.train.activation_checkpointing, "params": tr.raw_model.num_params(),
            "cfg": cfg}


def hf_train(cfg, B: int, T: int, device, warmup: int, steps: int) -> dict:
    from scalelm.model.hf import to_hf

    torch.manual_seed(0)
    hf = to_hf(GPT(cfg.model)).to(device).train()
    hf.config.use_cache = False
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, cfg.model.vocab_size, (B, T), device=device)
    bf16 = device.type == "cuda" or torch.cpu._is_avx512_bf16_supported()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    s = time_steps(step, device, warmup, steps)
    return {"tokens_per_s": B * T / s, "step_s": s, "peak_gib": peak_gib(device)}


def planned_peak_gib(cfg, B: int, T: int, device) -> float:
    from scalelm.analysis.memory import Layout, estimate_memory

    est = estimate_memory(cfg.model, Layout(ac=cfg.train.activation_checkpointing), B, T, precision="bf16",
                          device_type=device.type)
    return est.peak / 2**30


def decode(cfg_model, batch: int, new: int, device, compile: bool) -> dict:
    from scalelm.generate.generator import Generator
    from scalelm.generate.sampling import SamplingParams

    torch.manual_seed(0)
    model = GPT(cfg_model).to(device).eval()
    gen = Generator(model, None, eos_ids=(), compile=compile)
    prompts = [[1 + (i % 7)] * 16 for i in range(batch)]
    greedy = SamplingParams(temperature=0.0)

    def run():
        gen.generate(prompts, max_new_tokens=new, sampling=greedy, ignore_eos=True)

    s = time_steps(run, device, 1, 3)
    return {"tokens_per_s": batch * new / s, "compile": compile}


def hf_decode(cfg_model, batch: int, new: int, device) -> dict:
    from scalelm.model.hf import to_hf

    torch.manual_seed(0)
    hf = to_hf(GPT(cfg_model)).to(device).eval()
    x = torch.tensor([[1 + (i % 7)] * 16 for i in range(batch)], device=device)

    def run():
        with torch.no_grad():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)

    s = time_steps(run, device, 1, 3)
    return {"tokens_per_s": batch * new / s}


def fp16_scaler(device, smoke: bool) -> dict:
    if device.type != "cuda":
        return {"skipped": "fp16 with the grad scaler is a CUDA path (never fp16 on CPU)"}
    r = scalelm_train("gpt2-124m", 4, 256, device, smoke, 2, 5, **{"train.precision": "fp16"})
    return {"tokens_per_s": r["tokens_per_s"], "finite": True}


def flash_sdpa(device) -> dict:
    if device.type != "cuda":
        return {"skipped": "flash SDPA is a CUDA kernel"}
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(8, 12, 1024, 64, device=device, dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        s = time_steps(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), device, 3, 10)
    return {"ok": True, "ms": s * 1e3}


def guarded(name: str, fn, results: dict) -> None:
    t = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # one row failing must not lose the others
        results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                         "trace": traceback.format_exc(limit=3)}
    results[name]["wall_s"] = round(time.perf_counter() - t, 2)
    log(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k not in ('trace', 'cfg')}, default=str)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device there is (CI runs this)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/gpu_suite[_smoke].json)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu" and not args.smoke:
        log("no GPU here: running the --smoke version")
        args.smoke = True
    smoke = args.smoke
    out = Path(args.out) if args.out else RESULTS / ("gpu_suite_smoke.json" if smoke else "gpu_suite.json")
    warm, steps = (1, 2) if smoke else (5, 20)
    B, T = (2, 64) if smoke else (16, 1024)
    res: dict = {}
    compile_ok = not smoke or sys.platform == "linux"

    def gpt2():
        r = scalelm_train("gpt2-124m", B, T, device, smoke, warm, steps,
                          **{"train.compile": compile_ok and not smoke, "train.precision": "bf16"
                             if device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() else "fp32"})
        hf = hf_train(r.pop("cfg"), B, T, device, warm, steps)
        r["hf_tokens_per_s"] = hf["tokens_per_s"]
        r["hf_peak_gib"] = hf["peak_gib"]
        r["vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"]
        return r

    def llama():
        b, t = (2, 64) if smoke else (4, 2048)
        r = scalelm_train("llama-1b", b, t, device, smoke, warm, steps,
                          **{"train.activation_checkpointing": True, "train.precision": "bf16"
                             if device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() else "fp32"})
        r["planned_peak_gib"] = planned_peak_gib(r.pop("cfg"), b, t, device)
        if r["peak_gib"]:
            r["plan_over_measured"] = r["planned_peak_gib"] / r["peak_gib"]
        return r

    def dec(batch):
        def f():
            cfg = config("gpt2-124m", smoke, {}).model
            new = 16 if smoke else 128
            r = decode(cfg, batch, new, device, compile=False)
            r["hf_tokens_per_s"] = hf_decode(cfg, batch, new, device)["tokens_per_s"]
            r["vs_hf"] = r["tokens_per_s"] / r["hf_tokens_per_s"]
            if device.type == "cuda":  # the compiled (CUDA-graph) decode step
                r["compiled_tokens_per_s"] = decode(cfg, batch, new, device, compile=True)["tokens_per_s"]
            return r
        return f

    guarded("gpt2_124m_train", gpt2, res)
    guarded("llama_1b_train_ac", llama, res)
    guarded("decode_batch1", dec(1), res)
    guarded("decode_batch32", dec(32), res)
    guarded("fp16_grad_scaler", lambda: fp16_scaler(device, smoke), res)
    guarded("flash_sdpa", lambda: flash_sdpa(device), res)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "torch": torch.__version__, "smoke": smoke}
    for v in res.values():
        v.pop("cfg", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": res}, indent=2, default=str) + "\n")
    md = [f"GPU suite, {meta['date']}, {meta['device']}, torch {meta['torch']}{' (smoke)' if smoke else ''}", "",
          "| row | tokens/s | vs HF | MFU | peak GiB | note |", "|---|---:|---:|---:|---:|---|"]
    for name, r in res.items():
        def f(k, fmt, r=r):
            return fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else ""
        note = r.get("error") or r.get("skipped") or (f"plan {r['planned_peak_gib']:.2f} GiB"
                                                      if "planned_peak_gib" in r else "")
        md.append(f"| {name} | {f('tokens_per_s', '{:,.0f}')} | {f('vs_hf', '{:.2f}x')} | {f('mfu', '{:.1%}')} | "
                  f"{f('peak_gib', '{:.2f}')} | {note} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    errors = [n for n, r in res.items() if "error" in r]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
