"""SST-2 sentiment: a TF-IDF baseline and three ways to train a GPT classifier, one run, one table.

    python benchmarks/bench_classify.py [--quick] [--base MODEL_DIR] [--pretrain-minutes 30] [--steps N]

Rows: TF-IDF + logistic regression (scikit-learn); the base's shape trained from scratch
(``scalelm finetune classify --preset ... --model.*=<the base's>``); full fine-tuning of the base
(``--base``); LoRA on the base (``--base --lora.r=8``). Columns: dev accuracy and macro-F1 (the
best/ model of each run, picked by the trainer on a fixed held-out 10% of SST-2 train; dev is scored
once and chooses nothing), trainable parameters, wall time (the whole command: start-up,
training, evaluations), training tokens per second (real, unpadded tokens), peak memory (the
process's peak RSS). Each row runs in its own process.

Without ``--base`` a base is pretrained first (``scalelm prepare`` + ``scalelm train``, at most
``--pretrain-minutes``) on TinyStories plus the SST-2 *train* sentences without their labels (never
the dev set). ``--quick`` shrinks everything to prove the script works in under two minutes; its
numbers mean nothing. Writes benchmarks/results/classify.json (classify_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tfidf_worker(train: str, dev: str) -> None:
    """(a child process, without torch) TF-IDF + logistic regression; prints one JSON line."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    def read(path):  # SST lines: '<label> <sentence>'
        rows = [line.split(" ", 1) for line in Path(path).read_text().splitlines() if line.strip()]
        return [t for _, t in rows], [int(y) for y, _ in rows]

    t = time.perf_counter()
    (x_tr, y_tr), (x_dv, y_dv) = read(train), read(dev)
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(vec.fit_transform(x_tr), y_tr)
    pred = clf.predict(vec.transform(x_dv))
    print(json.dumps({"accuracy": float(accuracy_score(y_dv, pred)),
                      "macro_f1": float(f1_score(y_dv, pred, average="macro")),
                      "trainable_params": int(clf.coef_.size + clf.intercept_.size),
                      "train_seconds": time.perf_counter() - t, "tokens_per_s": None,
                      "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__" and sys.argv[1:2] == ["--tfidf-worker"]:  # the TF-IDF row's own process: no torch
    tfidf_worker(*sys.argv[2:4])
    sys.exit(0)

from _util import RESULTS, ROOT, log, machine, write_json  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SST = DATA / "sst2"
EOT = "<|endoftext|>"
BASE_SHAPE = {"full": dict(n_layer=4, n_head=4, n_embd=256, block_size=128),
              "quick": dict(n_layer=2, n_head=2, n_embd=64, block_size=64)}
# no CPU peak measurement per run (MFU is not reported here; it would cost each run seconds)
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
       "SCALELM_PEAK_TFLOPS": os.environ.get("SCALELM_PEAK_TFLOPS", "1")}


def scalelm(*args, timeout=None) -> tuple[str, float]:
    """Run ``python -m scalelm ARGS``: (stdout, wall seconds); a failure stops the benchmark."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "scalelm", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env=ENV, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"scalelm {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p.stdout, time.perf_counter() - t


# ----------------------------------------------------------------------------- data and base

def subsets(work: Path, quick: bool) -> tuple[Path, Path]:
    """SST-2 train and dev (a slice of each with --quick)."""
    if not quick:
        return SST / "stsa.binary.train", SST / "stsa.binary.dev"
    train, dev = work / "train.txt", work / "dev.txt"
    train.write_text("\n".join((SST / "stsa.binary.train").read_text().splitlines()[:800]) + "\n")
    dev.write_text("\n".join((SST / "stsa.binary.dev").read_text().splitlines()[:200]) + "\n")
    return train, dev


def split_train(work: Path, train: Path, fraction: float = 0.1) -> tuple[Path, Path]:
    """A fixed random 10% of SST-2 train held out for model selection (best/ and early choices), so
    the dev set is scored once, never used to pick anything."""
    import random

    lines = [ln for ln in train.read_text().splitlines() if ln.strip()]
    random.Random(0).shuffle(lines)
    k = max(1, int(len(lines) * fraction))
    fit, held = work / "train_fit.txt", work / "train_heldout.txt"
    fit.write_text("\n".join(lines[k:]) + "\n")
    held.write_text("\n".join(lines[:k]) + "\n")
    return fit, held


def pretrain(work: Path, train_file: Path, minutes: float, quick: bool) -> tuple[Path, dict]:
    """A base model: TinyStories + SST-2 train sentences (labels stripped; no dev text), time-boxed."""
    stories = (DATA / "tinystories" / "tinystories_sample.txt").read_text()
    if quick:
        stories = stories[:300_000]
    sentences = [line.split(" ", 1)[1] for line in train_file.read_text().splitlines() if " " in line]
    corpus = work / "corpus.txt"
    corpus.write_text(stories.rstrip() + f"\n{EOT}\n" + f"\n{EOT}\n".join(sentences) + "\n")
    vocab = 1024 if quick else 8192
    scalelm("prepare", "--input", corpus, "--out", work / "lm-data", "--vocab-size", vocab, "--no-progress",
            "--overwrite")  # a kept --work folder: the corpus is rebuilt above
    shape = BASE_SHAPE["quick" if quick else "full"]
    out, wall = scalelm("train", "--preset", "baby", "--data", work / "lm-data", "--out", work / "pretrain",
                        *[f"--model.{k}={v}" for k, v in shape.items()], "--train.max_steps=100000",
                        f"--train.max_minutes={minutes}", "--train.micro_batch_size=16", "--train.eval_every=500",
                        "--train.eval_iters=10", "--train.save_every=100000", "--optim.warmup_steps=100",
                        "--optim.schedule=wsd", "--log.progress=false")
    s = json.loads(out.splitlines()[-1])
    info = {"corpus": "tinystories_sample.txt + SST-2 train sentences (no labels, no dev)",
            "corpus_bytes": corpus.stat().st_size, "vocab_size": vocab, "steps": s["step"], "tokens": s["tokens"],
            "minutes": round(wall / 60, 2), "val_loss": s.get("val_loss"), "params": s["params"]}
    best = work / "pretrain" / "best"
    return (best if (best / "model.safetensors").is_file() else work / "pretrain"), info


# ----------------------------------------------------------------------------- rows

def tfidf_row(train: Path, dev: Path) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--tfidf-worker", str(train), str(dev)], capture_output=True,
                       text=True, cwd=ROOT / "benchmarks", env=ENV)
    if p.returncode != 0:
        raise SystemExit(f"the TF-IDF worker failed:\n{p.stderr[-3000:]}")
    return {"row": "TF-IDF + logistic regression", **json.loads(p.stdout), "wall_s": time.perf_counter() - t}


def mean_tokens(base: Path, train: Path, max_length: int) -> float:
    from scalelm.tasks.classify.data import TextEncoder, read_examples

    enc = TextEncoder((base / "tokenizer.json").read_text(), max_length)
    ids = enc.encode([e.text for e in read_examples(train)])
    return sum(map(len, ids)) / len(ids)


def evaluate(model_dir: Path, dev: Path) -> dict:
    """What `scalelm eval --task classify` prints, computed here (no second process start-up)."""
    from scalelm.tasks.classify.data import TextEncoder, label_ids, read_examples
    from scalelm.tasks.classify.files import load_classifier
    from scalelm.tasks.classify.metrics import predict_logits, scores

    model, task, d = load_classifier(model_dir)
    enc = TextEncoder((d / "tokenizer.json").read_text(), task["max_length"], task["append_eos"], task["eos_id"],
                      task["pad_id"], lowercase=task.get("lowercase", False))
    ex = read_examples(dev)
    logits = predict_logits(model, enc.encode([e.text for e in ex]), 64, enc.fill_id, "cpu")
    return scores(label_ids(ex, task["labels"]), logits.argmax(1).numpy(), task["labels"])


def finetune_row(name: str, model_args: list, run: Path, train: Path, val: Path, dev: Path, steps: int, lr: float,
                 eval_every: int, tokens_per_example: float, batch: int) -> dict:
    out, wall = scalelm("finetune", "classify", *model_args, "--train", train, "--val", val, "--out", run,
                        f"--train.max_steps={steps}", f"--train.eval_every={eval_every}", f"--optim.lr={lr}",
                        f"--optim.min_lr={lr / 10}", f"--train.micro_batch_size={batch}",
                        f"--optim.warmup_steps={max(1, steps // 20)}", f"--train.save_every={steps}",
                        "--train.log_every=10", "--log.progress=false", "--optim.weight_decay=0.01")
    s = json.loads(out.splitlines()[-1])
    best = run / "best" if s.get("best_dir") else run
    ev = evaluate(best, dev)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    peak = max((r.get("peak_mem_mb") or 0) for r in metrics)
    return {"row": name, "accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"],
            "trainable_params": s["trainable_params"], "params": s["params"], "train_seconds": s["elapsed_s"],
            "tokens_per_s": s["step"] * batch * tokens_per_example / s["elapsed_s"], "peak_mem_mb": peak,
            "wall_s": wall, "best_step": s["best_step"], "steps": s["step"], "lr": lr, "precision": s["precision"]}


def table(rows: list[dict]) -> str:
    head = f"{'':<30}{'accuracy':>9}{'macro-F1':>9}{'trainable':>12}{'wall s':>8}{'tokens/s':>10}{'peak MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        lines.append(f"{r['row']:<30}{r['accuracy']:>9.4f}{r['macro_f1']:>9.4f}{r['trainable_params']:>12,}"
                     f"{r['wall_s']:>8.1f}{tps:>10}{r['peak_mem_mb']:>9.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny everything: proves the script runs (< 2 min)")
    ap.add_argument("--base", help="a pretrained model directory (default: pretrain one here)")
    ap.add_argument("--pretrain-minutes", type=float, default=30.0, help="time box of the pretraining (max 30)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps per row (default 1000; 20 with --quick)")
    ap.add_argument("--work", help="keep the runs in this folder (default: a temporary one)")
    a = ap.parse_args()
    if not 0 < a.pretrain_minutes <= 30:
        raise SystemExit("--pretrain-minutes must be in (0, 30]")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-classify-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = a.steps or (20 if a.quick else 1000)
    batch, eval_every = (16, 10) if a.quick else (32, 100)
    train_all, dev = subsets(work, a.quick)
    train, val = split_train(work, train_all)  # selection on held-out train, dev scored once

    rows = [tfidf_row(train, dev)]
    log(f"TF-IDF: accuracy {rows[0]['accuracy']:.4f}")
    if a.base:
        base, base_info = Path(a.base), {"given": str(Path(a.base).resolve())}
    else:
        minutes = 0.15 if a.quick else a.pretrain_minutes
        log(f"pretraining a base for at most {minutes} min ...")
        base, base_info = pretrain(work, train_all, minutes, a.quick)
    from scalelm.runs import resolve_checkpoint

    base = resolve_checkpoint(base)  # a RUN_DIR: its latest checkpoint
    model_cfg = json.loads((base / "config.json").read_text())["model"]
    tpe = mean_tokens(base, train, model_cfg["block_size"])
    same_shape = [f"--model.{k}={v}" for k, v in model_cfg.items()]  # every field, None included
    specs = [("from scratch (same shape)", ["--preset", "baby", "--tokenizer", base / "tokenizer.json", *same_shape],
              1e-3),
             ("full fine-tune of the base", ["--base", base], 3e-4),
             ("LoRA r=8 on the base", ["--base", base, "--lora.r=8", "--lora.targets=all"], 2e-3)]
    for i, (name, args, lr) in enumerate(specs):
        rows.append(finetune_row(name, args, work / f"run{i}", train, val, dev, steps, lr, eval_every, tpe, batch))
        log(f"{name}: accuracy {rows[-1]['accuracy']:.4f}")

    result = {"benchmark": "SST-2 sentence classification (dev)", "quick": a.quick, "steps": steps,
              "micro_batch": batch, "eval_every": eval_every, "train_examples": sum(1 for _ in open(train)),
              "dev_examples": sum(1 for _ in open(dev)), "mean_train_tokens": round(tpe, 2), "base": base_info,
              "base_model": model_cfg, "rows": rows, "machine": machine(peaks=False),
              "val_examples": sum(1 for _ in open(val)),
              "note": "accuracy/macro-F1 on dev of each run's best/, selected on a held-out 10% of train "
                      "(dev is scored once; no choice was made on it)"}
    path = write_json("classify_quick.json" if a.quick else "classify.json", result, RESULTS)
    print(table(rows))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
