"""Encoders vs GPTs on token and sequence classification (issue 30): CoNLL-2003 NER, UD EWT UPOS, SST-2.

    python benchmarks/bench_encoder.py --quick      # every stage at toy scale: the plumbing works (a few minutes)
    python benchmarks/bench_encoder.py              # the full chain (about 2 h on 2 quiet cores)
    python benchmarks/bench_encoder.py --work DIR   # keep the runs; a stage whose output is there is reused

Stages, each a real CLI run in a subprocess (``bench_tasks.scalelm``):
  bases     ``prepare`` ../shared/data/pretrain_text (62 MB of general English, BPE 8,192), then an encoder
            (``--preset encoder-cpu``: ModernBERT's block, 4 x 256, context 128, masked LM) and a Llama-style
            GPT of the same width, depth, MLP and context (next-token LM), each for the same
            ``--pretrain-minutes`` on the same shards;
  tasks     ``finetune tokens`` on CoNLL-2003 (model selection on the last 1,000 training sentences; entity
            F1 on ``valid.txt``, seqeval strict IOB2, through ``eval --task tokens``) and on UD EWT (UPOS;
            selection on the last 1,000 training sentences; token accuracy on dev), ``finetune classify`` on
            SST-2 (selection on the last 10% of train; accuracy on dev). Rows: the encoder base, the GPT
            base, and both shapes from scratch (``--preset`` on the same tokenizer), the same steps each;
  floors    a CRF over word-shape features (sklearn-crfsuite: the word lowercased, its shape, prefixes and
            suffixes, the same for the words either side), a most-frequent-tag baseline (each training
            word's commonest tag; unseen words the commonest tag overall), TF-IDF + logistic regression
            for SST-2.
The dev/valid files are scored once per model and choose nothing. Goals (issue 30): NER F1 85, UPOS 94%,
SST-2 85%. Writes ``benchmarks/results/encoder[_quick].json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_tasks import COMMON, DATA, general_english, log, scalelm  # noqa: E402  (one subprocess harness for every task benchmark)

from scalelm.fileio import atomic_write_text  # noqa: E402
from scalelm.hardware import cpu_name  # noqa: E402

CONLL = DATA / "conll2003"
EWT = DATA / "ud_english_ewt"
SST = DATA / "sst2"
GOALS = {"ner": 0.85, "upos": 0.94, "sst2": 0.85}


# ----------------------------------------------------------------------------- data splits

def blocks(text: str) -> list[str]:
    """A CoNLL/CoNLL-U file's sentences (blank-line separated blocks), ``-DOCSTART-`` blocks dropped."""
    out = [b.strip("\n") for b in text.replace("\r\n", "\n").split("\n\n")]
    return [b for b in out if b.strip() and not b.lstrip().startswith("-DOCSTART-")]


def split_tail(src: list[Path], work: Path, name: str, n_val: int, limit: int | None) -> tuple[Path, Path]:
    """(train, val) files: the sentences of ``src`` less their last ``n_val``, and those last ``n_val``."""
    sents = blocks("".join(p.read_text() for p in src))
    train, val = sents[:-n_val], sents[-n_val:]
    if limit:
        train = train[:limit]
    ext = src[0].suffix
    tr, va = work / f"{name}.train{ext}", work / f"{name}.val{ext}"
    tr.write_text("\n\n".join(train) + "\n\n")
    va.write_text("\n\n".join(val) + "\n\n")
    return tr, va


def limit_file(src: Path, work: Path, name: str, limit: int | None) -> Path:
    if not limit:
        return src
    out = work / f"{name}{src.suffix}"
    out.write_text("\n\n".join(blocks(src.read_text())[:limit]) + "\n\n")
    return out


def sst_split(work: Path, limit: int | None) -> tuple[Path, Path, Path]:
    lines = [x for x in (SST / "stsa.binary.train").read_text().splitlines() if x.strip()]
    n_val = len(lines) // 10
    train, val = lines[:-n_val], lines[-n_val:]
    dev = [x for x in (SST / "stsa.binary.dev").read_text().splitlines() if x.strip()]
    if limit:
        train, val, dev = train[:limit], val[:limit // 4], dev[:limit // 2]
    paths = [work / "sst.train.txt", work / "sst.val.txt", work / "sst.dev.txt"]
    for p, rows in zip(paths, (train, val, dev)):
        p.write_text("\n".join(rows) + "\n")
    return paths[0], paths[1], paths[2]


# ----------------------------------------------------------------------------- classical floors

def _shape(w: str) -> str:
    s = "".join("X" if c.isupper() else "x" if c.islower() else "d" if c.isdigit() else c for c in w)
    out = s[:1]
    for c in s[1:]:  # runs collapsed: Xxxxx -> Xx, dd-dd -> d-d
        if c != out[-1]:
            out += c
    return out


def _features(words: list[str], i: int) -> dict:
    f = {"bias": 1.0}
    for off in (-1, 0, 1):
        j = i + off
        if not 0 <= j < len(words):
            f[f"{off}:edge"] = 1.0
            continue
        w = words[j]
        f.update({f"{off}:lower": w.lower(), f"{off}:shape": _shape(w), f"{off}:title": w.istitle(),
                  f"{off}:upper": w.isupper(), f"{off}:digit": w.isdigit()})
        if off == 0:
            f.update({"suf3": w[-3:].lower(), "suf2": w[-2:].lower(), "pre3": w[:3].lower(), "len": min(len(w), 10)})
    return f


def _read(path: Path, **kw):
    from scalelm.tasks.tokens.data import read_labelled

    sents, _ = read_labelled(path, {"format": None, **kw})
    return [s.words for s in sents], [s.tags for s in sents]


def floors(train: Path, evalf: Path, spans: bool, max_iter: int) -> dict:
    """The CRF and most-frequent-tag rows of one task, scored as the models are (tokens/metrics.scores)."""
    import sklearn_crfsuite

    from scalelm.tasks.tokens.metrics import scores

    xw, xt = _read(train)
    ew, et = _read(evalf)
    out = {}
    t = time.perf_counter()
    counts: dict = defaultdict(Counter)
    for ws, ts in zip(xw, xt):
        for w, tag in zip(ws, ts):
            counts[w][tag] += 1
    overall = Counter(tag for ts in xt for tag in ts).most_common(1)[0][0]
    pred = [[counts[w].most_common(1)[0][0] if w in counts else overall for w in ws] for ws in ew]
    out["most-frequent tag"] = {**_summary(scores(et, pred, spans), spans), "train_s": round(time.perf_counter() - t, 1)}
    t = time.perf_counter()
    crf = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=0.1, c2=0.1, max_iterations=max_iter)
    crf.fit([[_features(ws, i) for i in range(len(ws))] for ws in xw], xt)
    pred = crf.predict([[_features(ws, i) for i in range(len(ws))] for ws in ew])
    out["CRF (word shape)"] = {**_summary(scores(et, pred, spans), spans), "train_s": round(time.perf_counter() - t, 1)}
    return out


def _summary(s: dict, spans: bool) -> dict:
    return {"f1": s["f1"], "precision": s["precision"], "recall": s["recall"], "accuracy": s["accuracy"]} if spans \
        else {"accuracy": s["accuracy"]}


def tfidf(train: Path, dev: Path) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def read(p):
        rows = [x.split(" ", 1) for x in p.read_text().splitlines() if x.strip()]
        return [r[1] for r in rows], [int(r[0]) for r in rows]

    (xt, yt), (xd, yd) = read(train), read(dev)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(vec.fit_transform(xt), yt)
    return {"accuracy": float((clf.predict(vec.transform(xd)) == yd).mean())}


# ----------------------------------------------------------------------------- the chain

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy scale: proves the plumbing; its numbers mean nothing")
    ap.add_argument("--work", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--pretrain-minutes", type=float, default=20.0, help="each base's pretraining (full mode)")
    ap.add_argument("--steps", type=int, default=1500, help="fine-tuning steps of every task row (full mode)")
    ap.add_argument("--tasks", default="ner,upos,sst2")
    args = ap.parse_args()
    q = args.quick
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_encoder_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"cpu": cpu_name(), "cores": os.cpu_count(), "quick": q, "goals": GOALS, "tasks": {}}
    t0 = time.perf_counter()

    # ---- bases: the same shards, the same shape, the same minutes
    prep = general_english(work, q)
    width = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64", "--model.intermediate_size=128"] if q \
        else ["--model.n_layer=4", "--model.n_head=4", "--model.n_embd=256", "--model.intermediate_size=512"]
    enc_shape = ["--preset", "encoder-cpu", *width, "--model.block_size=128"]
    gpt_shape = ["--preset", "llama-60m", *width, "--model.n_kv_head=" + ("2" if q else "4"),
                 "--model.block_size=128", "--model.tie_embeddings=true"]
    budget = ["--train.max_steps=20"] if q else [f"--train.max_minutes={args.pretrain_minutes}"]
    bases = {}
    for name, shape in (("encoder", enc_shape), ("gpt", gpt_shape)):
        run = work / f"base_{name}"
        s, info = scalelm("train", "--data", prep, "--out", run, *shape, *budget, "--train.micro_batch_size=16",
                          f"--train.eval_every={10 if q else 500}", *COMMON)
        bases[name] = {"steps": s.get("step"), "val_loss": s.get("val_loss"), "params": s.get("params"),
                       "tokens": s.get("tokens"), **info}
        log(f"base {name}: {bases[name]}")
    res["bases"] = bases
    rows = {"encoder (pretrained)": ["--base", work / "base_encoder" / "best"],
            "GPT (pretrained)": ["--base", work / "base_gpt" / "best"],
            "encoder (from scratch)": [*enc_shape, "--tokenizer", prep],
            "GPT (from scratch)": [*gpt_shape, "--tokenizer", prep]}
    steps = 30 if q else args.steps
    tune = [f"--train.max_steps={steps}", f"--train.eval_every={15 if q else 250}", "--train.micro_batch_size=16",
            "--optim.lr=1e-3" if q else "--optim.lr=3e-4", "--optim.warmup_steps=" + ("3" if q else "100"), *COMMON]
    limit = 300 if q else None

    def tokens_task(key: str, train: Path, val: Path, evalf: Path, spans: bool, extra: list) -> dict:
        out = floors(train, evalf, spans, 20 if q else 100)
        for row, src in rows.items():
            run = work / f"{key}_{row.split()[0].lower()}_{'pre' if 'pretrained' in row else 'scratch'}"
            s, info = scalelm("finetune", "tokens", *src, "--train", train, "--val", val, "--out", run, *extra, *tune)
            e, _ = scalelm("eval", run / "best", "--task", "tokens", "--data", evalf, *extra)
            out[row] = {**_summary(e, spans), "steps": s.get("step"), "epochs": s.get("epochs"), **info}
            log(f"{key} {row}: {out[row]}")
        return out

    tasks = args.tasks.split(",")
    if "ner" in tasks:
        tr, va = split_tail([CONLL / "train.txt"], work, "conll", 100 if q else 1000, limit)
        res["tasks"]["ner"] = tokens_task("ner", tr, va, limit_file(CONLL / "valid.txt", work, "conll.valid", limit),
                                          True, [])
    if "upos" in tasks:
        parts = [EWT / f"en_ewt-ud-train.part{i}.conllu" for i in range(4)]
        tr, va = split_tail(parts, work, "ewt", 100 if q else 1000, limit)
        dev = limit_file(EWT / "en_ewt-ud-dev.conllu", work, "ewt.dev", limit)
        res["tasks"]["upos"] = tokens_task("upos", tr, va, dev, False, ["--tag-field", "upos"])
    if "sst2" in tasks:
        tr, va, dev = sst_split(work, limit)
        out = {"TF-IDF + logistic regression": tfidf(tr, dev)}
        for row, src in rows.items():
            run = work / f"sst2_{row.split()[0].lower()}_{'pre' if 'pretrained' in row else 'scratch'}"
            s, info = scalelm("finetune", "classify", *src, "--train", tr, "--val", va, "--out", run, *tune)
            e, _ = scalelm("eval", run / "best", "--task", "classify", "--data", dev)
            out[row] = {"accuracy": e["accuracy"], "steps": s.get("step"), "epochs": s.get("epochs"), **info}
            log(f"sst2 {row}: {out[row]}")
        res["tasks"]["sst2"] = out
    res["total_s"] = round(time.perf_counter() - t0, 1)
    path = ROOT / "benchmarks" / "results" / ("encoder_quick.json" if q else "encoder.json")
    atomic_write_text(path, json.dumps(res, indent=2) + "\n")

    print("| task (metric, goal) | row | score |")
    print("|---|---|---:|")
    metric = {"ner": "f1", "upos": "accuracy", "sst2": "accuracy"}
    for task, rows_ in res["tasks"].items():
        for row, r in rows_.items():
            print(f"| {task} ({metric[task]}, {GOALS[task]:.0%}) | {row} | {r[metric[task]]:.1%} |")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
