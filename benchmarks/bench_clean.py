"""Cleaning in `scalelm prepare`: its cost, and what deduplication does to memorization.

    python benchmarks/bench_clean.py                      # both parts (10-25 minutes on 2 cores)
    python benchmarks/bench_clean.py --part prepare       # or: --part memorization
    python benchmarks/bench_clean.py --part memorization --epochs 6 --copies 30

**prepare**: `prepare --tokenizer byte --doc-sep blank` of ../shared/data/pretrain_text (62 MB; blank
lines make 49k documents: paragraphs, and the novels that have none whole), once with no cleaning,
once per step alone, and once with every step (`--dedup minhash`). Each run is its own process:
MB/s = UTF-8 megabytes of input text over the whole prepare's wall time (scan with cleaning, encode,
write); peak RSS = the process's VmHWM; growth = the peak minus the RSS after imports (datasketch,
which loads scipy, is imported before). The byte tokenizer keeps encoding cheap, so the cost of
cleaning shows; a BPE tokenizer's encoding adds the same to every row. Decontamination runs against
three evaluation files: the SST-2 dev set, Multi30k val.en and the UD English-EWT dev set.

**memorization**: a slice of TinyStories with planted duplicates (`--planted` stories, each copied
`--copies` times at random places). A byte-level BPE (2048) is trained on it; the corpus is prepared
twice with that tokenizer, without and with `--dedup exact`; a 4-layer, 128-wide model trains on each
for the same number of steps (`--epochs` passes over the duplicated corpus). Then extractable
memorization (32-token prefix, 32 greedy tokens, `scalelm.evaluate.memorization`) on: the planted
stories (from their first token), random windows of the duplicated corpus's train split, and its
val split.

The share of the cores other processes used during each measurement is reported: on a shared machine
it slows everything down (the numbers are then upper bounds of the time). Writes
benchmarks/results/clean.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scalelm.hardware import LoadMeter, cpu_name  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CORPUS = DATA / "pretrain_text"
EVALS = [DATA / "sst2" / "stsa.binary.dev", DATA / "multi30k" / "val.en", DATA / "ud_english_ewt" / "en_ewt-ud-dev.conllu"]
STORIES = DATA / "tinystories" / "tinystories_sample.txt"

CHILD = """
import json, sys, time
import datasketch.lsh  # library code (with scipy) is loaded before the baseline: it is not data
from scalelm.data.prepare import prepare
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = vm("VmRSS")
except OSError:
    base = vm("VmHWM")
t = time.perf_counter()
meta = prepare(sys.argv[1], sys.argv[2], tokenizer="byte", doc_sep="blank", glob="**/*.txt", progress=False,
               overwrite=True, **json.loads(sys.argv[3]))
secs = time.perf_counter() - t
print(json.dumps({"secs": secs, "base_mb": base, "peak_mb": vm("VmHWM"), "stats": meta["stats"],
                  "clean": meta.get("clean")}))
"""

STEPS = {
    "none": {},
    "decontaminate": {"decontaminate": [str(p) for p in EVALS]},
    "quality": {"quality_filter": True},
    "dedup exact": {"dedup": "exact"},
    "dedup minhash": {"dedup": "minhash"},
    "scrub_pii": {"scrub_pii": True},
    "all": {"decontaminate": [str(p) for p in EVALS], "quality_filter": True, "dedup": "minhash", "scrub_pii": True},
}


def bench_prepare(work: Path) -> list[dict]:
    rows = []
    for name, kw in STEPS.items():
        print(f"prepare: {name} ...", file=sys.stderr, flush=True)
        with LoadMeter() as lm:
            p = subprocess.run([sys.executable, "-c", CHILD, str(CORPUS), str(work / "out"), json.dumps(kw)],
                               capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            sys.exit(f"prepare ({name}) failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.splitlines()[-1])
        mb = r["stats"]["bytes"] / 1e6
        clean = r["clean"] or {}
        rows.append({"step": name, "options": kw, "text_mb": round(mb, 2), "secs": round(r["secs"], 2),
                     "mb_s": round(mb / r["secs"], 2), "peak_rss_mb": round(r["peak_mb"], 1),
                     "rss_growth_mb": round(r["peak_mb"] - r["base_mb"], 1), "documents": r["stats"]["documents"],
                     "kept": clean.get("documents", {}).get("out", r["stats"]["documents"]),
                     "removed": clean.get("removed", {}), "pii_replaced": clean.get("pii_replaced"),
                     "others_load": round(lm.other, 3)})
    return rows


# ----------------------------------------------------------------------------- memorization

def planted_corpus(path: Path, out: Path, base_bytes: int, planted: int, copies: int, seed: int = 0) -> list[str]:
    """The first ``base_bytes`` of stories, with ``planted`` of them (chosen at random) copied
    ``copies`` more times at random places; returns the planted stories."""
    stories, size = [], 0
    for s in path.read_text(encoding="utf-8").split("<|endoftext|>"):
        s = s.strip()
        if s:
            stories.append(s)
            size += len(s.encode())
            if size >= base_bytes:
                break
    rng = random.Random(seed)
    chosen = rng.sample(stories, planted)
    docs = stories + [s for s in chosen for _ in range(copies)]
    rng.shuffle(docs)
    out.write_text("\n<|endoftext|>\n".join(docs) + "\n", encoding="utf-8")
    return chosen


def scalelm(*args) -> str:
    env = {**os.environ, "SCALELM_PEAK_TFLOPS": "1"}  # no CPU peak measurement: it only feeds the MFU column
    p = subprocess.run([sys.executable, "-m", "scalelm", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env=env)
    if p.returncode:
        sys.exit(f"scalelm {' '.join(map(str, args[:2]))} failed:\n{p.stderr[-3000:]}")
    return p.stdout


MODEL = ["--model.n_layer=4", "--model.n_head=4", "--model.n_embd=128", "--model.block_size=128",
         "--train.micro_batch_size=16", "--optim.lr=2e-3", "--optim.min_lr=2e-4", "--optim.warmup_steps=50",
         "--train.eval_every=100000", "--train.save_every=100000", "--train.log_every=100", "--log.progress=false"]


def bench_memorization(work: Path, base_bytes: int, planted: int, copies: int, epochs: float, samples: int) -> dict:
    import numpy as np
    import torch

    from scalelm.data.loader import TokenData
    from scalelm.evaluate.memorization import extraction, memorization
    from scalelm.generate.generator import Generator

    corpus = work / "planted.txt"
    chosen = planted_corpus(STORIES, corpus, base_bytes, planted, copies)
    print("memorization: prepare ...", file=sys.stderr, flush=True)
    dup = json.loads(scalelm("prepare", "--input", corpus, "--out", work / "dup", "--vocab-size", "2048",
                             "--seq-len", "128", "--no-progress"))
    ded = json.loads(scalelm("prepare", "--input", corpus, "--out", work / "dedup", "--tokenizer", work / "dup",
                             "--seq-len", "128", "--dedup", "exact", "--no-progress"))
    steps = int(epochs * dup["splits"]["train"]["tokens"] / (16 * 128))
    data = TokenData(work / "dup")
    tok = data.tokenizer()
    # the planted stories' first 64 tokens (the end-of-text before them, as in the corpus, then 63 of theirs)
    heads = [[data.eot_id] + tok.encode(s, add_special_tokens=False).ids for s in chosen]
    windows = np.array([h[:64] for h in heads if len(h) >= 64], dtype=np.int64)
    out = {"corpus": {"base_bytes": base_bytes, "planted": planted, "copies": copies, "bytes": corpus.stat().st_size,
                      "documents": dup["stats"]["documents"], "removed_by_dedup": ded["clean"]["removed"]["dedup"],
                      "train_tokens": {"duplicated": dup["splits"]["train"]["tokens"],
                                       "deduplicated": ded["splits"]["train"]["tokens"]}},
           "steps": steps, "epochs": epochs, "tokens_per_step": 16 * 128, "runs": {}}
    for name in ("duplicated", "deduplicated"):
        d = work / ("dup" if name == "duplicated" else "dedup")
        print(f"memorization: train on the {name} corpus ({steps} steps) ...", file=sys.stderr, flush=True)
        with LoadMeter() as lm:
            t = time.perf_counter()
            scalelm("train", "--data", d, "--out", work / f"run-{name}", f"--train.max_steps={steps}", *MODEL)
            secs = time.perf_counter() - t
        torch.set_num_threads(os.cpu_count() or 1)
        gen = Generator.from_checkpoint(work / f"run-{name}", dtype="float32")
        res = memorization(gen, data, samples=samples, batch_size=32, unprompted_samples=0)["memorization"]
        res["planted"] = extraction(gen, windows, 32, batch_size=32)
        res["train_secs"] = round(secs, 1)
        res["others_load"] = round(lm.other, 3)
        out["runs"][name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "prepare", "memorization"), default="all")
    ap.add_argument("--base-mb", type=float, default=0.25, help="TinyStories text before planting (0.25 MB)")
    ap.add_argument("--planted", type=int, default=10, help="stories planted (10)")
    ap.add_argument("--copies", type=int, default=30, help="extra copies of each (30)")
    ap.add_argument("--epochs", type=float, default=8, help="passes over the duplicated corpus (8)")
    ap.add_argument("--samples", type=int, default=200, help="train and val windows for the measure (200)")
    args = ap.parse_args()
    for p in [CORPUS, STORIES, *EVALS]:
        if not p.exists():
            sys.exit(f"missing {p} (expected ../shared/data beside the repo)")
    result = {"benchmark": "clean", "cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = ROOT / "benchmarks" / "results" / "clean.json"
    if out.is_file():  # a part run alone keeps the other part's last numbers
        result = {**json.loads(out.read_text()), **result}
    with tempfile.TemporaryDirectory(prefix="bench_clean.") as tmp:
        if args.part in ("all", "prepare"):
            result["prepare"] = bench_prepare(Path(tmp))
        if args.part in ("all", "memorization"):
            result["memorization"] = bench_memorization(Path(tmp), int(args.base_mb * 1e6), args.planted, args.copies,
                                                        args.epochs, args.samples)
    if "prepare" in result:
        rows = result["prepare"]
        print(f"\nprepare of pretrain_text ({rows[0]['text_mb']:.1f} MB, {rows[0]['documents']:,} documents, byte "
              f"tokenizer; {result['cpu']}, {result['cores']} cores)")
        print(f"{'cleaning':<15}{'MB/s':>7}{'s':>7}{'peak RSS MB':>13}{'growth MB':>11}{'kept docs':>11}  removed / replaced"
              f"{'':>6}others")
        for r in rows:
            what = ", ".join(f"{k} {v:,}" for k, v in r["removed"].items())
            if r["pii_replaced"]:
                what = ", ".join(filter(None, [what, " ".join(f"{k} {v}" for k, v in r["pii_replaced"].items() if v)]))
            print(f"{r['step']:<15}{r['mb_s']:>7.2f}{r['secs']:>7.1f}{r['peak_rss_mb']:>13.0f}{r['rss_growth_mb']:>11.0f}"
                  f"{r['kept']:>11,}  {what or '-':<24}{r['others_load']:>6.0%}")
    if "memorization" in result:
        m = result["memorization"]
        c = m["corpus"]
        print(f"\nmemorization: TinyStories {c['bytes'] / 1e6:.2f} MB with {c['planted']} stories x {c['copies'] + 1} "
              f"copies; 4x128 model, {m['steps']} steps ({m['epochs']:g} epochs of the duplicated corpus); "
              f"extractable = 32 greedy tokens after a 32-token prefix")
        print(f"{'trained on':<14}{'train tokens':>13}{'planted':>10}{'train':>8}{'val':>8}{'train tok acc':>15}"
              f"{'train s':>9}{'others':>8}")
        for name, r in m["runs"].items():
            print(f"{name:<14}{c['train_tokens'][name]:>13,}{r['planted']['extractable_rate']:>10.1%}"
                  f"{r['train']['extractable_rate']:>8.1%}{r['val']['extractable_rate']:>8.1%}"
                  f"{r['train']['token_accuracy']:>15.1%}{r['train_secs']:>9.0f}{r['others_load']:>8.0%}")
    from scalelm.fileio import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
