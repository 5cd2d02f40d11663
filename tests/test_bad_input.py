"""Bad input across the CLI: each case exits 2 with a message that says what to do, prints no
traceback, and (where the command could write) leaves every file on disk as it was."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import TINY, char_tokenizer, cli, make_char_data


def corpus(n_chars: int = 20_000) -> str:
    rng = random.Random(0)
    words = ["the", "king", "is", "dead", "long", "live", "queen", "to", "be", "or", "not", "a", "rose"]
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


def tree(path: Path) -> dict:
    """Every file (hidden ones too) under ``path`` -> its sha256, and every directory -> None."""
    path = Path(path)
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def refused(result, *phrases: str) -> str:
    rc, _, se = result
    assert rc == 2, se
    assert "Traceback" not in se, se
    for phrase in phrases:
        assert phrase in se, se
    return se


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_char_data(tmp_path_factory.mktemp("data") / "d", corpus())


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "run"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SCALELM_PEAK_TFLOPS", "1")  # no CPU peak measurement
            rc, _, se = cli("train", "--data", data, "--out", out, *TINY, "--train.max_steps=2",
                            "--train.eval_every=2", "--train.precision=fp32")
    finally:
        torch.set_num_threads(n)
    assert rc == 0, se
    return out


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("SCALELM_PEAK_TFLOPS", "1")  # no CPU peak measurement


def ckpt_of(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


def copy_model(run: Path, dst: Path) -> Path:
    shutil.copytree(ckpt_of(run), dst)
    return dst


# ----------------------------------------------------------------------------- prepare

@pytest.mark.parametrize("kind", ["truncated", "not-gzip"])
def test_prepare_bad_gzip(tmp_path, kind):
    raw = gzip.compress(corpus(50_000).encode())
    src = tmp_path / "corpus.txt.gz"
    src.write_bytes(raw[: len(raw) // 2] if kind == "truncated" else b"plain text, not gzip\n" * 50)
    before = tree(tmp_path)
    refused(cli("prepare", "--input", src, "--out", tmp_path / "out", "--tokenizer", "byte"),
            "not a readable gzip file", "corpus.txt.gz")
    assert tree(tmp_path) == before  # no out, no temporary folder left


# ----------------------------------------------------------------------------- generate / chat

def test_generate_prompt_file_not_utf8(tmp_path, run):
    f = tmp_path / "prompt.txt"
    f.write_bytes(b"caf\xe9 au lait")
    before = tree(run)
    refused(cli("generate", run, "--prompt-file", f, "--max-new-tokens", "2"), "not valid UTF-8", "byte 3", "iconv")
    assert tree(run) == before


def test_generate_prompt_argv_not_utf8(run):
    bad = b"to be \xff".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    refused(cli("generate", run, "--prompt", bad, "--max-new-tokens", "2"), "--prompt number 1 is not valid UTF-8")


def test_chat_stdin_not_utf8(run, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe bad\n")))
    before = tree(run)
    refused(cli("chat", run, "--max-new-tokens", "2", "--seed", "0"), "input line 2 is not valid UTF-8")
    assert tree(run) == before


@pytest.mark.parametrize("template,phrase", [
    ("{% for m in messages %}{{ m.content", "is not valid Jinja (line 1)"),
    ("{{ messages.append(1) }}{% for m in messages %}{{ m.content }}{% endfor %}", "sandbox blocks"),
])
def test_chat_template_errors(tmp_path, run, monkeypatch, template, phrase):
    model = copy_model(run, tmp_path / "model")
    (model / "chat_template.jinja").write_text(template)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))
    se = refused(cli("chat", model, "--max-new-tokens", "2", "--seed", "0"), "chat template", phrase, "--plain")
    assert "chat_template.jinja" in se


def test_generate_tokenizer_smaller_than_the_models(tmp_path, run):
    small = tmp_path / "small.json"
    char_tokenizer("abc").save(str(small))
    before = tree(run)
    refused(cli("generate", run, "--tokenizer", small, "--prompt", "a", "--max-new-tokens", "2"),
            "--tokenizer", "has 5 tokens", "own tokenizer.json")
    # a model directory without a tokenizer of its own: compared with the model's vocabulary
    model = copy_model(run, tmp_path / "model")
    (model / "tokenizer.json").unlink()
    refused(cli("generate", model, "--tokenizer", small, "--prompt", "a", "--max-new-tokens", "2"),
            "has 5 tokens", "would be dropped")
    assert tree(run) == before


def test_model_config_that_is_not_an_object(tmp_path, run):
    model = copy_model(run, tmp_path / "model")
    for text in ("[]", "3"):
        (model / "config.json").write_text(text)
        before = tree(model)
        refused(cli("generate", model, "--prompt", "a", "--max-new-tokens", "2"), "config.json")
        assert tree(model) == before


# ----------------------------------------------------------------------------- train / eval

@pytest.mark.parametrize("lr", ["nan", "inf", "-1e-3"])
def test_train_rejects_non_finite_or_negative_lr(tmp_path, data, lr):
    out = tmp_path / "run"
    refused(cli("train", "--data", data, "--out", out, *TINY, f"--optim.lr={lr}"), "optim.lr")
    assert not out.exists()


@pytest.mark.parametrize("key", ["optimizer_param_groups", "rng", "step", "loader"])
def test_resume_from_state_json_missing_a_key(tmp_path, run, key):
    r = tmp_path / "run"
    shutil.copytree(run, r)
    state = ckpt_of(r) / "state.json"
    st = json.loads(state.read_text())
    del st[key]
    state.write_text(json.dumps(st))
    before = tree(r)
    refused(cli("train", "--out", r, "--train.max_steps=4"), "state.json")
    assert tree(r) == before


def test_token_ids_beyond_the_vocabulary(tmp_path, data, run):
    d = tmp_path / "data"
    shutil.copytree(data, d)
    ids = np.fromfile(d / "train.bin", dtype=np.uint16)
    ids[10] = 999  # the tokenizer has ~20 tokens
    ids.tofile(d / "train.bin")
    before_d, before_r = tree(d), tree(run)
    refused(cli("train", "--data", d, "--out", tmp_path / "new", *TINY, "--train.max_steps=2"),
            "token id 999", "disagree", "scalelm prepare")
    assert not (tmp_path / "new").exists()
    refused(cli("eval", run, "--data", d, "--split", "train"), "token id 999", "disagree")
    assert tree(d) == before_d and tree(run) == before_r


def test_eval_seq_len_zero(run, data):
    refused(cli("eval", run, "--data", data, "--seq-len", "0"), "--seq-len must be between 1")


def test_train_split_too_small_advises_a_smaller_val_fraction(tmp_path):
    small = make_char_data(tmp_path / "small", corpus(3000), val_fraction=0.97)
    se = refused(cli("train", "--data", small, "--out", tmp_path / "run", *TINY, "--model.block_size=128"),
                 "split 'train'", "smaller --val-fraction")
    assert "larger --val-fraction" not in se
    assert not (tmp_path / "run").exists()


def test_eval_on_a_run_directory_names_its_data(run, data):
    se = refused(cli("eval", run, "--data", run), "run or model directory", f"trained on {data}")
    assert f"--out {run}" not in se  # prepare would refuse to write there


# ----------------------------------------------------------------------------- convert

@pytest.mark.parametrize("text,phrase", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    ('{"vocab_size": 100}', "no model_type"),
    ('{"model_type": "gpt2", "n_layer": "twelve"}', "model.n_layer: expected an integer"),
    ('{"model_type": "llama", "rope_scaling": [1]}', "wrong type"),
])
def test_convert_from_hf_garbage_config(tmp_path, text, phrase):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(text)
    before = tree(tmp_path)
    refused(cli("convert", "--from-hf", src, "--out", tmp_path / "out"), phrase)
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- plot, report

def test_plot_out_is_a_file(tmp_path, run):
    f = tmp_path / "loss.png"
    f.write_bytes(b"not a directory")
    before, before_run = tree(tmp_path), tree(run)
    refused(cli("plot", run, "--out", f), "is a file", "directory")
    refused(cli("plot", run, "--out", f / "sub"), "inside the file")
    assert tree(tmp_path) == before and tree(run) == before_run


@pytest.mark.parametrize("text,phrase", [("{broken", "not valid JSON"), ("[]", "a JSON list"),
                                         ('{"runs": 3}', "missing or malformed")])
def test_report_with_a_corrupt_plan(tmp_path, text, phrase):
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "plan.json").write_text(text)
    before = tree(d)
    refused(cli("report", d), "plan.json", phrase)
    assert tree(d) == before


# ----------------------------------------------------------------------------- plan

@pytest.mark.parametrize("args,phrase", [
    (["--efficiency", "0"], "--efficiency must be in (0, 1]"),
    (["--device-memory", "0GiB"], "--device-memory must be more than 0"),
    (["--seq-len", "0"], "--seq-len must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--devices", "8", "--parallel.tp=3"], "--parallel.tp=3 cannot be laid out on --devices 8"),
    (["--devices", "8", "--parallel.tp=8"], "tp=8 does not divide n_head=12"),
    (["--devices", "8", "--batch-size", "3", "--global-batch-size", "20"], "--global-batch-size 24"),
])
def test_plan_rejects(args, phrase):
    se = refused(cli("plan", "--preset", "gpt2-124m", *args), phrase)
    assert "no layout fits" not in se  # the memory is not what is wrong


def test_plan_honours_parallel_tp():
    rc, so, se = cli("plan", "--preset", "gpt2-124m", "--devices", "8", "--parallel.tp=2", "--json")
    assert rc == 0, se
    out = json.loads(so)
    assert out["layouts"] and {p["layout"]["tp"] for p in out["layouts"]} == {2}
    assert any("tp=2" in a for a in out["assumptions"])


# ----------------------------------------------------------------------------- sweep

@pytest.mark.parametrize("minutes", ["0", "-3"])
def test_sweep_minutes_not_positive_fails_before_timing(tmp_path, data, monkeypatch, minutes):
    from scalelm.analysis.sweep import calibrate

    def no_timing(*a, **k):
        raise AssertionError("steps were timed before the request was validated")

    monkeypatch.setattr(calibrate.StepTimer, "__init__", no_timing)
    out = tmp_path / "sweep"
    refused(cli("sweep", "--data", data, "--minutes", minutes, "--out", out), "--minutes must be a positive")
    assert not out.exists()


def test_sweep_tokens_below_min_steps(tmp_path, data):
    out = tmp_path / "sweep"
    # the sweep's micro-batch of 16 x 32 tokens = 512 tokens a step; 20 steps at least
    refused(cli("sweep", "--data", data, "--sizes", "64", "--tokens", "1k,50k", "--out", out,
                "--model.block_size=32"), "--min-steps 20", "smallest token count that works is 10.2k (10,240)")
    assert not out.exists()
