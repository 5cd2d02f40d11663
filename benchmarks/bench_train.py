"""Training-step speed: scalelm against Hugging Face transformers on the same shapes, same run.

    python benchmarks/bench_train.py [--quick] [--rounds N] [--shapes 4x256,6x384,gpt2-124m]

A step is forward + backward + AdamW step (lr 1e-4, weight decay 0.1, foreach for both, as
the brief asks) on batch 8 x seq 256, vocab 8192. Shapes: 4 layers 256 wide, 6 layers 384 wide,
gpt2-124m (12 x 768); each as a GPT-2 (scalelm vs ``GPT2LMHeadModel``) and a Llama
(scalelm vs ``LlamaForCausalLM``), random init, in fp32 eager and bf16 autocast, plus
scalelm's default (bf16 weights + fp32 masters, fused AdamW: also its fastest), against HF
fp32 and against HF bf16. Every configuration lives in its own worker process (its peak
RSS is its own); the parent asks the workers for one step at a time, in turn (ABBA order), so
slow drift and other users' load hit all alike; a sample during which other processes used
more than 15% of the cores is discarded and retaken. Ratios are medians of per-round ratios.
MFU uses ``scalelm.model.flops_per_token`` and the measured matmul peak of the precision the
step ran in. Writes benchmarks/results/train.json and train.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _util import (
    BUSY,
    RESULTS,
    ROOT,
    log,
    machine,
    paired_ratio,
    wait_quiet,
    write_json,
)

SHAPES = {"4x256": (4, 256, 4), "6x384": (6, 384, 6), "gpt2-124m": (12, 768, 12)}  # layers, width, heads
SEQ, BATCH, VOCAB = 256, 8, 8192
# what `scalelm train` does by default on a bf16 CPU (precision auto, master_weights auto, fused AdamW):
# also its fastest CPU setting
DEFAULT = dict(precision="bf16", optimizer="fused", weights="bf16-master", default=True)


def model_config(family: str, shape: str):
    from scalelm.config import ModelConfig

    L, d, H = SHAPES[shape]
    if family == "gpt":
        return ModelConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=L, n_head=H, n_embd=d)
    return ModelConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=L, n_head=H, n_embd=d, pos_embedding="rope",
                       norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


# ----------------------------------------------------------------------------- worker side

def build(spec: dict):
    """A zero-argument training step for ``spec``, and the model's parameter count."""
    import torch

    torch.manual_seed(0)
    cfg = model_config(spec["family"], spec["shape"])
    x = torch.randint(0, VOCAB, (BATCH, SEQ))
    y = torch.randint(0, VOCAB, (BATCH, SEQ))
    if spec["impl"] == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM

        from scalelm.model.hf import hf_config_dict

        hf_cfg = AutoConfig.for_model(**hf_config_dict(cfg))
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").train()
        loss_of = lambda: model(input_ids=x, labels=x).loss  # noqa: E731  (HF shifts the labels itself)
    else:
        from scalelm.model import GPT

        model = GPT(cfg).train()
        loss_of = lambda: model(x, y)[1]  # noqa: E731
    params = sum(p.numel() for p in model.parameters())
    bf16 = spec["precision"] == "bf16"
    fused = spec.get("optimizer") == "fused"
    kw = dict(lr=1e-4, weight_decay=0.1, fused=True) if fused else dict(lr=1e-4, weight_decay=0.1, foreach=True)
    if spec.get("weights") == "bf16-master":
        from scalelm.train.master_weights import MasterWeights

        master = MasterWeights(model, torch.bfloat16)
        opt = torch.optim.AdamW(master.params, **kw)
    else:
        master = None
        opt = torch.optim.AdamW(model.parameters(), **kw)
    if spec.get("compile"):
        model.compile()
    autocast = bf16 and master is None

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of()
        loss.backward()
        if master is not None:
            master.grads_to_master()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master is not None:
            master.master_to_model()

    return step, params


def worker(spec: dict) -> None:
    """Answer 'step' lines on stdin with one JSON line: seconds, others' load, peak RSS."""
    import torch

    sys.path.insert(0, str(ROOT))
    from scalelm.analysis.memprobe import _status
    from scalelm.hardware import LoadMeter

    torch.set_num_threads(int(spec["threads"]))
    base = _status("VmRSS")
    step, params = build(spec)
    print(json.dumps(dict(ready=True, params=params)), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        with LoadMeter() as lm:
            t = time.perf_counter()
            step()
            dt = time.perf_counter() - t
        print(json.dumps(dict(seconds=dt, load=lm.other, peak_rss=_status("VmHWM") - base)), flush=True)


# ----------------------------------------------------------------------------- parent side

class Worker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT / "benchmarks")
        self.params = self._read()["params"]
        self.samples, self.loads, self.discarded, self.peak_rss = [], [], 0, 0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {label(self.spec)} died (exit code {self.proc.wait()})")
        return json.loads(line)

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        r = self._read()
        self.peak_rss = max(self.peak_rss, r["peak_rss"])
        return r

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def label(spec: dict) -> str:
    extra = "".join(f" {k}={spec[k]}" for k in ("optimizer", "weights", "compile") if spec.get(k))
    extra += " (default)" if spec.get("default") else ""
    return f"{spec['impl']} {spec['family']} {spec['shape']} {spec['precision']}{extra}"


def run_group(specs: list[dict], rounds: int, warmup: int, max_retries: int, max_wait: float) -> list[Worker]:
    """Alternate one step per worker per round (ABBA); retake samples taken under load."""
    workers = [Worker(s) for s in specs]
    try:
        for w in workers:
            for _ in range(warmup):
                w.step()
        for r in range(rounds):
            for w in (workers if r % 2 == 0 else workers[::-1]):
                for attempt in range(max_retries + 1):
                    res = w.step()
                    if res["load"] <= BUSY or attempt == max_retries:
                        break
                    w.discarded += 1
                    wait_quiet(max_wait)
                w.samples.append(res["seconds"])
                w.loads.append(round(res["load"], 3))
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{label(w.spec)} {w.samples[-1] * 1e3:.0f} ms"
                                                          for w in workers))
    finally:
        for w in workers:
            w.close()
    return workers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="the two small shapes, 3 rounds")
    ap.add_argument("--shapes", default=None, help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per configuration (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-retries", type=int, default=10, help="retakes of a sample taken under load")
    ap.add_argument("--max-wait", type=float, default=300, help="seconds to wait for a quiet machine each time")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    import torch

    from scalelm.hardware import cpu_has_bf16, cpu_peaks
    from scalelm.model import flops_per_token

    shapes = args.shapes.split(",") if args.shapes else (["4x256", "6x384"] if args.quick else list(SHAPES))
    rounds = args.rounds or (3 if args.quick else 5)
    if not wait_quiet(args.max_wait):
        log("warning: the machine stayed busy; samples taken under load are flagged in the JSON")
    peaks = cpu_peaks()
    if peaks["other_load"] > BUSY:
        log(f"warning: the matmul peaks were measured while others used {peaks['other_load']:.0%} of the "
            f"machine: they are too low and the MFU column too high (run on a quiet machine)")
    bf16_ok = cpu_has_bf16()
    if not bf16_ok:
        log("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 runs are skipped, best setting is fp32")
    best = DEFAULT if bf16_ok else dict(precision="fp32", optimizer="fused", default=True)
    threads = torch.get_num_threads()
    rows = []
    for shape in shapes:
        for family in ("gpt", "llama"):
            base = dict(shape=shape, family=family, threads=threads)
            groups = [[dict(base, impl="hf", precision="fp32"), dict(base, impl="scalelm", precision="fp32"),
                       dict(base, impl="scalelm", **best)]]
            if bf16_ok:
                groups.append([dict(base, impl="hf", precision="bf16"), dict(base, impl="scalelm", precision="bf16"),
                               dict(base, impl="scalelm", **best)])
            for specs in groups:
                log(f"{shape} {family}: " + " | ".join(label(s) for s in specs))
                ws = run_group(specs, rounds, args.warmup, args.max_retries, args.max_wait)
                ref = ws[0]
                for w in ws:
                    s = w.spec
                    fpt = flops_per_token(model_config(family, shape), SEQ)
                    med = statistics.median(w.samples)
                    tps = BATCH * SEQ / med
                    rows.append(dict(label=label(s), **{k: s.get(k) for k in ("impl", "family", "shape", "precision",
                                                                               "optimizer", "weights", "compile",
                                                                               "default")},
                                     params=w.params, ms_per_step=med * 1e3, tokens_per_s=tps,
                                     mfu=tps * fpt / peaks[s["precision"]], peak_rss_mib=w.peak_rss / 2**20,
                                     vs_hf=paired_ratio(ref.samples, w.samples) if w is not ref else 1.0,
                                     vs=label(ref.spec), samples_ms=[round(x * 1e3, 1) for x in w.samples],
                                     loads=w.loads, discarded=w.discarded))
    print_table(rows)
    result = dict(machine=machine(), seq=SEQ, batch=BATCH, vocab=VOCAB, rounds=rounds, warmup=args.warmup,
                  busy_threshold=BUSY, default_setting=best, rows=rows,
                  command="python benchmarks/bench_train.py" + (" --quick" if args.quick else ""))
    path = write_json("train.json", result)
    plot(rows, RESULTS / "train.png")
    log(f"wrote {path} and {RESULTS / 'train.png'}")
    return 0


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':<10}{'model':<7}{'impl':<9}{'setting':<26}{'params':>12}{'ms/step':>9}{'tok/s':>8}"
          f"{'MFU':>6}{'peak RSS':>10}{'vs HF':>7}")
    for r in rows:
        setting = ("default: " if r.get("default") else "") + r["precision"] + (
            "" if not r.get("optimizer") else f" {r['optimizer']}") + (
            f" {r['weights']}" if r.get("weights") else "") + (" compile" if r.get("compile") else "")
        vs = "" if r["impl"] == "hf" else f"{r['vs_hf']:.2f}x"
        print(f"{r['shape']:<10}{r['family']:<7}{r['impl']:<9}{setting:<26}{r['params']:>12,}{r['ms_per_step']:>9.0f}"
              f"{r['tokens_per_s']:>8,.0f}{r['mfu']:>6.0%}{r['peak_rss_mib']:>9.0f}M{vs:>7}")


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, family, title in zip(axes, ("gpt", "llama"), ("GPT-2 shapes", "Llama shapes")):
        lines: dict[str, list] = {}
        for r in rows:
            if r["family"] == family and not (r.get("default") and "bf16" in r["vs"]):  # once per shape
                key = f"{r['impl']} {r['precision']}" + (" default" if r.get("default") else "")
                lines.setdefault(key, []).append((r["params"], r["tokens_per_s"]))
        for key, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p for p, _ in pts], [t for _, t in pts], marker="o", ls="--" if key.startswith("hf") else "-",
                    label=key)
        ax.set(xscale="log", yscale="log", xlabel="parameters", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"training tokens/s (batch {BATCH} x {SEQ})")
    fig.suptitle("training step throughput on this CPU (higher is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
