"""Instruction tuning and translation benchmarks (issue 14), each a real CLI run in a subprocess.

    python benchmarks/bench_tasks.py --quick            # every section at toy scale (< 2 min): the plumbing works
    python benchmarks/bench_tasks.py                    # the full runs (1 h 40 min on 2 cores)
    python benchmarks/bench_tasks.py --sections packing # one section

Sections:
  packing    Alpaca-1k SFT of a tiny model from scratch, packing on vs off, the same epochs and about the
             same tokens per step: wall time, real and supervised tokens/s, final held-out reply loss.
  sft        a small base pretrained on TinyStories, then Alpaca-1k SFT: held-out reply loss before (the
             step-0 evaluation) and after; loss on replies only vs on every token; LoRA (r=8) vs full.
  translate  Multi30k en->de from scratch, the encoder-decoder and a decoder-only model of about equal
             parameters, each trained within --minutes on 2 threads: the validation-loss curve, training
             and decoding tokens/s, peak memory (max RSS), val BLEU/chrF greedy and with 4 beams.

Others' share of the CPU during each run is recorded (``LoadMeter``): on a busy machine the times are
not comparable. Writes ``benchmarks/results/tasks[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scalelm.fileio import atomic_write_text
from scalelm.hardware import LoadMeter, cpu_name

DATA = ROOT.parent / "shared" / "data"
ALPACA = DATA / "alpaca_1k" / "alpaca_data_1k.json"
M30K = DATA / "multi30k"
COMMON = ["--log.progress=false", "--train.log_every=10"]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def scalelm(*args, threads: int = 2, check: bool = True) -> tuple[dict, dict]:
    """Run ``scalelm ARGS``: (the JSON it printed last, {"wall_s", "others_load", "max_rss_mb"})."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with LoadMeter() as lm, tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        p = subprocess.Popen([sys.executable, "-m", "scalelm", *map(str, args)], stdout=so, stderr=se, text=True,
                             env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak memory, not the largest child's so far
        p.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0), se.seek(0)
        stdout, stderr = so.read(), se.read()
    info = {"wall_s": round(time.perf_counter() - t0, 2), "others_load": round(lm.other, 3),
            "max_rss_mb": round(usage.ru_maxrss / 1024)}
    if p.returncode and check:
        sys.exit(f"scalelm {' '.join(map(str, args[:3]))} failed ({p.returncode}):\n{stderr[-3000:]}")
    last = next((line for line in reversed(stdout.splitlines()) if line.startswith("{")), "{}")
    return json.loads(last), info


def general_english(work: Path, quick: bool) -> Path:
    """``WORK/pretrain``: pretrain_text (62 MB of general English) prepared with an 8,192-token BPE, once
    (reused when there); with ``quick``, 200 KB of Tiny Shakespeare and 1,024 tokens. The bases of the
    preference and encoder benchmarks."""
    corpus = DATA / "pretrain_text"
    if quick:
        (work / "corpus.txt").write_text((DATA / "tinyshakespeare" / "input.txt").read_text()[:200_000])
        corpus = work / "corpus.txt"
    prep = work / "pretrain"
    if not (prep / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "scalelm", "prepare", "--input", str(corpus), "--out", str(prep),
                        "--tokenizer", "bpe", "--vocab-size", str(1024 if quick else 8192), "--no-progress"],
                       check=True, cwd=ROOT, capture_output=True)
    return prep


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def val_curve(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], round(r["val_loss"], 4)) for r in metrics(run) if "val_loss" in r]


def bpe(work: Path, texts: list[str], vocab: int) -> Path:
    from scalelm.data.tokenizer import train_bpe

    p = work / f"bpe{vocab}.json"
    if not p.is_file():
        p.write_text(train_bpe(iter(texts), vocab).to_str())
    return p


def alpaca_texts(n: int) -> list[str]:
    return [" ".join(r.values()) for r in json.loads(ALPACA.read_text())[:n]]


def alpaca_file(work: Path, n: int) -> Path:
    p = work / f"alpaca{n}.json"
    p.write_text(json.dumps(json.loads(ALPACA.read_text())[:n]))
    return p


# ----------------------------------------------------------------------------- packing

def bench_packing(work: Path, quick: bool) -> dict:
    n, epochs = (100, 1) if quick else (1000, 2)
    data = alpaca_file(work, n)
    tok = bpe(work, alpaca_texts(1000), 512 if quick else 2048)
    shape = ["--model.n_layer=2", "--model.n_head=4", "--model.n_embd=128", "--model.block_size=256",
             "--model.dropout=0.0", "--optim.lr=2e-3", "--optim.warmup_steps=10", "--train.precision=fp32"]
    # how many examples (off) or windows (on) an epoch holds, to give both the same tokens per step and epochs
    from tokenizers import Tokenizer

    from scalelm.tasks.sft.batches import pack
    from scalelm.tasks.sft.encode import Encoder
    from scalelm.tasks.sft.formats import read_conversations
    from scalelm.data.chat_template import ChatTemplate
    from scalelm.tasks.sft.template import ALPACA as ALPACA_T

    t = Tokenizer.from_file(str(tok))
    enc = Encoder(t, ChatTemplate(ALPACA_T, "<|endoftext|>", "<|endoftext|>"), 256)
    ex, _, _ = enc.encode_all(read_conversations(data))
    import numpy as np

    lengths = np.array([len(e.ids) - 1 for e in ex])
    windows = len(pack(lengths, np.arange(len(ex)), 256))
    B_on = 8
    B_off = max(1, round(B_on * len(ex) / windows))  # same examples (so tokens) per step on average
    steps_on = max(1, round(epochs * windows / B_on))
    steps_off = max(1, round(epochs * len(ex) / B_off))
    out = {"shape": "2 layers x 128 wide, 4 heads, context 256, fp32, BPE " + str(t.get_vocab_size()),
           "examples": n, "epochs": epochs, "avg_tokens_per_example": round(float(lengths.mean()), 1)}
    import statistics

    plan = {"on": (B_on, steps_on), "off": (B_off, steps_off)}
    order = ["on", "off"] if quick else ["on", "off", "off", "on"]  # ABBA: drift in the machine's load cancels
    samples: dict[str, list] = {"on": [], "off": []}
    for i, mode in enumerate(order):
        B, steps = plan[mode]
        run = work / f"pack_{mode}_{i}"
        s, info = scalelm("finetune", "sft", "--preset", "baby", "--tokenizer", tok, "--data", data,
                          "--val-fraction", "0.05", "--template", "alpaca", "--packing", mode, "--out", run,
                          *shape, f"--train.micro_batch_size={B}", f"--train.max_steps={steps}",
                          f"--train.eval_every={steps}", f"--train.save_every={steps}", *COMMON, threads=1)
        samples[mode].append({"train_s": s["elapsed_s"], **info, "final_val_loss": round(s["val_loss"], 4),
                              "real_tokens_per_s": round(s["real_tokens"] / s["elapsed_s"]),
                              "supervised_tokens_per_s": round(s["supervised_tokens"] / s["elapsed_s"]),
                              "epochs": s["epochs"]})
        log(f"packing {mode}: {samples[mode][-1]}")
    for mode, runs in samples.items():
        out[f"packing_{mode}"] = {"micro_batch": plan[mode][0], "steps": plan[mode][1], "runs": runs,
                                  **{k: statistics.median(r[k] for r in runs) for k in
                                     ("train_s", "real_tokens_per_s", "supervised_tokens_per_s", "final_val_loss")}}
    return out


# ----------------------------------------------------------------------------- sft

def bench_sft(work: Path, quick: bool, minutes: float) -> dict:
    stories = DATA / "tinystories" / "tinystories_sample.txt"
    if quick:  # a slice: the tokenizer and the base train in seconds
        (work / "stories.txt").write_text(stories.read_text()[:100_000])
        stories = work / "stories.txt"
    prep = work / "stories"
    if not (prep / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "scalelm", "prepare", "--input", str(stories), "--out", str(prep),
                        "--tokenizer", "bpe", "--vocab-size", "2048", "--no-progress"], check=True, cwd=ROOT,
                       capture_output=True)
    shape = (["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64", "--model.block_size=128"] if quick else
             ["--model.n_layer=4", "--model.n_head=4", "--model.n_embd=128", "--model.block_size=256"])
    base_run = work / "base"
    pre_steps = 10 if quick else 100_000
    budget = [] if quick else [f"--train.max_minutes={minutes}"]
    s, info = scalelm("train", "--preset", "baby", "--data", prep, "--out", base_run, *shape,
                      f"--train.max_steps={pre_steps}", "--train.eval_every=500", *budget, *COMMON)
    base = base_run / "best" if (base_run / "best").is_dir() else base_run
    out = {"base": {"steps": s["step"], "val_loss": s.get("val_loss"), **info}}
    data = alpaca_file(work, 100 if quick else 1000)
    steps = 5 if quick else 600
    runs = {"full_replies": [], "full_every_token": ["--loss-on", "all"], "lora_r8_replies": ["--lora.r=8",
                                                                                              "--optim.lr=1e-3"]}
    for name, extra in runs.items():
        run = work / f"sft_{name}"
        s, info = scalelm("finetune", "sft", "--base", base, "--data", data, "--val-fraction", "0.05",
                          "--template", "alpaca", "--out", run, f"--train.max_steps={steps}",
                          f"--train.eval_every={max(1, steps // 6)}", "--train.micro_batch_size=8", *extra, *COMMON)
        out[name] = {"before_val_reply_loss": round(s["initial_val_loss"], 4),
                     "after_val_reply_loss": round(s["best_val_loss"], 4), "steps": s["step"],
                     "trainable_params": s["trainable_params"], "params": s["params"], **info}
        log(f"sft {name}: {out[name]}")
    return out


# ----------------------------------------------------------------------------- translate

# the decoder-only model and the encoder-decoder at (about) equal parameters: 7 GPT blocks vs 3 encoder
# blocks + 3 decoder blocks with cross-attention, all 256 wide with 4x MLPs, one shared 8000-token BPE
TRANSLATE_SHAPES = {
    "decoder-only": ["--preset", "baby", "--model.n_layer=7", "--model.n_head=4", "--model.n_embd=256",
                     "--model.intermediate_size=1024", "--model.block_size=128", "--model.dropout=0.1",
                     "--train.micro_batch_size=16"],  # packed 128-token windows: about 2,000 tokens a step
    "encoder-decoder": ["--preset", "transformer-small", "--train.micro_batch_size=64"],  # 64 pairs: the same
}
QUICK_SHAPE = ["--model.n_layer=2", "--model.n_encoder_layer=1", "--model.n_decoder_layer=1", "--model.n_head=2",
               "--model.n_embd=64", "--model.intermediate_size=256", "--model.block_size=96",
               "--train.micro_batch_size=16"]


def tokens_of(run: Path, lines: list[str]) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    return sum(len(e.ids) for e in tok.encode_batch(lines))


def bench_translate(work: Path, quick: bool, minutes: float, archs: list[str]) -> dict:
    n = 500 if quick else None
    d = work / "m30k"
    d.mkdir(exist_ok=True)
    for split, k in (("train", n), ("val", 20 if quick else None)):
        for lang in ("en", "de"):
            lines = (M30K / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
            (d / f"{split}.{lang}").write_text("\n".join(lines[:k]) + "\n", encoding="utf-8")
    out = {"budget_minutes": None if quick else minutes, "threads": 2}
    for arch in archs:
        shape = TRANSLATE_SHAPES[arch][:3] + QUICK_SHAPE if quick else TRANSLATE_SHAPES[arch]
        run = work / f"translate_{arch}"
        steps = 10 if quick else 1_000_000
        # the schedule decays over the time budget (cosine to min_lr when the minutes run out)
        budget = [] if quick else [f"--train.max_minutes={minutes}"]
        s, info = scalelm("finetune", "translate", "--vocab-size", 1000 if quick else 8000,
                          "--source", d / "train.en", "--target", d / "train.de", "--val-source", d / "val.en",
                          "--val-target", d / "val.de", "--out", run, *shape, f"--train.max_steps={steps}",
                          f"--train.eval_every={5 if quick else 500}", "--optim.lr=1e-3", "--optim.min_lr=1e-4",
                          "--optim.warmup_steps=200", "--optim.schedule=cosine", *budget, *COMMON)
        curve = val_curve(run)
        r = {"shape": " ".join(shape), "params": s["params"],
             "train": {"steps": s["step"], "train_s": s["elapsed_s"], "stopped": s["stopped"],
                       "epochs": s.get("epochs"), "best_val_loss": round(s["best_val_loss"], 4),
                       "real_tokens_per_s": round(s["real_tokens"] / s["elapsed_s"]),
                       "target_tokens_per_s": round(s["supervised_tokens"] / s["elapsed_s"]), **info},
             "val_loss_curve": curve}
        log(f"translate {arch}: {r['train']}")
        for beams in (1, 4):
            res, info = scalelm("eval", run / "best", "--task", "translate", "--source", d / "val.en", "--reference",
                                d / "val.de", "--beams", beams, "--batch-size", 32, "--save-hypotheses",
                                work / f"{arch}_beams{beams}.de")
            hyps = (work / f"{arch}_beams{beams}.de").read_text(encoding="utf-8").splitlines()
            res["target_tokens_per_s"] = round(tokens_of(run, hyps) / res["seconds"])
            r[f"beams_{beams}"] = {**res, **info}
            log(f"translate {arch} beams={beams}: bleu {res['bleu']:.2f} chrf {res['chrf']:.2f}")
        out[arch] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy scale: proves the plumbing (under 2 minutes)")
    ap.add_argument("--minutes", type=float, default=45.0, help="translation training budget (full mode)")
    ap.add_argument("--base-minutes", type=float, default=10.0, help="the SFT base's pretraining budget (full mode)")
    ap.add_argument("--sections", default="packing,sft,translate")
    ap.add_argument("--archs", default="encoder-decoder,decoder-only", help="translate: the models to compare")
    ap.add_argument("--work", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_tasks_"))
    work.mkdir(parents=True, exist_ok=True)
    res = {"cpu": cpu_name(), "cores": os.cpu_count(), "quick": args.quick}
    t0 = time.perf_counter()
    for sec in args.sections.split(","):
        log(f"== {sec}")
        if sec == "packing":
            (work / "packing").mkdir(exist_ok=True)
            res["packing"] = bench_packing(work / "packing", args.quick)
        elif sec == "sft":
            (work / "sft").mkdir(exist_ok=True)
            res["sft"] = bench_sft(work / "sft", args.quick, args.base_minutes)
        elif sec == "translate":
            res["translate"] = bench_translate(work, args.quick, args.minutes, args.archs.split(","))
        else:
            sys.exit(f"unknown section {sec!r}")
    res["total_s"] = round(time.perf_counter() - t0, 1)
    path = ROOT / "benchmarks" / "results" / ("tasks_quick.json" if args.quick else "tasks.json")
    if path.is_file():  # keep the sections this run did not redo
        kept = json.loads(path.read_text())
        res = {**{k: v for k, v in kept.items() if k in ("packing", "sft", "translate")}, **res}
    atomic_write_text(path, json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
