"""Prepare throughput: `scalelm prepare` against a plain single-process loop, same tokenizer.

    python benchmarks/bench_prepare.py                  # Tiny Shakespeare and the TinyStories slice
    python benchmarks/bench_prepare.py --repeats 5
    python benchmarks/bench_prepare.py --memory-mb 200  # also: peak RSS preparing a 200 MB generated corpus

For each corpus a byte-level BPE is trained once (``prepare``); then, in the same run and
alternating, repeated ``--repeats`` times:

- **loop**: the peer: one process, one thread, ``tokenizer.encode(doc)`` one document at a
  time, ids appended to a file (the documents split the way prepare splits them);
- **prepare**: ``prepare(--tokenizer <that tokenizer.json>)``, the full pipeline (scan pass,
  split, parallel batch encoding, shards, meta) without training;
- **prepare+train**: ``prepare(--tokenizer bpe)``, training the BPE too (one run).

MB/s = UTF-8 megabytes of corpus text per second of wall time (medians). The share of the
machine's cores that *other* processes used during the measurements is reported too: on a
shared machine it slows everything down. Writes ``benchmarks/results/prepare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from scalelm.data.prepare import prepare  # noqa: E402
from scalelm.data.sources import Stats, open_source, stream  # noqa: E402
from scalelm.fileio import atomic_write_text  # noqa: E402
from scalelm.hardware import LoadMeter, cpu_name  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CORPORA = {"tinyshakespeare": DATA / "tinyshakespeare" / "input.txt",
           "tinystories-2MiB": DATA / "tinystories" / "tinystories_sample.txt"}
VOCAB = 8192


def plain_loop(path: Path, tokenizer_json: Path, out: Path) -> float:
    """The peer: encode one document at a time in one thread, write the ids."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(tokenizer_json))
    eot = tok.token_to_id("<|endoftext|>")
    docs = path.read_text(encoding="utf-8").split("<|endoftext|>")
    if len(docs) > 1:  # as prepare does: whitespace around a separator belongs to it
        docs = [d.strip() for d in docs]
    with open(out, "wb") as f:
        for doc in docs:
            if doc:
                np.array(tok.encode(doc).ids + [eot], dtype=np.uint16).tofile(f)
    return time.perf_counter() - t0


def timed_prepare(path: Path, out: Path, tokenizer: str) -> float:
    t0 = time.perf_counter()
    prepare(str(path), str(out), tokenizer=tokenizer, vocab_size=VOCAB if tokenizer == "bpe" else None,
            progress=False, block_size=64)
    return time.perf_counter() - t0


def bench_corpus(name: str, path: Path, repeats: int, work: Path) -> dict:
    text_bytes = Stats()
    for _ in stream(open_source(str(path)), text_bytes):
        pass
    mb = text_bytes.bytes / 1e6
    with LoadMeter() as lm_train:
        t_train = timed_prepare(path, work / f"{name}-bpe", "bpe")
    tok_json = work / f"{name}-bpe" / "tokenizer.json"
    loop, pipe = [], []
    with LoadMeter() as lm:
        for _ in range(repeats):
            loop.append(plain_loop(path, tok_json, work / "loop.bin"))
            pipe.append(timed_prepare(path, work / f"{name}-file", str(tok_json)))
    a, b = np.fromfile(work / "loop.bin", np.uint16), np.concatenate(
        [np.fromfile(work / f"{name}-file" / f"{s}.bin", np.uint16) for s in ("train", "val")])
    return {"corpus": name, "mb": round(mb, 3), "tokens": int(len(b)),
            "same_token_count": bool(len(a) == len(b)), "same_token_multiset": bool(np.array_equal(np.sort(a), np.sort(b))),
            "loop_s": loop, "prepare_s": pipe, "prepare_train_s": t_train,
            "loop_mb_s": mb / statistics.median(loop), "prepare_mb_s": mb / statistics.median(pipe),
            "prepare_train_mb_s": mb / t_train, "speedup": statistics.median(loop) / statistics.median(pipe),
            "others_load": lm.other, "others_load_train": lm_train.other}


def bench_memory(size_mb: int, work: Path) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_data_memory import MEASURE, write_corpus

    child = "import time\nfrom scalelm.data.prepare import prepare\n" + MEASURE + """
t = time.perf_counter()
meta = prepare(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], vocab_size=int(sys.argv[4]) or None,
               tokenizer_sample="16MB", progress=False)
secs = time.perf_counter() - t
print(json.dumps({"base_mb": base, "peak_mb": vm("VmHWM"), "secs": secs, "text_mb": meta["stats"]["bytes"] / 1e6}))
"""

    corpus = work / "synthetic.txt"
    write_corpus(corpus, size_mb << 20)
    rows = []
    for tokenizer, vocab in (("byte", 0), ("bpe", 4096)):
        with LoadMeter() as lm:
            p = subprocess.run([sys.executable, "-c", child, str(corpus), str(work / f"mem-{tokenizer}"),
                                tokenizer, str(vocab)], capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            sys.exit(f"memory run failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.splitlines()[-1])
        rows.append({"tokenizer": tokenizer, "corpus_mb": round(r["text_mb"], 1), "rss_growth_mb": round(r["peak_mb"] - r["base_mb"], 1),
                     "peak_rss_mb": round(r["peak_mb"], 1), "mb_s": r["text_mb"] / r["secs"], "others_load": lm.other})
        shutil.rmtree(work / f"mem-{tokenizer}", ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-mb", type=int, default=0, help="also measure peak RSS on a generated corpus this big")
    args = ap.parse_args()
    missing = [str(p) for p in CORPORA.values() if not p.is_file()]
    if missing:
        sys.exit(f"missing corpora: {missing} (expected ../shared/data beside the repo)")
    with tempfile.TemporaryDirectory(prefix="bench_prepare.") as tmp:
        work = Path(tmp)
        rows = [bench_corpus(name, path, args.repeats, work) for name, path in CORPORA.items()]
        memory = bench_memory(args.memory_mb, work) if args.memory_mb else []

    print(f"\nprepare throughput, byte-level BPE {VOCAB}, median of {args.repeats} ({cpu_name()}, "
          f"{os.cpu_count()} cores)")
    print(f"{'corpus':<18}{'MB':>7}{'loop MB/s':>11}{'prepare MB/s':>14}{'speed-up':>10}{'+train MB/s':>13}{'others':>8}")
    for r in rows:
        print(f"{r['corpus']:<18}{r['mb']:>7.2f}{r['loop_mb_s']:>11.2f}{r['prepare_mb_s']:>14.2f}"
              f"{r['speedup']:>9.2f}x{r['prepare_train_mb_s']:>13.2f}{r['others_load']:>8.0%}")
    if memory:
        print("\npeak memory on a generated corpus (BPE trained on a 16 MB sample)")
        print(f"{'tokenizer':<10}{'text MB':>9}{'RSS growth MB':>15}{'peak RSS MB':>13}{'MB/s':>7}{'others':>8}")
        for m in memory:
            print(f"{m['tokenizer']:<10}{m['corpus_mb']:>9.0f}{m['rss_growth_mb']:>15.0f}{m['peak_rss_mb']:>13.0f}"
                  f"{m['mb_s']:>7.1f}{m['others_load']:>8.0%}")
    result = {"benchmark": "prepare", "cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
              "repeats": args.repeats, "vocab_size": VOCAB, "rows": rows, "memory": memory,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = ROOT / "benchmarks" / "results" / "prepare.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
