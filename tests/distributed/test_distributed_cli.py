"""`torchrun ... -m scalelm train` on CPU: layouts train like one process, runs resume on
another layout, and a worker killed mid-run comes back under --max-restarts without losing
or repeating a step."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import run_cli
from dist_launch import ROOT, torchrun_cmd, worker_env
from train_helpers import shakespeare_data

pytestmark = pytest.mark.distributed

COMMON = ["--model.n_layer=4", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
          "--train.micro_batch_size=2", "--train.global_batch_size=8", "--train.eval_iters=2",
          "--train.log_every=1", "--optim.warmup_steps=2", "--optim.schedule=constant", "--log.progress=false",
          "--train.precision=fp32", "--train.max_steps=4", "--train.eval_every=2", "--train.save_every=2"]


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    return shakespeare_data(shared_data, tmp_path_factory.mktemp("shk") / "data", chars=30_000)


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for r in rows:
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["loss"]
    return out


def train(data, out, nproc, *extra, timeout=300):
    args = ["-m", "scalelm", "train", "--data", data, "--out", out, *COMMON, *extra]
    if nproc == 1:
        run_cli(*args[2:], env={"OMP_NUM_THREADS": "1", "SCALELM_PEAK_TFLOPS": "1"})
        return losses(out)
    p = subprocess.run(torchrun_cmd(nproc, *args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=worker_env(SCALELM_PEAK_TFLOPS=1))
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    return losses(out)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    return train(data, out, 1, "--train.max_steps=6")


def same(a: dict, b: dict, tol=1e-5):
    assert a.keys() <= b.keys()
    for k in a:
        assert abs(a[k] - b[k]) < tol, (k, a[k], b[k])


@pytest.mark.slow
def test_fsdp_run_resumes_on_a_pipeline_then_eval_and_export(data, single, tmp_path):
    run = tmp_path / "run"
    first = train(data, run, 2)  # FSDP2, steps 1-4, sharded checkpoints at 2 and 4
    same(first, single)
    assert (run / "ckpt-00000004" / "dcp" / ".metadata").is_file() and (run / "best" / "model.safetensors").is_file()
    # the run remembers its layout (config.json): a new one is given explicitly
    resumed = train(data, run, 2, "--parallel.pp=2", "--train.max_steps=6")  # steps 5-6 on 2 stages
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6] and all(resumed[k] == first[k] for k in first)
    same(resumed, single)
    # eval reads the sharded checkpoint (consolidated on the fly); export writes a model dir
    ev = json.loads(run_cli("eval", run, "--data", data, "--max-batches", "2").stdout)
    assert ev["loss"] > 0
    run_cli("export", run, "--out", tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["step"] == 6


@pytest.mark.slow
def test_a_sharded_run_resumes_in_one_process_with_no_overrides(data, single, tmp_path):
    """The run's recorded layout (dp_shard=2) does not fit one process: the resume shards over the
    processes there are and keeps the recorded global batch of 8 (accumulation 2 -> 4)."""
    run = tmp_path / "run"
    args = [a for a in COMMON if not a.startswith("--train.global_batch_size")]
    p = subprocess.run(torchrun_cmd(2, "-m", "scalelm", "train", "--data", data, "--out", run, *args,
                                    "--parallel.dp_shard=2", "--train.grad_accum_steps=2"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=worker_env(SCALELM_PEAK_TFLOPS=1))
    assert p.returncode == 0, p.stderr[-4000:]
    r = run_cli("train", "--out", run, "--train.max_steps=6", env={"OMP_NUM_THREADS": "1", "SCALELM_PEAK_TFLOPS": "1"})
    assert "last ran on 2 processes, now 1" in r.stderr and "1 ranks" in r.stderr
    same(losses(run), single)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [
    (2, ["--parallel.pp=2", "--parallel.pp_schedule=interleaved_1f1b"]),
    (4, ["--parallel.tp=2", "--parallel.sequence_parallel=true"]),  # FSDP2 x TP + SP
])  # every layout's numerics: test_distributed_equivalence.py; here the CLI wiring
def test_layouts_from_the_cli_match_one_process(data, single, tmp_path, nproc, layout):
    same(train(data, tmp_path / "run", nproc, *layout), single)


def _workers(agent_pid: int) -> list:
    import psutil

    return [p for p in psutil.Process(agent_pid).children(recursive=True) if "scalelm" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_without_losing_a_step(data, tmp_path):
    steps = ["--train.max_steps=24", "--train.save_every=4", "--train.eval_every=0", "--model.n_embd=64"]
    unbroken = train(data, tmp_path / "unbroken", 2, *steps)
    run = tmp_path / "run"
    args = ["-m", "scalelm", "train", "--data", data, "--out", run, *COMMON, *steps]
    agent = subprocess.Popen(torchrun_cmd(2, *args, max_restarts=1), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=worker_env(SCALELM_PEAK_TFLOPS=1))
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and agent.poll() is None:
        latest = run / "latest"
        if latest.is_file() and latest.read_text().strip() >= "ckpt-00000008":
            workers = _workers(agent.pid)
            if len(workers) == 2:
                killed = max(workers, key=lambda p: p.pid)
                os.kill(killed.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    out, err = agent.communicate(timeout=300)
    assert killed is not None, f"the run ended before a worker could be killed:\n{err[-3000:]}"
    assert agent.returncode == 0, err[-6000:]
    assert "resumed from" in err and "ckpt-000000" in err  # the restarted workers resumed
    got = losses(run)
    assert sorted(got) == list(range(1, 25))  # every step exactly once
    same(got, unbroken, tol=1e-6)
