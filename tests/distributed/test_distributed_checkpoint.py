"""Sharded (DCP) checkpoints: saved under one layout, resumed under another with the same
losses as an unbroken run; consolidated by `scalelm export` into a model directory."""

import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from dist_launch import DIST, ROOT, torchrun, worker_env

pytestmark = pytest.mark.distributed


def one_process(*args) -> list[dict]:
    import json

    p = subprocess.run([sys.executable, str(DIST / "reshard.py"), *map(str, args)], capture_output=True,
                       text=True, timeout=120, env=worker_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]


def resume(nproc, ckpt, style, layout=""):
    if nproc == 1:
        return one_process("load", ckpt, style, layout)[0]["losses"]
    return torchrun(nproc, "reshard.py", "load", ckpt, style, layout)[0]["losses"]


def save(nproc, ckpt, style, layout=""):
    if nproc == 1:
        return one_process("save", ckpt, style, layout)[0]["losses"]
    return torchrun(nproc, "reshard.py", "save", ckpt, style, layout)[0]["losses"]


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_pipeline_and_one_process_and_exports(tmp_path):
    ckpt = tmp_path / "run" / "ckpt-00000002"
    unbroken = save(2, ckpt, "gpt2")  # FSDP over 2 ranks; reports steps 3-4 after saving at 2
    assert (ckpt / "dcp" / ".metadata").is_file() and (tmp_path / "run" / "latest").read_text().strip() == ckpt.name
    assert resume(2, ckpt, "gpt2", "pp=2") == pytest.approx(unbroken, abs=1e-10)
    assert resume(1, ckpt, "gpt2") == pytest.approx(unbroken, abs=1e-10)

    out = tmp_path / "exported"
    run_cli("export", tmp_path / "run", "--out", out)  # a RUN_DIR means its latest checkpoint
    from scalelm.model.io import load_model_dir, load_weights

    sys.path.insert(0, str(DIST))
    import harness

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref, _ = harness.reference(harness.make_cfg("gpt2"), steps=2)
    finally:
        torch.set_default_dtype(old)
    weights = load_weights(out / "model.safetensors")  # fp64 as trained (load_model_dir builds fp32)
    assert set(weights) == set(ref.state_dict()) - {"lm_head.weight"}  # the tied head is stored once
    for name, w in weights.items():
        assert w.dtype == torch.float64
        torch.testing.assert_close(w, ref.state_dict()[name], atol=1e-10, rtol=0)
    # generate/eval read a sharded checkpoint directly, consolidating it on the fly
    direct, exported = load_model_dir(ckpt), load_model_dir(out)
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in exported.state_dict().items())


@pytest.mark.slow
def test_more_layout_changes(tmp_path):
    # pipeline (interleaved, tied embedding on two stages) -> FSDP
    a = tmp_path / "a" / "ckpt-00000002"
    unbroken = save(2, a, "llama", "pp=2,pp_schedule=interleaved_1f1b")
    assert resume(2, a, "llama") == pytest.approx(unbroken, abs=1e-10)
    # the single-process trainer's format -> 4 ranks FSDP2 x TP (another world size and format)
    b = tmp_path / "b" / "ckpt-00000002"
    unbroken = save(1, b, "gpt2")
    assert (b / "optimizer.safetensors").is_file()
    assert resume(4, b, "gpt2", "tp=2") == pytest.approx(unbroken, abs=1e-10)


def test_export_errors(tmp_path):
    p = run_cli("export", tmp_path / "nothing", "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "not found" in p.stderr
    (tmp_path / "empty").mkdir()
    p = run_cli("export", tmp_path / "empty", "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "neither a checkpoint or model directory" in p.stderr
