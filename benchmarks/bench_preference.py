"""Preference tuning on HH-RLHF helpful-base (issue 34): a general-English base, SFT on the chosen
replies, then DPO (and IPO, SimPO) from the SFT model; pairwise accuracy on the dev pairs.

    python benchmarks/bench_preference.py --quick     # every stage at toy scale: the plumbing works (~2 min)
    python benchmarks/bench_preference.py             # the full chain (about 35 minutes on 2 quiet cores)
    python benchmarks/bench_preference.py --work DIR  # keep the runs; a stage whose output is there is reused

Stages, each a real CLI run in a subprocess (``bench_tasks.scalelm``):
  base   ``prepare`` ../shared/data/pretrain_text (62 MB of general English, BPE 8,192), then a Llama-style
         4 x 256 GPT (context 256) pretrained for a fixed number of steps (steps, not minutes: the result
         does not depend on how busy the machine is);
  sft    ``finetune sft`` on the 2,000 training pairs' prompts and chosen replies (ChatML, loss on replies);
  dpo    ``finetune dpo`` from the SFT model on the 2,000 training pairs (5% held out as the run's own
         validation; the dev pairs are never trained or tuned on), for each loss;
  eval   ``eval --task preference`` on the 117 dev pairs: the SFT model reference-free (average
         log-probability) and against its base; each DPO/IPO model against its reference (the SFT model);
         SimPO reference-free. Then the KL from the SFT model, estimated on replies each tuned model
         samples for the dev prompts (mean log p_tuned - log p_sft per reply), their lengths, and three
         generations side by side.
Writes ``benchmarks/results/preference[_quick].json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_tasks import COMMON, DATA, general_english, log, scalelm  # noqa: E402  (one subprocess harness for every task benchmark)

from scalelm.fileio import atomic_write_text  # noqa: E402
from scalelm.hardware import cpu_name  # noqa: E402

HH = DATA / "hh_rlhf"
LOSSES = {"dpo": ["--loss", "sigmoid"], "ipo": ["--loss", "ipo"], "simpo": ["--loss", "simpo"]}


def sft_file(work: Path, n: int | None) -> Path:
    """The training pairs' prompts with their chosen replies, as chat messages."""
    from scalelm.tasks.preference.pairs import read_pairs

    out = work / "sft.jsonl"
    pairs = read_pairs(HH / "helpful_base_train.jsonl")[:n]
    out.write_text("".join(json.dumps({"messages": p.prompt + [{"role": "assistant", "content": p.chosen}]}) + "\n"
                           for p in pairs))
    return out


def pairs_file(work: Path, n: int | None) -> Path:
    lines = (HH / "helpful_base_train.jsonl").read_text().splitlines()[:n]
    out = work / "train_pairs.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def kl_and_samples(tuned: Path, sft: Path, n_prompts: int, max_new: int) -> dict:
    """Mean over dev prompts of log p_tuned(y) - log p_sft(y) for a reply y the tuned model samples (a
    Monte-Carlo estimate of KL(tuned || sft)), the replies' mean length, and the first three replies."""
    import torch

    from scalelm.generate.chat import ChatFormat
    from scalelm.generate.generator import Generator
    from scalelm.generate.sampling import SamplingParams
    from scalelm.model.io import load_model_dir
    from scalelm.model.loss import IGNORE_INDEX
    from scalelm.tasks.preference.objective import reply_logps
    from scalelm.tasks.preference.pairs import read_pairs

    torch.manual_seed(0)
    pairs = read_pairs(HH / "helpful_base_dev.jsonl")[:n_prompts]
    gen = Generator.from_checkpoint(tuned)
    fmt = ChatFormat(gen, tuned)
    ref = load_model_dir(sft).eval()
    T = gen.cfg.block_size
    kls, lens, shown = [], [], []
    for p in pairs:
        prompt = fmt.encode(p.prompt)[-(T - max_new - 1):]
        c = gen.generate([prompt], max_new_tokens=max_new, sampling=SamplingParams(temperature=1.0))[0]
        ids = c.tokens
        if not ids:
            continue
        x = torch.tensor([prompt + ids[:-1]])  # targets: the reply's tokens only
        y = torch.tensor([[IGNORE_INDEX] * (len(prompt) - 1) + ids])
        with torch.no_grad():
            lt = reply_logps(gen.model, x, y)[0].item()
            lr = reply_logps(ref, x, y)[0].item()
        kls.append(lt - lr)
        lens.append(len(ids))
        if len(shown) < 3:
            shown.append({"prompt": p.prompt[-1]["content"][:200], "reply": c.text[:300]})
    return {"kl_from_sft": sum(kls) / len(kls), "reply_tokens": sum(lens) / len(lens), "samples": shown,
            "prompts": len(kls)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy scale: proves the plumbing")
    ap.add_argument("--work", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--base-steps", type=int, default=1500, help="pretraining steps of the base (full mode)")
    ap.add_argument("--losses", default="dpo,ipo,simpo")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_pref_"))
    work.mkdir(parents=True, exist_ok=True)
    q = args.quick
    res: dict = {"cpu": cpu_name(), "cores": os.cpu_count(), "quick": q}
    t0 = time.perf_counter()

    # ---- base
    prep = general_english(work, q)
    # 4 x 256 (about 5.5M parameters): ~3,500 tokens/s on 2 cores, so 1,500 steps of 8 x 256 tokens (3.1M
    # tokens) take about 15 minutes
    shape = ["--preset", "llama-60m", f"--model.n_layer={2 if q else 4}", f"--model.n_head={2 if q else 4}",
             f"--model.n_kv_head={2 if q else 4}", f"--model.n_embd={64 if q else 256}",
             f"--model.block_size={128 if q else 256}", f"--model.intermediate_size={128 if q else 768}"]
    base_run = work / "base"
    s, info = scalelm("train", "--data", prep, "--out", base_run, *shape, f"--train.max_steps={20 if q else args.base_steps}",
                      "--train.micro_batch_size=8", "--train.eval_every=500", "--optim.lr=1e-3",
                      f"--optim.warmup_steps={5 if q else 100}", *COMMON)
    res["base"] = {"steps": s["step"], "val_loss": s.get("val_loss"), "params": s.get("params"), **info}
    log(f"base: {res['base']}")
    base = base_run / "best"

    # ---- sft
    n = 64 if q else None
    sft_run = work / "sft"
    s, info = scalelm("finetune", "sft", "--base", base, "--data", sft_file(work, n), "--val-fraction", "0.05",
                      "--template", "chatml", "--out", sft_run, f"--train.max_steps={6 if q else 300}",
                      f"--train.eval_every={3 if q else 50}", "--train.micro_batch_size=8", "--optim.lr=3e-4",
                      *COMMON)
    res["sft"] = {"steps": s["step"], "val_reply_loss_before": s.get("initial_val_loss"),
                  "val_reply_loss": s.get("best_val_loss"), **info}
    log(f"sft: {res['sft']}")
    sft = sft_run / "best"

    # ---- preference tuning
    train_pairs = pairs_file(work, n)
    dev = HH / "helpful_base_dev.jsonl"
    evals = {}
    e, _ = scalelm("eval", sft, "--task", "preference", "--data", dev, "--ref-model", "none")
    evals["sft (reference-free)"] = e
    e, _ = scalelm("eval", sft, "--task", "preference", "--data", dev, "--ref-model", base)
    evals["sft against its base"] = e
    res["tuned"] = {}
    for name in args.losses.split(","):
        run = work / name
        s, info = scalelm("finetune", "dpo", "--base", sft, "--data", train_pairs, "--val-fraction", "0.05", "--out",
                          run, *LOSSES[name], f"--train.max_steps={4 if q else 150}",
                          f"--train.eval_every={2 if q else 25}", "--optim.lr=5e-5", *COMMON)
        e, _ = scalelm("eval", run / "best", "--task", "preference", "--data", dev)
        evals[name] = e
        res["tuned"][name] = {"steps": s["step"], "val_loss": s.get("best_val_loss"),
                              "val_reward_accuracy": s.get("val_rewards/accuracies"), **info,
                              **kl_and_samples(run / "best", sft, 8 if q else 30, 16 if q else 48)}
        log(f"{name}: {res['tuned'][name]} | dev {e}")
    res["dev"] = evals
    res["total_s"] = round(time.perf_counter() - t0, 1)
    path = ROOT / "benchmarks" / "results" / ("preference_quick.json" if q else "preference.json")
    if path.is_file():  # a rerun of some losses (--losses ipo) keeps the other losses' rows
        old = json.loads(path.read_text())
        if old.get("base", {}).get("steps") == res["base"]["steps"]:
            res["tuned"] = {**old.get("tuned", {}), **res["tuned"]}
            res["dev"] = {**old.get("dev", {}), **res["dev"]}
    atomic_write_text(path, json.dumps(res, indent=2) + "\n")
    print("| model | dev pairs | pairwise accuracy | mean margin | reward |")
    print("|---|---:|---:|---:|---|")
    for k, e in evals.items():
        print(f"| {k} | {e['pairs']} | {e['accuracy']:.1%} | {e['mean_margin']:.3f} | {e['reward']} |")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
