"""No command destroys a user's files: output guards, one writer per run, `latest` kept inside
its run, staging leftovers, and control characters kept off the terminal."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import ONE_THREAD, TINY, cli, make_char_data, one_thread  # noqa: F401 (fixture)

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40


def tree_hash(root: Path) -> str:
    """Names, sizes and contents of every file under ``root`` (hidden ones too)."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs on one DATA_DIR: A (6 steps) and B (2 steps)."""
    root = tmp_path_factory.mktemp("runs")
    data = make_char_data(root / "data", TEXT)
    old = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        for name, steps in (("A", 6), ("B", 2)):
            rc, _, se = cli("train", "--data", data, "--out", root / name, *TINY, f"--train.max_steps={steps}",
                            "--train.eval_every=3", "--train.save_every=3")
            assert rc == 0, se
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return root


def refused(args, *roots, phrase):
    before = [tree_hash(r) for r in roots]
    rc, _, se = cli(*args)
    assert rc == 2 and phrase in se and "Traceback" not in se, se
    assert [tree_hash(r) for r in roots] == before, "a refused command changed files"
    return se


# ----------------------------------------------------------------------------- export / convert / sweep --out

def test_export_and_convert_never_replace_a_run_or_their_source(runs, tmp_path, one_thread):
    A, B = runs / "A", runs / "B"
    refused(["export", A, "--out", A], A, phrase="is the source itself")
    refused(["export", A / "ckpt-00000006", "--out", A], A, phrase="folder above the source")
    refused(["export", A, "--out", B], A, B, phrase="training run directory")
    refused(["export", A, "--out", B, "--overwrite"], A, B, phrase="never replaced")
    refused(["convert", A, "--to-hf", B], A, B, phrase="training run directory")
    refused(["convert", A, "--to-hf", A], A, phrase="source itself")


def test_out_holding_other_files_is_refused_and_an_earlier_output_needs_overwrite(runs, tmp_path, one_thread):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("my notes\n")
    refused(["export", runs / "A", "--out", notes], notes, phrase="does not hold a scalelm model directory")
    refused(["convert", runs / "A", "--to-hf", notes], notes, phrase="does not hold a Hugging Face model")

    hf = tmp_path / "hf"
    assert cli("convert", runs / "A", "--to-hf", hf)[0] == 0
    refused(["convert", "--from-hf", hf, "--out", notes], notes, hf, phrase="does not hold a scalelm model")
    refused(["convert", runs / "A", "--to-hf", hf], hf, phrase="--overwrite")
    assert cli("convert", runs / "A", "--to-hf", hf, "--overwrite")[0] == 0

    model = tmp_path / "model"
    assert cli("export", runs / "A", "--out", model)[0] == 0
    refused(["export", runs / "A", "--out", model], model, phrase="pass --overwrite")
    rc, so, se = cli("export", runs / "B", "--out", model, "--overwrite")
    assert rc == 0, se
    assert json.loads((model / "config.json").read_text())["step"] == 2  # B replaced the earlier export
    refused(["convert", "--from-hf", hf, "--out", model], model, phrase="pass --overwrite")
    assert cli("convert", "--from-hf", hf, "--out", tmp_path / "imported")[0] == 0


def test_sweep_never_writes_into_a_run_or_a_foreign_folder(runs, tmp_path):
    data = runs / "data"
    refused(["sweep", "--data", data, "--out", runs / "A", "--budget", "1e9", "--sizes", "32", "--tokens", "2k"],
            runs / "A", phrase="training run directory")
    refused(["sweep", "--data", data, "--out", data, "--budget", "1e9"], data, phrase="source itself")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    refused(["sweep", "--data", data, "--out", other, "--budget", "1e9"], other, phrase="does not hold a sweep")


# ----------------------------------------------------------------------------- one writer per run

def _hold_lock(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from scalelm.runs import RunLock; l = RunLock(sys.argv[1], 'train').acquire(); "
            "print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"  # no sleep-and-hope: the holder says when it has the lock
    return p


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_dead_holder_is_taken_over(runs, tmp_path,
                                                                                            one_thread):
    run = tmp_path / "run"
    args = ["train", "--data", runs / "data", "--out", run, *TINY, "--train.max_steps=2", "--train.eval_every=0"]
    assert cli(*args)[0] == 0
    holder = _hold_lock(run)
    try:
        se = refused([*args, "--train.max_steps=4"], run, phrase=f"in use by process {holder.pid}")
        assert "scalelm train" in se
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel frees it
        holder.wait(timeout=60)
    rc, so, se = cli(*args, "--train.max_steps=4")
    assert rc == 0, se
    assert json.loads(so.strip().splitlines()[-1])["step"] == 4


def test_resume_from_another_run_into_an_existing_run_is_refused(runs, tmp_path, one_thread):
    A, B = runs / "A", runs / "B"
    se = refused(["train", "--data", runs / "data", "--out", A, "--resume", B], A, B, phrase="already holds another run")
    assert "ckpt-00000006" in se
    # into a new --out it is allowed (that is what --resume elsewhere is for)
    rc, _, se = cli("train", "--data", runs / "data", "--out", tmp_path / "C", "--resume", B, *TINY,
                    "--train.max_steps=3", "--train.eval_every=0")
    assert rc == 0, se


# ----------------------------------------------------------------------------- latest, staging

def test_latest_is_only_followed_inside_its_run(runs, tmp_path):
    import shutil

    from scalelm.runs import latest_checkpoint, resolve_checkpoint

    run = tmp_path / "A"
    shutil.copytree(runs / "A", run)
    newest = latest_checkpoint(run)
    assert newest.name == "ckpt-00000006"
    for bad in (f"../B/{newest.name}", str((runs / "B" / "ckpt-00000002").resolve()), "..", "."):
        (run / "latest").write_text(bad + "\n")
        assert latest_checkpoint(run) == newest and resolve_checkpoint(run) == newest, bad
    (run / "escape").symlink_to(runs / "B" / "ckpt-00000002", target_is_directory=True)
    (run / "latest").write_text("escape\n")
    assert latest_checkpoint(run) == newest


def test_staging_leftovers_of_a_kill_are_removed_at_the_next_start(runs, tmp_path, one_thread):
    import shutil

    run = tmp_path / "A"
    shutil.copytree(runs / "A", run)
    leftovers = [run / "..staging-ckpt-00000009.x1y2", run / ".staging-ckpt-00000009", run / ".best.abcd",
                 run / ".best.old"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    rc, _, se = cli("train", "--data", runs / "data", "--out", run, "--train.max_steps=7")
    assert rc == 0, se
    assert not any(d.exists() for d in leftovers)


def test_demo_refuses_a_run_folder_it_did_not_write(tmp_path):
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "run" / "run.json").write_text("{}")  # someone's run, without the demo's mark
    refused(["demo", "--out", out, "--minutes", "0.05"], out, phrase="not the run of an earlier demo")


# ----------------------------------------------------------------------------- the terminal

def test_control_characters_are_escaped_for_a_terminal_only():
    from scalelm.generate.terminal import terminal_safe

    assert terminal_safe("a\x1b]0;pwned\x07b\rc\td\n\u202eé") == "a\\x1b]0;pwned\\x07b\\x0dc\td\n\\u202eé"
    assert terminal_safe("plain text, ünïcode 中文\n") == "plain text, ünïcode 中文\n"


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    from scalelm.config import ModelConfig
    from scalelm.data.tokenizer import byte_tokenizer
    from scalelm.model import GPT, save_model_dir

    d = tmp_path_factory.mktemp("m") / "m"
    save_model_dir(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=258)), d,
                   byte_tokenizer().to_str())
    return d


class _Tty:
    """A stdout that says it is a terminal and keeps what is written."""

    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("stream", [False, True])
def test_generate_escapes_the_echoed_prompt_and_output_on_a_terminal(byte_model, monkeypatch, stream):
    from scalelm.cli import main

    ids = ",".join(str(b) for b in b"\x1b]0;title\x07hi\r")
    tty = _Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    args = ["generate", str(byte_model), "--prompt-ids", ids, "--echo", "--max-new-tokens", "3", "--seed", "1"]
    assert main(args + (["--stream"] if stream else [])) == 0
    shown = "".join(tty.parts)
    assert "\\x1b]0;title\\x07hi\\x0d" in shown and "\x1b" not in shown and "\r" not in shown
    tty.parts.clear()
    assert main(args + ["--raw"]) == 0
    assert "\x1b]0;title\x07hi\r" in "".join(tty.parts)


def test_a_pipe_gets_the_plain_text(byte_model):
    ids = ",".join(str(b) for b in b"\x1b[31mred")
    p = subprocess.run([sys.executable, "-m", "scalelm", "generate", str(byte_model), "--prompt-ids", ids, "--echo",
                        "--max-new-tokens", "2"], capture_output=True, timeout=300,
                       env={**os.environ, **ONE_THREAD})
    assert p.returncode == 0, p.stderr
    assert b"\x1b[31mred" in p.stdout
