"""AESLC summarization benchmark (issue 33): email body -> subject line, each step a real CLI run.

    python benchmarks/bench_summarize.py --quick        # toy scale (a couple of minutes): the plumbing works
    python benchmarks/bench_summarize.py                # the full table: 2 bases x --pretrain-minutes, 4 rows x
                                                        # --minutes of fine-tuning, decoding (about 4 h 30 min)
    python benchmarks/bench_summarize.py --only-bases --add   # the base rows alone, kept beside the others

The encoder-decoder (``transformer-small``: 3 + 3 layers, 256 wide) against a decoder-only GPT of
about equal parameters (7 layers, 256 wide), both from scratch on their own 8,000-token BPE, each
trained ``--minutes`` (default 45; the cosine schedule ends with the budget) on 2 threads. The four
training parts are concatenated and shuffled (seed 0: they are grouped by mailbox), and a fixed 5%
of them validates during training (the loss that picks ``best/``); AESLC's ``validation.jsonl``
is touched only by the final ``scalelm eval --task summarize``: ROUGE-1/2/L/Lsum F1 against the
original subject and against all four human subjects, greedy and with 4 beams, beside the lead-8
baseline scored by the same code. Sources are cut to ``--max-source-length`` tokens (256).
From a general-English base (rows ``ARCH_from_base``): two GPTs of the rows' depths (3 and 7 layers,
256 wide, GPT-2 blocks, 320 positions) are pretrained ``--pretrain-minutes`` each (default 20) on
pretrain_text (62 MB, its own 8,192-token BPE: ``bench_tasks.general_english``); the 7-layer one is
fine-tuned as the decoder-only model, the 3-layer one warm-starts both halves of the encoder-decoder
(``--model.arch=encoder-decoder``: Rothe et al. 2020, cross-attention new). Each is fine-tuned the
same ``--minutes`` at a learning rate of 3e-4 (a third of from scratch, so the pretraining is not
washed out; fixed beforehand, not tuned on validation). ``--pretrain-minutes 0`` skips these rows;
``--base ARCH=MODEL_DIR`` uses a base of your own instead. ``--archs`` picks the architectures and
``--add`` keeps the rows of an earlier results file, so the table can be measured in parts
(``--rescore`` decodes the runs kept in ``--work`` again without training them). Each row also
records how many distinct summaries it wrote and ``reference_loss``: the subjects' loss given their
own emails and given other records' (does the model read the email at all?).

Others' share of the CPU during each run is recorded (``LoadMeter``). Writes
``benchmarks/results/summarize[_quick].json``; the goal (ROUGE-1 >= 25 against the original
subject on validation) is checked in ``goal_met``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench_tasks import COMMON, ROOT, general_english, log, scalelm, val_curve

from scalelm.fileio import atomic_write_text
from scalelm.hardware import cpu_name

AESLC = ROOT.parent / "shared" / "data" / "aeslc"
FIELDS = ["--source-field", "email_body", "--target-field", "subject_line"]
GOAL_ROUGE1 = 25.0
MAX_SOURCE = 256
SHAPES = {  # about equal parameters: 3 encoder + 3 decoder layers (with cross-attention) ~ 7 decoder layers
    "encoder-decoder": ["--preset", "transformer-small", "--model.block_size=256", "--train.micro_batch_size=32"],
    "decoder-only": ["--preset", "baby", "--model.n_layer=7", "--model.n_head=4", "--model.n_embd=256",
                     "--model.intermediate_size=1024", "--model.block_size=320", "--model.dropout=0.1",
                     "--train.micro_batch_size=16"],  # packed 320-token windows: about the tokens of 32 pairs
}
BASES = {  # the general-English GPT each architecture starts from: the rows' depths and width
    "encoder-decoder": ["--preset", "baby", "--model.n_layer=3", "--model.n_head=4", "--model.n_embd=256",
                        "--model.intermediate_size=1024", "--model.block_size=320"],
    "decoder-only": ["--preset", "baby", "--model.n_layer=7", "--model.n_head=4", "--model.n_embd=256",
                     "--model.intermediate_size=1024", "--model.block_size=320"],
}
QUICK_BASE = ["--preset", "baby", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64",
              "--model.intermediate_size=256", "--model.block_size=96"]
QUICK_SHAPE = ["--model.n_layer=2", "--model.n_encoder_layer=1", "--model.n_decoder_layer=1", "--model.n_head=2",
               "--model.n_embd=64", "--model.intermediate_size=256", "--model.block_size=96",
               "--train.micro_batch_size=16"]


def write_data(work: Path, quick: bool) -> tuple[Path, Path]:
    """The shuffled training records and the validation records (fewer of each with ``quick``)."""
    lines = [x for part in sorted(AESLC.glob("train.part*.jsonl"))
             for x in part.read_text(encoding="utf-8").splitlines() if x.strip()]
    random.Random(0).shuffle(lines)  # the parts are grouped by mailbox
    val = [x for x in (AESLC / "validation.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    if quick:
        lines, val = lines[:400], val[:40]
    train_p, val_p = work / "train.jsonl", work / "validation.jsonl"
    train_p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    val_p.write_text("\n".join(val) + "\n", encoding="utf-8")
    return train_p, val_p


def pretrain_bases(work: Path, quick: bool, minutes: float, archs: list[str]) -> tuple[dict, dict]:
    """({arch: base model dir}, {arch: what its pretraining reached}) for ``archs``."""
    prep = general_english(work, quick)
    dirs, rows = {}, {}
    for arch in archs:
        run = work / f"base_{arch}"
        budget = ["--train.max_steps=20"] if quick else [f"--train.max_minutes={minutes}"]
        s, info = scalelm("train", "--data", prep, "--out", run, *(QUICK_BASE if quick else BASES[arch]), *budget,
                          "--train.micro_batch_size=16", f"--train.eval_every={10 if quick else 500}", *COMMON)
        dirs[arch] = str(run / "best")
        rows[arch] = {"shape": " ".join(QUICK_BASE if quick else BASES[arch]), "steps": s.get("step"),
                      "val_loss": s.get("val_loss"), "params": s.get("params"), "tokens": s.get("tokens"), **info}
        log(f"base {arch}: {rows[arch]}")
    return dirs, rows


def rouge_row(res: dict) -> dict:
    r = {"rouge": {k: round(v, 2) for k, v in res["rouge"].items()}}
    if "rouge_all_references" in res:
        r["rouge_all_references"] = {k: round(v, 2) for k, v in res["rouge_all_references"].items()}
    return r


def bench(work: Path, quick: bool, minutes: float, archs: list[str], bases: dict[str, str], pretrain_minutes: float,
          only_bases: bool, rescore: bool, save, kept: dict) -> dict:
    """``save(out)`` is called after every row, so a run cut short keeps the rows it finished; the rows of
    ``kept`` (an earlier results file, with ``--add``) stay unless rerun."""
    train, val = write_data(work, quick)
    msl = 48 if quick else MAX_SOURCE
    out = {**kept, "budget_minutes": None if quick else minutes, "threads": 2, "max_source_length": msl,
           "train_records": sum(1 for _ in train.open()), "validation_records": sum(1 for _ in val.open())}
    floor = scalelm("eval", "none", "--task", "summarize", "--data", val, *FIELDS, "--baseline",
                    "lead-8")[0]["baseline"]
    out["lead-8"] = {**rouge_row(floor), "hypothesis_lengths": floor["hypothesis_lengths"],
                     "reference_lengths": floor["reference_lengths"]}
    log(f"lead-8: {out['lead-8']['rouge']}")
    rows = [] if only_bases else [(arch, SHAPES[arch][:3] + QUICK_SHAPE if quick else SHAPES[arch], None)
                                  for arch in archs]
    if pretrain_minutes > 0:
        made, out["bases"] = pretrain_bases(work, quick, pretrain_minutes, [a for a in archs if a not in bases])
        save(out)
        bases = {**made, **bases}
    rows += [(f"{arch}_from_base", ["--model.arch=encoder-decoder"] if arch == "encoder-decoder" else [], base)
             for arch, base in bases.items()]
    for name, shape, base in rows:
        run = work / f"summarize_{name}"
        steps = 60 if quick else 1_000_000
        budget = [] if quick else [f"--train.max_minutes={minutes}"]  # cosine to min_lr when the minutes run out
        if base:  # the base's shape; the rows' dropout and micro-batch, a third of the from-scratch rate
            start = ["--base", base, *shape, f"--optim.lr={3e-3 if quick else 3e-4}", "--optim.min_lr=3e-5",
                     "--model.dropout=0.1", *SHAPES[name.removesuffix("_from_base")][-1:]]
        else:
            start = [*shape, "--vocab-size", 1000 if quick else 8000, f"--optim.lr={3e-3 if quick else 1e-3}",
                     "--optim.min_lr=1e-4"]
        if rescore and isinstance(kept.get(name), dict) and (run / "best").is_dir():  # decode again, no training
            r = {k: kept[name][k] for k in ("shape", "params", "cpu", "train", "val_loss_curve") if k in kept[name]}
        else:
            s, info = scalelm("finetune", "summarize", *start, "--train", train, "--val-fraction", "0.05", *FIELDS,
                              "--max-source-length", msl, "--out", run, f"--train.max_steps={steps}",
                              f"--train.eval_every={30 if quick else 500}",
                              f"--optim.warmup_steps={5 if quick else 200}", "--optim.schedule=cosine", *budget,
                              *COMMON)
            r = {"shape": f"--base {base} {' '.join(shape)}".strip() if base else " ".join(map(str, shape)),
                 "params": s["params"], "cpu": cpu_name(),  # rows measured in parts may come from other CPUs
                 "train": {"steps": s["step"], "train_s": s["elapsed_s"], "stopped": s["stopped"],
                           "epochs": s.get("epochs"), "best_val_loss": round(s["best_val_loss"], 4),
                           "sources_truncated": s.get("sources_truncated"), **info},
                 "val_loss_curve": val_curve(run)}
        for beams in (1, 4):
            res, info = scalelm("eval", run / "best", "--task", "summarize", "--data", val, *FIELDS, "--beams", beams,
                                "--batch-size", 32, "--save-hypotheses", work / f"{name}_beams{beams}.txt")
            hyps = (work / f"{name}_beams{beams}.txt").read_text(encoding="utf-8").splitlines()
            r[f"beams_{beams}"] = {**rouge_row(res), "hypothesis_lengths": res["hypothesis_lengths"],
                                   "distinct_hypotheses": len(set(hyps)), "seconds": res["seconds"],
                                   "sources_cut": res["sources_cut"], "stopped_at_context": res["stopped_at_context"],
                                   **info}
            # does the model read the email? the subjects' loss given their own emails and given others'
            r["reference_loss"] = {k: round(v, 4) for k, v in res["reference_loss"].items()}
            log(f"summarize {name} beams={beams}: {r[f'beams_{beams}']['rouge']}")
        out[name] = r
        save(out)
    names = [n for n, r in out.items() if isinstance(r, dict) and "beams_1" in r]
    best = max((out[n][f"beams_{b}"]["rouge"]["rouge1"], n, b) for n in names for b in (1, 4))
    out["best"] = {"rouge1": best[0], "arch": best[1], "beams": best[2]}
    out["goal_rouge1"] = GOAL_ROUGE1
    out["goal_met"] = best[0] >= GOAL_ROUGE1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy scale: proves the plumbing (a couple of minutes)")
    ap.add_argument("--minutes", type=float, default=45.0, help="training budget of each model (full mode)")
    ap.add_argument("--archs", default="encoder-decoder,decoder-only", help="the models to compare")
    ap.add_argument("--pretrain-minutes", type=float, default=20.0,
                    help="pretrain a general-English GPT base of each architecture this long and add its "
                         "ARCH_from_base row (0: no base rows)")
    ap.add_argument("--only-bases", action="store_true", help="only the ARCH_from_base rows (with --add: kept "
                    "beside the from-scratch rows of the results file)")
    ap.add_argument("--rescore", action="store_true", help="with --add and --work: decode and score the rows "
                    "already trained there again (no training)")
    ap.add_argument("--base", action="append", default=[], metavar="ARCH=MODEL_DIR",
                    help="also fine-tune this base (e.g. a general-English pretrained model) for --minutes: a row "
                         "ARCH_from_base (repeat for each architecture)")
    ap.add_argument("--work", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--add", action="store_true",
                    help="keep the rows of the existing results file and add (or replace) the ones run now")
    args = ap.parse_args()
    bases = dict(b.split("=", 1) for b in args.base)
    if not all(bases.values()) or not set(bases) <= set(SHAPES):
        sys.exit(f"--base takes ARCH=MODEL_DIR, ARCH one of {', '.join(SHAPES)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_summarize_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = ROOT / "benchmarks" / "results" / ("summarize_quick.json" if args.quick else "summarize.json")
    old = json.loads(path.read_text()) if args.add and path.is_file() else {}
    kept = old.get("aeslc", {})
    for row in kept.values():  # rows from before rows named their CPU ran on the file's
        if isinstance(row, dict) and "train" in row:
            row.setdefault("cpu", old.get("cpu"))
    res = {"cpu": cpu_name(), "cores": os.cpu_count(), "quick": args.quick, "complete": False}

    def save(aeslc: dict) -> None:
        atomic_write_text(path, json.dumps({**res, "aeslc": aeslc}, indent=2) + "\n")

    res["aeslc"] = bench(work, args.quick, args.minutes, [a for a in args.archs.split(",") if a], bases,
                         args.pretrain_minutes, args.only_bases, args.rescore, save, kept)
    res["complete"] = True
    res["total_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(path, json.dumps(res, indent=2) + "\n")
    log(f"wrote {path} in {res['total_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
