"""``scalelm demo``: prepare a corpus, train a small GPT for a few minutes, evaluate, generate.

The default corpus is this Python's standard library (``stdlib``: code, so a sample is easy to
judge by eye). The model is sized for a couple of CPU cores: 4 layers x 256 wide, a 4096-token
BPE vocabulary, context 128, bf16 where the CPU has it (the trainer's default: bf16 weights with
fp32 masters). Training is time-budgeted: a few timed steps of the trainer's own step first
measure the step time, the LR schedule is laid out over the steps
that fit in ``--minutes``, and ``train.max_minutes`` stops the run if the machine slows down.
Everything lands in ``--out``: the prepared data (reused by later demos), the run directory
(checkpoints, ``metrics.jsonl``, ``loss.png``) and ``demo.json`` (the figures printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint.names import RUN_INFO
from .errors import UserError

MODEL = dict(n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.0, bias=False)
VOCAB = 4096
MICRO_BATCH = 16
LR = 2e-3
EVALS = 6  # validation passes over the run (the first at step 0)
EVAL_ITERS = 8


def add_demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", default="stdlib",
                   help="corpus to learn: stdlib (default: this Python's standard library), a text file, a folder, "
                        "or anything `scalelm prepare --input` takes")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget in minutes (default 3)")
    p.add_argument("--out", default="runs/demo", help="where data, run and demo.json go (default runs/demo)")
    p.add_argument("--prompt", default=None, help="text to continue (default: code for stdlib, else the start "
                                                  "of the validation text)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--fresh-data", action="store_true", help="prepare the corpus again even if it is cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------- steps

def prepare_data(input: str, out: Path, fresh: bool, progress: bool) -> Path:
    """The corpus tokenized once into ``out/data/<name>-<hash>`` and reused by later demos."""
    from .data.prepare import prepare

    src = input if input == "stdlib" or input.startswith("hf:") else str(Path(input).expanduser().resolve())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(src).name or src)[:40]
    key = hashlib.sha256(f"{src}|bpe|{VOCAB}".encode()).hexdigest()[:10]
    data_dir = out / "data" / f"{name}-{key}"
    if (data_dir / "meta.json").is_file() and not fresh:
        print(f"demo: reusing the prepared corpus in {data_dir} (--fresh-data to redo it)", file=sys.stderr)
        return data_dir
    print(f"demo: preparing {input} (byte-level BPE, {VOCAB} tokens) into {data_dir}", file=sys.stderr)
    # the demo owns out/data/: --fresh-data replaces the corpus an earlier demo prepared there
    prepare(src, str(data_dir), tokenizer="bpe", vocab_size=VOCAB, progress=progress,
            block_size=MODEL["block_size"], overwrite=True)
    return data_dir


def build_config(data, minutes: float, steps: int, device: str, seed: int, progress: bool):
    from .config import Config

    cfg = Config()
    for k, v in dict(MODEL, vocab_size=data.vocab_size).items():
        setattr(cfg.model, k, v)
    cfg.data.path = str(data.dir)
    t = cfg.train
    t.micro_batch_size, t.grad_accum_steps, t.max_steps, t.seed, t.device = MICRO_BATCH, 1, steps, seed, device
    t.eval_every, t.eval_iters = max(1, steps // (EVALS - 1)), EVAL_ITERS
    t.save_every, t.log_every, t.max_minutes = steps, max(1, min(10, steps // 50)), minutes
    o = cfg.optim
    o.lr, o.min_lr, o.warmup_steps, o.beta2, o.weight_decay = LR, LR / 10, max(1, steps // 20), 0.99, 0.1
    cfg.checkpoint.keep_last = 1
    cfg.log.progress = progress
    return cfg.validate()


def measure_step_seconds(cfg, reps: int = 2) -> float:
    """Time a few training steps of a throwaway model of the demo's shape (after a warm-up step):
    the step the trainer will take for ``cfg`` (``scalelm.train.probe``), master weights included."""
    from .train.probe import time_steps

    return time_steps(cfg, micro_batch=cfg.train.micro_batch_size, repeats=reps)


def pick_threads(cfg, device: torch.device) -> tuple[float, str]:
    """Time a step with torch's default threads and with one; keep the faster.

    On an idle machine all cores win; on a busy one, threads that wait for each other can be
    several times slower than one (measured here: 10.6 s vs ~1 s per step)."""
    n = torch.get_num_threads()
    step_s = measure_step_seconds(cfg)
    note = f"{step_s * 1000:.0f} ms per step with {n} threads"
    if device.type != "cpu" or n == 1:
        return step_s, note
    torch.set_num_threads(1)
    one = measure_step_seconds(cfg)
    note += f", {one * 1000:.0f} ms with 1"
    if one < step_s:
        return one, note + " (the machine is busy): using 1 thread"
    torch.set_num_threads(n)
    return step_s, note


def plan_steps(minutes: float, step_s: float) -> int:
    """Steps that fit in the budget, leaving room for the evaluations (forward only: ~1/3 step each)."""
    budget = 60 * minutes
    eval_cost = EVALS * EVAL_ITERS * step_s / 3
    return max(10, int((budget - eval_cost) / step_s * 0.95))


def default_prompt(input: str, data) -> str:
    if input == "stdlib":
        return "import os\n\n\ndef "
    tok = data.tokenizer()
    head = tok.decode([int(i) for i in data.tokens("val")[:24]])
    cut = head.rfind(" ")
    return head[:cut + 1] if cut > 0 else head


def sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int) -> str:
    """Continue ``prompt`` with the generation engineer's ``generate_text``."""
    from .generate.generator import generate_text

    return generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, seed=seed)


DEMO_MARK = ".demo-run"


def _check_run_dir(run_dir: Path) -> None:
    ours = (run_dir / DEMO_MARK).is_file() or ((run_dir / RUN_INFO).is_file() and
                                               (run_dir.parent / "demo.json").is_file())  # a demo before the mark
    if run_dir.exists() and (not run_dir.is_dir() or (any(run_dir.iterdir()) and not ours)):
        raise UserError(f"{run_dir} exists and is not the run of an earlier demo: choose another --out "
                        f"(nothing was touched)")


def _fresh_run_dir(run_dir: Path) -> None:
    """Each demo trains from scratch: remove the previous demo's run (only one a demo wrote)."""
    if run_dir.exists():
        _check_run_dir(run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / DEMO_MARK).write_text("written by `scalelm demo`, which replaces this run next time\n")


# ----------------------------------------------------------------------------- command

def run_demo(args: argparse.Namespace) -> int:
    from .analysis.plots import plot_runs
    from .data.loader import TokenData
    from .fileio import atomic_write_text
    from .model.io import load_model_dir
    from .precision import pick_device, resolve_precision
    from .runs import BEST
    from .train.trainer import Trainer

    if args.minutes <= 0:
        raise UserError("--minutes must be positive (e.g. --minutes 3)")
    out, progress = Path(args.out), not args.no_progress
    _check_run_dir(out / "run")  # before anything is written under --out
    data = TokenData(prepare_data(args.input, out, args.fresh_data, progress))
    device = pick_device(args.device)
    precision = resolve_precision("auto", device)
    probe = build_config(data, args.minutes, 100, args.device, args.seed, progress)
    step_s, note = pick_threads(probe, device)
    steps = plan_steps(args.minutes, step_s)
    cfg = build_config(data, args.minutes, steps, args.device, args.seed, progress)
    print(f"demo: {note} -> {steps} steps in {args.minutes:g} min ({precision})", file=sys.stderr)
    run_dir = out / "run"
    from .runs import RunLock

    # one demo per --out; released when this returns, not whenever the garbage collector gets to it
    with RunLock(out, "demo"):
        _fresh_run_dir(run_dir)
        trainer = Trainer(cfg, data, run_dir)
        from .train.state import write_run_config

        write_run_config(run_dir, cfg, data)
        summary = trainer.fit()
        plots = plot_runs([run_dir], run_dir)

        best = run_dir / BEST if (run_dir / BEST).is_dir() else Path(summary["checkpoint"])
        model = load_model_dir(best, device=device)
        prompt = args.prompt if args.prompt is not None else default_prompt(args.input, data)
        text = sample(model, data.tokenizer(), prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)

        first, last = summary.get("initial_val_loss"), summary.get("best_val_loss") or summary.get("val_loss")
        report = {"input": args.input, "data_dir": str(data.dir), "run_dir": str(run_dir), "params": summary["params"],
                  "precision": summary["precision"],
                  "master_weights": summary.get("master_weights"), "steps": summary["step"], "tokens": summary["tokens"],
                  "train_seconds": summary["elapsed_s"], "step_ms_measured": round(1000 * step_s, 1),
                  "threads": torch.get_num_threads(),
                  "initial_val_loss": first, "final_val_loss": last,
                  "initial_bits_per_byte": summary.get("initial_val_bits_per_byte"),
                  "final_bits_per_byte": summary.get("val_bits_per_byte"), "stopped": summary["stopped"],
                  "prompt": prompt, "sample": text, "plots": plots}
        atomic_write_text(out / "demo.json", json.dumps(report, indent=2) + "\n")
        print_report(report)
        return 0


def print_report(r: dict) -> None:
    m = MODEL
    print(f"\nTrained a {m['n_layer']}-layer, {m['n_embd']}-wide GPT ({r['params'] / 1e6:.1f}M parameters) on "
          f"{r['input']} for {r['train_seconds'] / 60:.1f} min: {r['steps']} steps, {r['tokens']:,} tokens, "
          f"{r['precision']}.")
    if r["initial_val_loss"] is not None and r["final_val_loss"] is not None:
        drop = r["initial_val_loss"] - r["final_val_loss"]
        print(f"Validation loss {r['initial_val_loss']:.3f} -> {r['final_val_loss']:.3f} nats/token "
              f"(down {drop:.3f}); bits per byte {r['initial_bits_per_byte']:.3f} -> {r['final_bits_per_byte']:.3f}.")
    print(f"\n--- sample (temperature and top-k sampling, prompt {r['prompt']!r}) ---")
    print(r["prompt"] + r["sample"])
    print("--- end of sample ---\n")
    run = r["run_dir"]
    print(f"Run directory: {run} (loss curve: {r['plots']['loss']})")
    print(f"Next: scalelm generate {run}/best --prompt 'def '   |   scalelm eval {run} --data {r['data_dir']}"
          f"   |   scalelm plot {run}")
