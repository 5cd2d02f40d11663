"""`prepare_run_dir`: what `--out` means (a new run, the run it holds, or a refusal), called directly.

The end-to-end guards are in test_train_resume.py; here each case is one call on a copy of a real
two-step run, so a refusal is checked to touch nothing, and the cleanup of a run killed before
its first checkpoint is checked to happen only in the process that may write.
"""

import json
import shutil
from pathlib import Path

import pytest
from train_helpers import TINY, cli, make_char_data

from scalelm.data.loader import TokenData
from scalelm.errors import CheckpointError
from scalelm.train.state import prepare_run_dir, read_run_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_char_data(tmp_path_factory.mktemp("data") / "d", TEXT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A finished two-step run with a checkpoint at each step (never modified: tests copy it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELM_PEAK_TFLOPS", "1")  # no CPU peak measurement
        rc, _, se = cli("train", "--data", data, "--out", run, *TINY, "--train.max_steps=2",
                        "--train.save_every=1", "--train.eval_every=1", "--train.precision=fp32")
    assert rc == 0, se
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-00000001", "ckpt-00000002"]
    return run


@pytest.fixture
def run(tmp_path, trained) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / ".lock").unlink(missing_ok=True)
    return out


def tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` with its bytes (directories show through their files' paths)."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(d.rglob("*"))}


def prepare(out, data, cfg=None, saved=None, write=True):
    """One call the way `scalelm train --out OUT` makes it: the run's own config unless ``cfg``."""
    saved = read_run_config(out) if saved is None and Path(out).is_dir() else saved
    return prepare_run_dir(out, cfg or saved, TokenData(data), saved, write=write)


def test_a_new_directory_starts_at_step_zero(tmp_path, trained, data):
    cfg = read_run_config(trained)
    assert prepare_run_dir(tmp_path / "new", cfg, TokenData(data), None) is None
    assert not (tmp_path / "new").exists()  # deciding creates nothing
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("x")  # hidden files (a lock, a stage) are not a user's
    assert prepare_run_dir(tmp_path / "empty", cfg, TokenData(data), None) is None
    assert (tmp_path / "empty" / ".hidden").read_text() == "x"


def test_a_run_resumes_from_its_latest_checkpoint(run, data):
    assert prepare(run, data) == run / "ckpt-00000002"
    (run / "latest").write_text("ckpt-00000001\n")  # `latest` names the checkpoint, not the newest name
    assert prepare(run, data) == run / "ckpt-00000001"
    (run / "latest").unlink()  # no marker (killed between publishing and pointing): the newest complete one
    assert prepare(run, data) == run / "ckpt-00000002"
    before = tree(run)
    assert prepare(run, data, write=True) == run / "ckpt-00000002"
    assert tree(run) == before  # nothing of a run with checkpoints is cleaned


def test_a_directory_that_is_not_a_run_is_refused_untouched(tmp_path, trained, data):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text("{}\n")  # even a name a run uses: no config.json, no checkpoint
    (out / "best").mkdir()
    (out / "best" / "keep.txt").write_text("mine too")
    before = tree(out)
    for write in (False, True):
        with pytest.raises(CheckpointError, match="is not a scalelm run directory.*nothing there was touched"):
            prepare_run_dir(out, read_run_config(trained), TokenData(data), None, write=write)
        assert tree(out) == before


def test_a_run_of_another_shape_is_refused_naming_the_field(run, data):
    saved = read_run_config(run)
    cfg = read_run_config(run)
    cfg.model.n_layer = 3
    before = tree(run)
    with pytest.raises(CheckpointError, match="holds another run") as e:
        prepare_run_dir(run, cfg, TokenData(data), saved, write=True)
    assert "model.n_layer: 2 there, 3 now" in str(e.value)
    assert "n_embd" not in str(e.value)  # only the fields that differ
    assert tree(run) == before


def test_resume_never_refuses_an_existing_run(run, data):
    cfg = read_run_config(run)
    cfg.checkpoint.resume = "never"
    before = tree(run)
    with pytest.raises(CheckpointError, match="already holds a run and checkpoint.resume=never"):
        prepare_run_dir(run, cfg, TokenData(data), read_run_config(run), write=True)
    assert tree(run) == before
    # a new directory is what resume=never is for
    assert prepare_run_dir(run.parent / "fresh", cfg, TokenData(data), None) is None


def test_a_file_as_out_is_refused(tmp_path, trained, data):
    f = tmp_path / "out.txt"
    f.write_text("not a directory")
    with pytest.raises(CheckpointError, match="is a file: choose a directory"):
        prepare_run_dir(f, read_run_config(trained), TokenData(data), None, write=True)
    assert f.read_text() == "not a directory"


def test_leftovers_of_a_run_killed_before_its_first_checkpoint(run, data):
    # what a kill before step save_every leaves: the config, run.json, metrics, best/, a half-written stage
    for ck in run.glob("ckpt-*"):
        shutil.rmtree(ck)
    (run / "latest").unlink()
    stage = run / ".staging-ckpt-00000001"
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(b"partial")
    assert (run / "metrics.jsonl").is_file() and (run / "best").is_dir()
    before = tree(run)
    # a process that may not write (write=False: the check before locking, or another rank) only decides
    assert prepare(run, data, write=False) is None
    assert tree(run) == before
    # the writer starts over: the stage, the metrics and best/ of the lost steps go; the run's own files stay
    assert prepare(run, data, write=True) is None
    left = sorted(p.name for p in run.iterdir())
    assert left == ["config.json", "run.json"], left
    assert json.loads((run / "config.json").read_text()) == json.loads(before["config.json"])
