"""Masked-LM pretraining (``scalelm train --model.arch=encoder``): BERT's masking statistics, the document
ids of packed windows, masks that resume exactly and do not depend on the batch's split, a training run
that resumes (after SIGKILL too) to the uninterrupted run's numbers, ``scalelm eval``'s masked-LM loss
and accuracy, and DDP / FSDP2 training as one process does."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from train_helpers import ONE_THREAD, cli, make_char_data, one_thread, read_metrics  # noqa: F401

from scalelm.model.loss import IGNORE_INDEX
from scalelm.train.mlm import MLMBatches, document_ids, mask_token_id, mask_tokens, window_rngs

EOT, PAD = 0, 1
WORDS = "the a king queen good bad film plot man woman house dog cat runs sees loves hates".split()
ENC = ["--model.arch=encoder", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32",
       "--model.block_size=32", "--train.micro_batch_size=4", "--train.eval_iters=2", "--train.log_every=1",
       "--optim.warmup_steps=2", "--log.progress=false", "--train.precision=fp32", "--model.dropout=0.1",
       "--train.eval_every=4", "--train.save_every=4", "--train.seed=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    r = random.Random(0)
    docs = [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 20))) for _ in range(500)]
    return make_char_data(tmp_path_factory.mktemp("mlm") / "data", "<|endoftext|>".join(docs))


def test_masking_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 100, (8, 25_000), generator=g)
    x[:, ::10] = EOT  # special tokens are never chosen
    x[:, 5::50] = PAD
    inputs, targets = mask_tokens(x, window_rngs(1, first=0, n=8), mask_id=100, n_random=100, special=(EOT, PAD))
    chosen = targets != IGNORE_INDEX
    eligible = (x != EOT) & (x != PAD)
    assert not chosen[~eligible].any() and torch.equal(targets[chosen], x[chosen])
    assert abs(chosen.sum().item() / eligible.sum().item() - 0.15) < 0.003
    n = chosen.sum().item()
    masked = (inputs == 100) & chosen
    kept = (inputs == x) & chosen
    replaced = chosen & ~masked & ~kept  # a random draw can equal the original: counted as kept (1 in 98)
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(kept.sum().item() / n - (0.1 + 0.1 / 98)) < 0.01
    assert abs(replaced.sum().item() / n - 0.1 * 97 / 98) < 0.01
    assert torch.equal(inputs[~chosen], x[~chosen])  # nothing else is touched


def test_document_ids_end_at_each_end_of_text():
    x = torch.tensor([[5, 6, EOT, 7, EOT, EOT, 8]])
    assert document_ids(x, EOT).tolist() == [[0, 0, 0, 1, 1, 2, 3]]


def test_mask_token_is_the_tokenizers_or_the_next_id(data):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    assert mask_token_id(tok) == tok.get_vocab_size()
    tok.add_special_tokens(["[MASK]"])
    assert mask_token_id(tok) == tok.token_to_id("[MASK]")


def _batches(data, B=4, accum=1, rank=0, world=1):
    from scalelm.data.loader import BatchLoader, TokenData

    d = TokenData(data)
    loader = BatchLoader(d.tokens("train"), B, 32, accum, dp_rank=rank, dp_world=world, seed=3)
    return MLMBatches(loader, seed=3, mask_id=d.vocab_size, n_random=d.vocab_size, eot_id=EOT, pad_id=PAD)


def test_masks_resume_exactly_and_follow_the_window_not_the_split(data):
    ref = _batches(data)
    first = [ref.next_batch() for _ in range(2)]
    state = json.loads(json.dumps(ref.state_dict()))
    rest = [ref.next_batch() for _ in range(3)]
    again = _batches(data)
    again.load_state_dict(state)
    for a, b in zip(rest, [again.next_batch() for _ in range(3)]):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(first[0][1], first[1][1])  # each step draws anew
    # the same global batch of 4 windows as 2 micro-batches of 2, or 2 ranks of 2: the same masks
    halves = _batches(data, B=2, accum=2)
    split = [halves.next_batch() for _ in range(2)]
    ranks = [_batches(data, B=2, rank=r, world=2).next_batch() for r in range(2)]
    for parts in (split, ranks):
        for i in range(3):
            assert torch.equal(torch.cat([p[i] for p in parts]), first[0][i])


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]


def _evals(out):
    return [(r["step"], r["val_loss"], r["val_accuracy"]) for r in read_metrics(out) if "val_loss" in r]


def test_train_resumes_exactly_and_eval_reports_masked_lm(data, tmp_path, one_thread):
    ref, out = tmp_path / "ref", tmp_path / "run"
    rc, so, se = cli("train", "--data", data, "--out", ref, "--train.max_steps=8", *ENC)
    assert rc == 0, se
    summary = json.loads(so)
    assert summary["objective"] == "masked-lm" and "val_accuracy" in summary
    assert "masked LM: 15% of tokens chosen" in se
    # the vocabulary has one more row than the tokenizer: the mask token
    assert json.loads((ref / "best" / "config.json").read_text())["model"]["vocab_size"] == 29 + 1
    mfu = [r["mfu"] for r in read_metrics(ref) if "mfu" in r]
    assert all(m is not None and m > 0 for m in mfu)
    # a run that died after its step-4 checkpoint (what SIGKILL leaves; the slow test below kills one)
    shutil.copytree(ref, out)
    shutil.rmtree(out / "ckpt-00000008")
    (out / "latest").write_text("ckpt-00000004\n")
    assert cli("train", "--data", data, "--out", out, "--train.max_steps=8", *ENC)[0] == 0
    assert _losses(out) == _losses(ref) and _evals(out) == _evals(ref)  # bitwise, dropout on
    # eval: the last logged validation, reproducibly, with its accuracy; whatever the batch size
    rc, so, se = cli("eval", ref, "--data", data, "--max-batches", "2", "--batch-size", "4", "--dtype", "fp32")
    assert rc == 0, se
    ev = json.loads(so)
    assert set(ev) == {"loss", "accuracy", "perplexity", "tokens"} and ev["tokens"] > 0
    assert (ev["loss"], ev["accuracy"]) == _evals(ref)[-1][1:]
    full = [json.loads(cli("eval", ref, "--data", data, "--batch-size", str(b), "--dtype", "fp32")[1]) for b in (4, 3)]
    assert full[0]["tokens"] == full[1]["tokens"] and abs(full[0]["loss"] - full[1]["loss"]) < 1e-5
    assert full[0]["accuracy"] == full[1]["accuracy"]


def test_a_time_budget_stops_and_saves_a_masked_lm_run(data, tmp_path, one_thread):
    out = tmp_path / "run"
    rc, so, se = cli("train", "--data", data, "--out", out, *ENC, "--train.max_minutes=0.003",
                     "--train.eval_every=0")
    assert rc == 0, se
    summary = json.loads(so)
    assert summary["stopped"] == "time_budget" and summary["objective"] == "masked-lm"
    assert (out / "latest").is_file() and summary["step"] > 0


def test_text_and_harness_eval_of_an_encoder_refuse_in_one_line(data, tmp_path, one_thread):
    out = tmp_path / "run"
    assert cli("train", "--data", data, "--out", out, "--train.max_steps=1", *ENC)[0] == 0
    (tmp_path / "t.txt").write_text("the king sees the dog\n")
    rc, _, err = cli("eval", out, "--text", tmp_path / "t.txt")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "masked-LM encoder" in err


def test_a_vocabulary_without_room_for_the_mask_token_is_refused(data, tmp_path):
    rc, _, err = cli("train", "--data", data, "--out", tmp_path / "r", "--train.max_steps=1", *ENC,
                     "--model.vocab_size=29")
    assert rc == 2 and "--model.vocab_size=30" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_an_encoder_saves_its_mask_token_and_exports_for_fill_mask(data, tmp_path, one_thread):
    """The mask id the run used is a special token of the saved tokenizer (the data's ids unchanged), so
    the run resumes and evaluates on its DATA_DIR, its HF export works with pipeline("fill-mask") (scores
    = scalelm's softmax at the mask) and classify fine-tunes on it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    from scalelm.model.io import load_model_dir

    run, bert = tmp_path / "run", ["--preset", "bert-mini", *ENC, "--model.intermediate_size=64"]
    rc, _, se = cli("train", "--data", data, "--out", run, "--train.max_steps=2", *bert)
    assert rc == 0, se
    assert "mask id 29" in se and (data / "tokenizer.json").read_text().count("<|mask|>") == 0
    for d in (run / "best", run / "ckpt-00000002"):
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        assert tok.token_to_id("<|mask|>") == 29 and tok.get_vocab_size() == 30
        assert tok.encode("the dog").ids == Tokenizer.from_file(str(data / "tokenizer.json")).encode("the dog").ids
    # its tokenizer still matches the data: resume, eval and --init-from accept it
    assert cli("train", "--data", data, "--out", run, "--train.max_steps=3", *bert)[0] == 0
    assert cli("eval", run, "--data", data, "--max-batches", "1", "--batch-size", "4")[0] == 0
    rc, _, se = cli("train", "--data", data, "--out", tmp_path / "again", "--init-from", run / "best",
                    "--train.max_steps=1", "--train.eval_every=0", "--log.progress=false")
    assert rc == 0, se
    rc, _, se = cli("convert", run / "best", "--to-hf", tmp_path / "hf")
    assert rc == 0, se
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.mask_token == "<|mask|>" and hf_tok.mask_token_id == 29 and hf_tok.pad_token_id == PAD
    assert json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text())["mask_token"] == "<|mask|>"
    text = "the king <|mask|> the dog"
    ids = Tokenizer.from_file(str(run / "best" / "tokenizer.json")).encode(text).ids
    assert hf_tok(text)["input_ids"] == ids and ids.count(29) == 1
    fill = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"), device="cpu", top_k=5)
    got = fill(text)
    model = load_model_dir(run / "best").eval()
    with torch.no_grad():
        probs = model(torch.tensor([ids]))[0][0, ids.index(29)].softmax(-1)
    top = probs.topk(5)
    assert [r["token"] for r in got] == top.indices.tolist()
    assert max(abs(r["score"] - p) for r, p in zip(got, top.values.tolist())) < 1e-4
    # a classifier on the encoder (its tokenizer one token larger than the data's)
    lines = [f"{i % 2} {'the good film' if i % 2 else 'the bad plot'} {WORDS[i % len(WORDS)]}" for i in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    rc, _, se = cli("finetune", "classify", "--base", run / "best", "--train", tmp_path / "train.txt", "--val",
                    tmp_path / "train.txt", "--out", tmp_path / "cls", "--train.max_steps=2", "--log.progress=false",
                    "--train.micro_batch_size=8", "--train.precision=fp32")
    assert rc == 0, se
    rc, so, se = cli("classify", tmp_path / "cls" / "best", "--text", "the <|mask|> film")
    assert rc == 0 and json.loads(so)["label"] in ("0", "1"), se


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_curve(data, tmp_path):
    from test_train_resume import _wait_for

    steps, args = 40, [*ENC, "--train.save_every=5", "--train.eval_every=10", "--checkpoint.keep_last=2"]
    ref = tmp_path / "ref"
    run_cli("train", "--data", data, "--out", ref, f"--train.max_steps={steps}", *args, env=ONE_THREAD)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "scalelm", "train", "--data", str(data), "--out", str(out),
           f"--train.max_steps={steps}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD})
    _, logged = _wait_for(out, proc, min_ckpt=5, extra_steps=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and logged < steps
    run_cli("train", "--data", data, "--out", out, f"--train.max_steps={steps}", *args, env=ONE_THREAD)
    assert _losses(out) == _losses(ref) and _evals(out) == _evals(ref)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_and_fsdp2_train_like_one_process(data, tmp_path):
    from dist_launch import ROOT, torchrun_cmd, worker_env

    args = [*ENC, "--model.dropout=0", "--train.max_steps=4", "--train.global_batch_size=8", "--optim.lr=3e-3"]
    run_cli("train", "--data", data, "--out", tmp_path / "one", *args, env=ONE_THREAD)
    single = dict(_losses(tmp_path / "one"))
    evals = _evals(tmp_path / "one")
    for name, layout in (("ddp", ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]), ("fsdp", [])):
        out = tmp_path / name
        p = subprocess.run(torchrun_cmd(2, "-m", "scalelm", "train", "--data", data, "--out", out, *args, *layout),
                           capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env=worker_env(SCALELM_PEAK_TFLOPS=1))
        assert p.returncode == 0, f"{name}:\n{p.stderr[-6000:]}"
        got = dict(_losses(out))
        assert sorted(got) == [1, 2, 3, 4] and all(abs(got[k] - single[k]) < 1e-5 for k in got), (name, got, single)
        assert all(abs(a[1] - b[1]) < 1e-5 and a[2] == b[2] for a, b in zip(_evals(out), evals)), name
    # FSDP2's sharded checkpoint: `eval` reads it and reports the logged validation
    assert (tmp_path / "fsdp" / "ckpt-00000004" / "dcp" / ".metadata").is_file()
    ev = json.loads(run_cli("eval", tmp_path / "fsdp", "--data", data, "--max-batches", "2", "--batch-size", "4",
                            "--dtype", "fp32").stdout)
    assert abs(ev["loss"] - evals[-1][1]) < 1e-5 and ev["accuracy"] == evals[-1][2]
    assert np.isfinite([v for _, v in _losses(tmp_path / "fsdp")]).all()
