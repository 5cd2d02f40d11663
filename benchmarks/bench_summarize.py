"""AESLC summarization benchmark (issue 33): email body -> subject line, each step a real CLI run.

    python benchmarks/bench_summarize.py --quick        # toy scale (a couple of minutes): the plumbing works
    python benchmarks/bench_summarize.py                # the full runs (2 x --minutes of training + decoding)

The encoder-decoder (``transformer-small``: 3 + 3 layers, 256 wide) against a decoder-only GPT of
about equal parameters (7 layers, 256 wide), both from scratch on their own 8,000-token BPE, each
trained ``--minutes`` (default 45; the cosine schedule ends with the budget) on 2 threads. The four
training parts are concatenated and shuffled (seed 0: they are grouped by mailbox), and a fixed 5%
of them validates during training (the loss that picks ``best/``); AESLC's ``validation.jsonl``
is touched only by the final ``scalelm eval --task summarize``: ROUGE-1/2/L/Lsum F1 against the
original subject and against all four human subjects, greedy and with 4 beams, beside the lead-8
baseline scored by the same code. Sources are cut to ``--max-source-length`` tokens (256).
``--base ARCH=MODEL_DIR`` (repeatable) adds a row ``ARCH_from_base``: that base (e.g. a general-English
pretrained model) fine-tuned the same way for the same minutes (the fine-tuning defaults' learning rate).

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

from bench_tasks import COMMON, ROOT, log, scalelm, val_curve

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


def rouge_row(res: dict) -> dict:
    r = {"rouge": {k: round(v, 2) for k, v in res["rouge"].items()}}
    if "rouge_all_references" in res:
        r["rouge_all_references"] = {k: round(v, 2) for k, v in res["rouge_all_references"].items()}
    return r


def bench(work: Path, quick: bool, minutes: float, archs: list[str], bases: dict[str, str]) -> dict:
    train, val = write_data(work, quick)
    msl = 48 if quick else MAX_SOURCE
    out = {"budget_minutes": None if quick else minutes, "threads": 2, "max_source_length": msl,
           "train_records": sum(1 for _ in train.open()), "validation_records": sum(1 for _ in val.open())}
    floor = scalelm("eval", "none", "--task", "summarize", "--data", val, *FIELDS, "--baseline", "lead-8")[0]["baseline"]
    out["lead-8"] = {**rouge_row(floor), "hypothesis_lengths": floor["hypothesis_lengths"],
                     "reference_lengths": floor["reference_lengths"]}
    log(f"lead-8: {out['lead-8']['rouge']}")
    rows = [(arch, SHAPES[arch][:3] + QUICK_SHAPE if quick else SHAPES[arch], None) for arch in archs]
    rows += [(f"{arch}_from_base", [], base) for arch, base in bases.items()]
    for name, shape, base in rows:
        run = work / f"summarize_{name}"
        steps = 60 if quick else 1_000_000
        budget = [] if quick else [f"--train.max_minutes={minutes}"]  # cosine to min_lr when the minutes run out
        start = ["--base", base] if base else [*shape, "--vocab-size", 1000 if quick else 8000,
                                               f"--optim.lr={3e-3 if quick else 1e-3}", "--optim.min_lr=1e-4"]
        s, info = scalelm("finetune", "summarize", *start, "--train", train, "--val-fraction", "0.05", *FIELDS,
                          "--max-source-length", msl, "--out", run, f"--train.max_steps={steps}",
                          f"--train.eval_every={30 if quick else 500}", f"--optim.warmup_steps={5 if quick else 200}",
                          "--optim.schedule=cosine", *budget, *COMMON)
        r = {"shape": " ".join(map(str, shape)) if shape else f"--base {base}", "params": s["params"],
             "train": {"steps": s["step"], "train_s": s["elapsed_s"], "stopped": s["stopped"],
                       "epochs": s.get("epochs"), "best_val_loss": round(s["best_val_loss"], 4),
                       "sources_truncated": s.get("sources_truncated"), **info},
             "val_loss_curve": val_curve(run)}
        log(f"summarize {name}: {r['train']}")
        for beams in (1, 4):
            res, info = scalelm("eval", run / "best", "--task", "summarize", "--data", val, *FIELDS, "--beams", beams,
                                "--batch-size", 32, "--save-hypotheses", work / f"{name}_beams{beams}.txt")
            r[f"beams_{beams}"] = {**rouge_row(res), "hypothesis_lengths": res["hypothesis_lengths"],
                                   "seconds": res["seconds"], "sources_cut": res["sources_cut"],
                                   "stopped_at_context": res["stopped_at_context"], **info}
            log(f"summarize {name} beams={beams}: {r[f'beams_{beams}']['rouge']}")
        out[name] = r
    best = max((out[n][f"beams_{b}"]["rouge"]["rouge1"], n, b) for n, _, _ in rows for b in (1, 4))
    out["best"] = {"rouge1": best[0], "arch": best[1], "beams": best[2]}
    out["goal_rouge1"] = GOAL_ROUGE1
    out["goal_met"] = best[0] >= GOAL_ROUGE1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy scale: proves the plumbing (a couple of minutes)")
    ap.add_argument("--minutes", type=float, default=45.0, help="training budget of each model (full mode)")
    ap.add_argument("--archs", default="encoder-decoder,decoder-only", help="the models to compare")
    ap.add_argument("--base", action="append", default=[], metavar="ARCH=MODEL_DIR",
                    help="also fine-tune this base (e.g. a general-English pretrained model) for --minutes: a row "
                         "ARCH_from_base (repeat for each architecture)")
    ap.add_argument("--work", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    bases = dict(b.split("=", 1) for b in args.base)
    if not all(bases.values()):
        sys.exit("--base takes ARCH=MODEL_DIR")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_summarize_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"cpu": cpu_name(), "cores": os.cpu_count(), "quick": args.quick,
           "aeslc": bench(work, args.quick, args.minutes, args.archs.split(","), bases)}
    res["total_s"] = round(time.perf_counter() - t0, 1)
    path = ROOT / "benchmarks" / "results" / ("summarize_quick.json" if args.quick else "summarize.json")
    atomic_write_text(path, json.dumps(res, indent=2) + "\n")
    log(f"wrote {path} in {res['total_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
