"""Checkpoints: atomic writes, keep-last-K, exact resume after SIGKILL, SIGTERM saves, run-dir guards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from train_helpers import (  # noqa: F401
    ONE_THREAD,
    TINY,
    cli,
    make_char_data,
    one_thread,
    read_metrics,
    shakespeare_data,
)

# dropout on, so an unrestored RNG would show; fp32 so the comparison can be bitwise
RESUME = TINY + ["--model.n_embd=64", "--model.block_size=64", "--train.micro_batch_size=8",
                 "--model.dropout=0.1", "--train.precision=fp32", "--train.eval_every=10", "--train.save_every=5",
                 "--checkpoint.keep_last=2", "--train.seed=7"]
ENV = ONE_THREAD


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    return shakespeare_data(shared_data, tmp_path_factory.mktemp("data") / "d", chars=40_000)


def _popen(data, out, steps, extra=()):
    cmd = [sys.executable, "-m", "scalelm", "train", "--data", str(data), "--out", str(out),
           f"--train.max_steps={steps}", *RESUME, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})


def _wait_for(out: Path, proc, min_ckpt: int, extra_steps: int, timeout=240):
    """Wait until a checkpoint >= min_ckpt exists and extra_steps more steps were logged."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be interrupted:\n{proc.stderr.read()[-2000:]}")
        latest = out / "latest"
        if latest.is_file() and (out / "metrics.jsonl").is_file():
            ck = int(latest.read_text().strip().split("-")[1])
            steps = [r["step"] for r in read_metrics_safe(out) if "loss" in r]
            if ck >= min_ckpt and steps and steps[-1] >= ck + extra_steps:
                return ck, steps[-1]
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the run to make progress")


def read_metrics_safe(out):
    recs = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return recs


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]


def _vals(out):
    return [(r["step"], r["val_loss"]) for r in read_metrics(out) if "val_loss" in r]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_loss_curve(tmp_path, data):
    steps = 60
    ref = tmp_path / "ref"
    run_cli("train", "--data", data, "--out", ref, f"--train.max_steps={steps}", *RESUME, env=ENV)

    out = tmp_path / "killed"
    proc = _popen(data, out, steps)
    ck, logged = _wait_for(out, proc, min_ckpt=10, extra_steps=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and logged < steps
    run_cli("train", "--data", data, "--out", out, f"--train.max_steps={steps}", *RESUME, env=ENV)

    assert _losses(out) == _losses(ref)  # bitwise: every logged float is identical
    assert [s for s, _ in _losses(out)] == list(range(1, steps + 1))
    assert _vals(out) == _vals(ref)
    # keep_last=2, latest names the final one, nothing half-written is left behind
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000055", "ckpt-00000060"]
    assert (out / "latest").read_text().strip() == "ckpt-00000060"
    assert [p.name for p in out.glob(".*")] == [".lock"]  # the run's lock file; no staging leftovers
    assert (out / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, data):
    out = tmp_path / "run"
    proc = _popen(data, out, 400, ["--train.save_every=1000", "--train.eval_every=1000"])
    # wait for a few logged steps (no periodic checkpoint in this run)
    t0 = time.time()
    while time.time() - t0 < 240:
        if (out / "metrics.jsonl").is_file() and len([r for r in read_metrics_safe(out) if "loss" in r]) >= 3:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "caught SIGTERM" in err
    latest = (out / "latest").read_text().strip()
    stopped = int(latest.split("-")[1])
    assert 3 <= stopped < 400
    assert _losses(out)[-1][0] == stopped  # the checkpoint is the last logged step
    state = json.loads((out / latest / "state.json").read_text())
    assert state["step"] == stopped and state["loader"]["step"] == stopped
    p = run_cli("train", "--out", out, f"--train.max_steps={stopped + 3}", env=ENV)  # settings from RUN_DIR
    assert json.loads(p.stdout)["step"] == stopped + 3
    assert [s for s, _ in _losses(out)] == list(range(1, stopped + 4))


def test_atomic_checkpoint_layout_and_leftovers(tmp_path, data, one_thread):
    out = tmp_path / "run"
    # a kill during a save leaves only hidden staging dirs: they are ignored and cleaned
    out.mkdir()
    (out / ".staging-ckpt-00000004").mkdir()
    (out / ".staging-ckpt-00000004" / "model.safetensors").write_bytes(b"partial")
    (out / "notes.txt").write_text("mine")  # an unrelated file: the directory is refused
    rc, _, err = cli("train", "--data", data, "--out", out, "--train.max_steps=4", *RESUME)
    assert rc == 2 and "not a scalelm run directory" in err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    rc, so, se = cli("train", "--data", data, "--out", out, "--train.max_steps=6", *RESUME, "--train.save_every=2")
    assert json.loads(so)["step"] == 6
    assert sorted(x.name for x in out.iterdir()) == [".lock", "best", "ckpt-00000004", "ckpt-00000006",
                                                    "config.json", "latest", "metrics.jsonl", "run.json"]
    ck = out / "ckpt-00000006"
    assert sorted(x.name for x in ck.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                   "optimizer.safetensors", "rng.safetensors", "state.json",
                                                   "tokenizer.json"]
    assert (ck / "tokenizer.json").read_text() == (Path(data) / "tokenizer.json").read_text()
    # the checkpoint is a model dir: eval loads it; a RUN_DIR means its latest checkpoint
    a = json.loads(cli("eval", ck, "--data", data, "--max-batches", "2")[1])
    b = json.loads(cli("eval", out, "--data", data, "--max-batches", "2")[1])
    assert a == b and set(a) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    # finished run: running again with the same max_steps does nothing more, and says so
    before = (out / "metrics.jsonl").read_text()
    rc, so, se = cli("train", "--data", data, "--out", out, "--train.max_steps=6", *RESUME)
    assert json.loads(so)["step"] == 6 and "resumed from" in se and "complete at step 6" in se
    assert (out / "metrics.jsonl").read_text() == before  # no second evaluation of the same step


def test_run_dir_guards(tmp_path, data, one_thread):
    out = tmp_path / "run"
    assert cli("train", "--data", data, "--out", out, "--train.max_steps=2", *RESUME)[0] == 0
    # another model shape in the same RUN_DIR
    rc, so, se = cli("train", "--data", data, "--out", out, "--train.max_steps=4", *RESUME, "--model.n_layer=3")
    assert rc == 2 and "holds another run" in se and "model.n_layer: 2 there, 3 now" in se
    # resume=never refuses an existing run
    rc, so, se = cli("train", "--data", data, "--out", out, *RESUME, "--checkpoint.resume=never")
    assert rc == 2 and "already holds a run" in se
    # other data (another tokenizer) in the same RUN_DIR
    other = make_char_data(tmp_path / "other", "abcdefgh " * 2000)
    rc, so, se = cli("train", "--data", other, "--out", out, *RESUME)
    assert rc == 2 and ("other data" in se or "vocab" in se)
    # resuming a checkpoint of another shape into a new RUN_DIR
    rc, so, se = cli("train", "--data", data, "--out", tmp_path / "new", *RESUME, "--model.n_embd=32",
                "--resume", out)
    assert rc == 2 and "another shape" in se and "n_embd: checkpoint 64, this run 32" in se
    # a checkpoint trained with another tokenizer of the same vocabulary size
    src = json.loads((Path(data) / "meta.json").read_text())["tokenizer"]["vocab_size"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(data) / "tokenizer.json"))
    chars = [c for c in tok.get_vocab() if not c.startswith("<|")]
    swapped = "".join(sorted(chars)).replace("z", "~")  # same size, one symbol different
    other2 = make_char_data(tmp_path / "swapped", swapped * 300)
    assert json.loads((other2 / "meta.json").read_text())["tokenizer"]["vocab_size"] == src
    rc, so, se = cli("train", "--data", other2, "--out", tmp_path / "new2", *RESUME, "--resume", out)
    assert rc == 2 and "different tokenizer" in se
    assert not list((tmp_path / "new2").glob("ckpt-*"))
