"""`scalelm finetune classify`, `scalelm eval --task classify`, `scalelm classify` end to end: the
run directory, best/ following validation accuracy, bad inputs as exit-2 errors, resuming (after
SIGKILL: the same curve), the time budget, LoRA, and DDP / FSDP2 under torchrun."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli
from train_helpers import ONE_THREAD, cli, one_thread, read_metrics  # noqa: F401

TINY = ["--train.micro_batch_size=16", "--log.progress=false", "--optim.warmup_steps=2", "--train.precision=fp32",
        "--train.log_every=1"]


def synth(n: int, seed: int) -> str:
    """SST-format lines whose label is the sentiment word hidden among filler words."""
    rng = random.Random(seed)
    words = "the a movie film story plot actors scenes was is and but with of very quite".split()
    pos, neg = ["great", "fun", "moving", "superb"], ["dull", "awful", "boring", "mess"]
    rows = []
    for _ in range(n):
        y = rng.randrange(2)
        w = [rng.choice(words) for _ in range(rng.randrange(3, 12))]
        w.insert(rng.randrange(len(w) + 1), rng.choice(pos if y else neg))
        rows.append(f"{y} {' '.join(w)}")
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data):
    """A random-init base model (with a BPE tokenizer) and synthetic train/val files."""
    import torch

    from scalelm.config import ModelConfig
    from scalelm.data.tokenizer import train_bpe
    from scalelm.model import GPT
    from scalelm.model.io import save_model_dir

    d = tmp_path_factory.mktemp("cls")
    lines = (shared_data / "sst2" / "stsa.binary.train").read_text().splitlines()[:2000]
    tok = train_bpe(iter([s.split(" ", 1)[1] for s in lines]), vocab_size=300)
    torch.manual_seed(0)
    save_model_dir(GPT(ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32)), d / "base",
                   tokenizer_json=tok.to_str())
    (d / "train.txt").write_text(synth(300, 0))
    (d / "val.txt").write_text(synth(60, 1))
    return d


def finetune(files, out, *extra):
    return cli("finetune", "classify", "--base", files / "base", "--train", files / "train.txt", "--val",
               files / "val.txt", "--out", out, *TINY, *extra)


def test_finetune_then_eval_and_classify(files, tmp_path, one_thread):
    out = tmp_path / "run"
    rc, so, se = finetune(files, out, "--train.max_steps=40", "--train.eval_every=10", "--optim.lr=3e-3",
                          "--log.tensorboard=true")
    assert rc == 0, se
    summary = json.loads(so)
    assert summary["task"] == "classify" and summary["labels"] == ["0", "1"] and summary["step"] == 40
    assert summary["best_metric"] == "val_accuracy" and summary["train_examples"] == 300
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best", "ckpt-00000040", "config.json", "latest",
                                                    "metrics.jsonl", "run.json", "task.json", "tensorboard"]
    # best/ follows validation accuracy (the first maximum after step 0), not the latest step
    evals = [r for r in read_metrics(out) if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert {"val_accuracy", "val_macro_f1", "val_loss"} <= set(evals[0])
    top = max(r["val_accuracy"] for r in evals[1:])
    assert top > evals[0]["val_accuracy"]  # it learned (the sentiment word is easy to find)
    best_step = next(r["step"] for r in evals[1:] if r["val_accuracy"] == top)
    best = json.loads((out / "best" / "config.json").read_text())
    assert best["step"] == best_step and best["val_accuracy"] == top and summary["best_step"] == best_step
    assert best["task"]["labels"] == ["0", "1"] and (out / "best" / "head.safetensors").is_file()

    # eval --task classify: accuracy (as logged for that step), macro-F1, per class, confusion matrix
    rc, so, se = cli("eval", out / "best", "--task", "classify", "--data", files / "val.txt", "--dtype", "fp32")
    assert rc == 0, se
    ev = json.loads(so)
    assert set(ev) == {"accuracy", "macro_f1", "n", "labels", "per_class", "confusion_matrix", "loss"}
    assert ev["accuracy"] == top and ev["n"] == 60 and ev["labels"] == ["0", "1"]
    assert abs(ev["macro_f1"] - next(r["val_macro_f1"] for r in evals if r["step"] == best_step)) < 1e-12
    assert set(ev["per_class"]["1"]) == {"precision", "recall", "f1", "support"}
    cm = ev["confusion_matrix"]
    assert sum(map(sum, cm)) == 60 and (cm[0][0] + cm[1][1]) / 60 == ev["accuracy"]
    assert [sum(row) for row in cm] == [ev["per_class"][n]["support"] for n in ("0", "1")]

    # classify: one JSON line per input, a label and probabilities that sum to 1
    rc, so, se = cli("classify", out / "best", "--text", "a great film", "--text", "the plot was boring")
    assert rc == 0, se
    rows = [json.loads(line) for line in so.splitlines()]
    assert len(rows) == 2 and all(r["label"] in ("0", "1") and abs(sum(r["probs"].values()) - 1) < 1e-5
                                  and r["label"] == max(r["probs"], key=r["probs"].get) for r in rows)
    # the training text was lowercase (as SST-2's is): cased input reads as its lowercase form
    assert best["task"]["lowercase"] is True
    rc, so_cased, se = cli("classify", out / "best", "--text", "A GREAT Film", "--text", "The Plot Was Boring")
    assert rc == 0 and [json.loads(line)["probs"] for line in so_cased.splitlines()] == [r["probs"] for r in rows]
    (tmp_path / "in.jsonl").write_text('{"text": "a great film"}\n{"text": "the plot was boring"}\n')
    rc, so2, _ = cli("classify", out / "best", "--input", tmp_path / "in.jsonl")
    assert rc == 0 and [json.loads(line) for line in so2.splitlines()] == rows
    # a plain language model is not a classifier; --task classify needs a labelled file
    rc, _, se = cli("classify", files / "base", "--text", "x")
    assert rc == 2 and "not a classifier" in se
    rc, _, se = cli("eval", out / "best", "--task", "classify")
    assert rc == 2 and "--data FILE" in se
    rc, _, se = cli("classify", out / "best")
    assert rc == 2 and "--text TEXT" in se
    # the fine-tuned GPT is still a language model: plain eval reads the same directory
    from scalelm.model.io import load_model_dir

    assert load_model_dir(out / "best").lm_head is not None


@pytest.mark.parametrize("setup, message", [
    (dict(val="0 fine\nneutral so-so\n"), r"val.txt:2: unknown label 'neutral'.*\['0', '1'\]"),
    (dict(train=""), r"train.txt is empty"),
    (dict(train="1 good\nno label on this line\n0 bad\n"), r"train.txt:2: no label"),
    (dict(train='{"text": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n', ext=".jsonl"),
     r"train.jsonl:2: no field 'text'.*did you mean --text-field 'sentence'"),
    (dict(train="text,labels\ngood,1\n", ext=".csv"), r"train.csv:1: no column 'label'.*'labels'"),
])
def test_bad_input_is_an_exit_2_error_naming_file_and_line(files, tmp_path, setup, message, one_thread):
    import re

    ext = setup.get("ext", ".txt")
    train, val = tmp_path / f"train{ext}", tmp_path / f"val{ext}"
    train.write_text(setup.get("train", "1 good\n0 bad\n"))
    val.write_text(setup.get("val", setup.get("train", "1 good\n0 bad\n")))
    rc, so, se = cli("finetune", "classify", "--base", files / "base", "--train", train, "--val", val,
                     "--out", tmp_path / "run", *TINY, "--train.max_steps=1")
    assert rc == 2 and se.startswith("error: ") and re.search(message, se), se
    assert "Traceback" not in se and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    ([], "give the model to train"),
    (["--base", "B", "--preset", "baby"], "not both"),
    (["--preset", "baby"], "needs a tokenizer"),
    (["--base", "B", "--tokenizer", "B"], "--tokenizer is for --preset"),
    (["--base", "B", "--model.n_layer=3"], "fixes the model's shape (model.n_layer is 2 in the base, 3 here"),
    (["--base", "B", "--max-length=65"], "--max-length must be between 1 and the model's block_size 64"),
    (["--base", "B", "--parallel.tp=2"], "data parallelism"),
])
def test_bad_options_are_clear_errors(files, tmp_path, args, message, one_thread):
    args = [str(files / "base") if a == "B" else a for a in args]
    rc, _, se = cli("finetune", "classify", *args, "--train", files / "train.txt", "--val", files / "val.txt",
                    "--out", tmp_path / "run", *TINY)
    assert rc == 2 and message in se.replace("\n", " "), se


def test_from_scratch_resume_from_out_alone_and_time_budget(files, tmp_path, one_thread):
    out = tmp_path / "run"
    rc, so, se = cli("finetune", "classify", "--preset", "baby", "--tokenizer", files / "base" / "tokenizer.json",
                     "--train", files / "train.txt", "--val", files / "val.txt", "--out", out, *TINY,
                     "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--pooling", "mean",
                     "--train.max_steps=3", "--train.eval_every=0")
    assert rc == 0, se
    s = json.loads(so)
    assert s["step"] == 3 and s["best_dir"] == str(out / "best")  # no evaluation ran: the final model
    cfg = json.loads((out / "ckpt-00000003" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 300 and cfg["task"]["pooling"] == "mean"  # vocab follows the tokenizer
    # the run's own settings come back from RUN_DIR (task.json, config.json); a changed one is refused
    rc, so, se = cli("finetune", "classify", "--out", out, "--train.max_steps=5")
    assert rc == 0 and json.loads(so)["step"] == 5 and "resumed from" in se, se
    rc, _, se = cli("finetune", "classify", "--out", out, "--pooling", "last", "--train.max_steps=6")
    assert rc == 2 and "pooling='mean'" in se
    # a time budget stops (and saves) after the first step
    rc, so, se = cli("finetune", "classify", "--out", out, "--train.max_steps=100", "--train.max_minutes=1e-9")
    assert rc == 0 and json.loads(so)["stopped"] == "time_budget" and json.loads(so)["step"] == 6


def test_lora_classifier(files, tmp_path, one_thread):
    out = tmp_path / "lora"
    rc, so, se = finetune(files, out, "--train.max_steps=4", "--train.eval_every=2", "--lora.r=4", "--optim.lr=1e-2")
    assert rc == 0, se
    s = json.loads(so)
    assert s["trainable_params"] < s["params"] / 5
    ck = out / "ckpt-00000004"
    assert (ck / "adapter.safetensors").is_file() and not (ck / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(str(ck / "adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "head.weight" in keys and any(k.endswith("lora_A") for k in keys)
    assert json.loads((ck / "config.json").read_text())["task"]["labels"] == ["0", "1"]
    rc, so, se = cli("eval", out, "--task", "classify", "--data", files / "val.txt", "--dtype", "fp32")
    assert rc == 0 and abs(json.loads(so)["accuracy"] - read_metrics(out)[-1]["val_accuracy"]) < 1e-12, se
    rc, so, se = cli("finetune", "classify", "--out", out, "--train.max_steps=5")
    assert rc == 0 and json.loads(so)["step"] == 5, se


# ----------------------------------------------------------------------------- exact resume after SIGKILL

RESUME = TINY + ["--model.dropout=0.1", "--train.eval_every=10", "--train.save_every=5", "--checkpoint.keep_last=2",
                 "--train.seed=7", "--train.micro_batch_size=8", "--optim.lr=3e-3"]


def _args(files, out, steps):
    return ["finetune", "classify", "--base", files / "base", "--train", files / "train.txt", "--val",
            files / "val.txt", "--out", out, f"--train.max_steps={steps}", *RESUME]


def _logged(out):
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written when the run was killed
            pass
    return rows


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_curve(files, tmp_path):
    steps = 40
    ref = tmp_path / "ref"
    run_cli(*_args(files, ref, steps), env=ONE_THREAD)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "scalelm", *map(str, _args(files, out, steps))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    t0 = time.time()
    while time.time() - t0 < 240:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        latest = out / "latest"
        if latest.is_file() and (out / "metrics.jsonl").is_file():
            ck = int(latest.read_text().strip().split("-")[1])
            logged = [r["step"] for r in _logged(out) if "loss" in r]
            if ck >= 10 and logged and logged[-1] >= ck + 2:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert logged[-1] < steps
    run_cli(*_args(files, out, steps), env=ONE_THREAD)

    def curve(d, key):
        return [(r["step"], r[key]) for r in read_metrics(d) if key in r]

    assert curve(out, "loss") == curve(ref, "loss")  # bitwise
    assert [s for s, _ in curve(out, "loss")] == list(range(1, steps + 1))
    assert curve(out, "val_accuracy") == curve(ref, "val_accuracy")
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000035", "ckpt-00000040"]
    assert [p.name for p in out.glob(".*")] == [".lock"]  # no staging leftovers


# ----------------------------------------------------------------------------- torchrun

DIST = ["--train.max_steps=4", "--train.eval_every=2", "--train.save_every=2", "--train.micro_batch_size=4",
        "--train.global_batch_size=8", "--optim.lr=3e-3"]


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_and_fsdp2_train_like_one_process(files, tmp_path):
    from dist_launch import ROOT, torchrun_cmd, worker_env

    args = lambda out: ["finetune", "classify", "--base", files / "base", "--train", files / "train.txt",  # noqa: E731
                        "--val", files / "val.txt", "--out", out, *TINY, *DIST]
    run_cli(*args(tmp_path / "one"), env=ONE_THREAD)
    single = _losses(tmp_path / "one")
    evals = [r for r in read_metrics(tmp_path / "one") if "val_accuracy" in r]
    for name, layout in (("ddp", ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]), ("fsdp", [])):
        out = tmp_path / name
        p = subprocess.run(torchrun_cmd(2, "-m", "scalelm", *args(out), *layout), capture_output=True, text=True,
                           timeout=300, cwd=ROOT, env=worker_env(SCALELM_PEAK_TFLOPS=1))
        assert p.returncode == 0, f"{name}:\n{p.stderr[-6000:]}"
        got = _losses(out)
        assert sorted(got) == [1, 2, 3, 4] and all(abs(got[k] - single[k]) < 1e-5 for k in got), (name, got, single)
        dist_evals = [r for r in read_metrics(out) if "val_accuracy" in r]
        assert [r["val_accuracy"] for r in dist_evals] == [r["val_accuracy"] for r in evals]
        if name == "fsdp":  # a sharded checkpoint: eval reads it, with its task entry
            assert (out / "ckpt-00000004" / "dcp" / ".metadata").is_file()
            ev = json.loads(run_cli("eval", out, "--task", "classify", "--data", files / "val.txt",
                                    "--dtype", "fp32").stdout)
            assert ev["accuracy"] == dist_evals[-1]["val_accuracy"]
    # a LoRA classifier under FSDP2: its sharded checkpoint evaluates to the logged validation loss
    out = tmp_path / "lora"
    p = subprocess.run(torchrun_cmd(2, "-m", "scalelm", *args(out), "--lora.r=4"), capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=worker_env(SCALELM_PEAK_TFLOPS=1))
    assert p.returncode == 0, p.stderr[-6000:]
    ev = json.loads(run_cli("eval", out, "--task", "classify", "--data", files / "val.txt", "--dtype",
                            "fp32").stdout)
    assert abs(ev["loss"] - read_metrics(out)[-1]["val_loss"]) < 1e-5
