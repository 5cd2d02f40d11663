"""Scale-out across nodes, on one machine: every torchrun agent is started as a node of its own
would start it (``--nnodes=2``, c10d rendezvous at 127.0.0.1, its own ``--node-rank``); CPU, gloo.

- HSDP (replicate across the two nodes, shard within) and context parallelism next to it, on two
  nodes of two processes, train like one process (fp64, 1e-10 in every parameter);
- ``scalelm train`` replicating across two nodes (``dp_replicate=2``) logs one process's losses;
  the same job with one node's worker SIGKILLed mid-run (``--max-restarts=1``) restarts from the
  last checkpoint and ends bitwise equal to the unbroken job;
- a checkpoint written by 2 nodes x 1 process resumes on 1 node x 2 processes (bitwise) and in one
  process (1e-10);
- ``scripts/slurm.sbatch`` runs under a faked SLURM: the ``SLURM_*`` variables it reads, and
  ``srun`` / ``scontrol`` replaced by stand-ins on PATH that start one agent per "node" here.

Failures are injected by a step count and a marker file (``tests/dist/crash_once.py``), never by
time, so the tests behave the same on a loaded machine.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from dist_launch import DIST, ROOT, check_nodes, run_nodes, torchrun, torchrun_cmd, torchrun_nodes, worker_env
from train_helpers import shakespeare_data

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8
COMMON = ["--preset", "baby", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64", "--model.block_size=32",
          "--train.micro_batch_size=2", "--train.global_batch_size=8", "--train.log_every=1",
          "--optim.warmup_steps=2", "--log.progress=false", "--train.precision=fp32", f"--train.max_steps={STEPS}",
          "--train.eval_every=4", "--train.eval_iters=2", "--train.save_every=2"]
REPLICATE = ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    return shakespeare_data(shared_data, tmp_path_factory.mktemp("shk") / "data", chars=30_000)


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """{step: value} of the training loss (or ``val_loss``) in RUN_DIR's metrics, each step once."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if key in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r[key]
    return out


def close(a: dict, b: dict, tol=1e-5):
    assert sorted(a) == sorted(b)
    for k in a:
        assert abs(a[k] - b[k]) < tol, (k, a[k], b[k])


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """The run in one process, that every layout must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    run_cli("train", "--data", data, "--out", out, *COMMON, env={"OMP_NUM_THREADS": "1", "SCALELM_PEAK_TFLOPS": "1"})
    return out


def weights(ckpt: Path) -> dict:
    from scalelm.model.io import load_model_dir

    return load_model_dir(ckpt).state_dict()  # a sharded checkpoint, consolidated


# ----------------------------------------------------------------------------- layouts


CHECKS_2x2 = [
    "hsdp:llama:fp64:dp_replicate=2,dp_shard=2",  # replicate across the nodes, shard within
    "cp_hsdp:gpt2:fp64:dp_replicate=2,dp_shard=1,cp=2",  # context parallel within a node
    "cp_x_tp:llama:fp64:cp=2,tp=2,dp_shard=1",
]


def test_hsdp_and_cp_on_two_nodes_of_two_match_one_process():
    rows = torchrun_nodes(2, "equivalence.py", *CHECKS_2x2)
    assert [r["check"] for r in rows] == [c.split(":")[0] for c in CHECKS_2x2]
    for r in rows:
        assert r["world"] == 4 and r["param_diff"] < 1e-10 and r["loss_diff"] < 1e-10, r


# ----------------------------------------------------------------------------- a node failure


def test_a_killed_worker_on_one_node_restarts_and_ends_bitwise_equal(data, single, tmp_path):
    train = ["-m", "scalelm", "train", "--data", data, *COMMON, *REPLICATE]
    unbroken = tmp_path / "unbroken"
    check_nodes(run_nodes(1, *train, "--out", unbroken), "the unbroken run")
    close(losses(unbroken), losses(single))  # two nodes replicating = one process

    # the worker of global rank 1 dies by SIGKILL before step 6: ckpt-4 is the latest checkpoint
    marker, run = tmp_path / "killed", tmp_path / "run"
    done = run_nodes(1, DIST / "crash_once.py", marker, 1, 5, *train[2:], "--out", run, max_restarts=1, timeout=600)
    check_nodes(done, "the run with a killed worker")
    assert marker.exists(), "the worker was not killed"
    err = "".join(p.stderr for p in done)
    assert "resumed from" in err and "ckpt-00000004" in err, err[-4000:]
    got = losses(run)
    assert got == losses(unbroken)  # every step once, every loss bitwise
    a, b = weights(run / f"ckpt-{STEPS:08d}"), weights(unbroken / f"ckpt-{STEPS:08d}")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# ----------------------------------------------------------------------------- resharding


def _one_process(*args) -> list[dict]:
    p = subprocess.run([sys.executable, str(DIST / "reshard.py"), *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=worker_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]


def test_a_checkpoint_of_two_nodes_resumes_on_one_node_and_in_one_process(tmp_path):
    ckpt = tmp_path / "run" / "ckpt-00000002"
    saved = torchrun_nodes(1, "reshard.py", "save", ckpt, "llama")[0]  # FSDP2 sharded across the nodes
    assert saved["world"] == 2 and (ckpt / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    unbroken = saved["losses"]  # steps 3-4 after saving at step 2
    assert torchrun(2, "reshard.py", "load", ckpt, "llama")[0]["losses"] == unbroken  # 1 node x 2: the same math
    one = _one_process("load", ckpt, "llama")[0]["losses"]
    assert one == pytest.approx(unbroken, abs=1e-10, rel=0)


# ----------------------------------------------------------------------------- SLURM


SRUN = '''#!{python}
"""srun stand-in: run the job step's command once per node of the allocation, here; with
--kill-on-bad-exit, the first failure ends the others (as srun does)."""
import os, subprocess, sys, time
args = sys.argv[1:]
kill_on_bad_exit = False
while args and args[0].startswith("-"):
    kill_on_bad_exit |= args.pop(0) in ("--kill-on-bad-exit", "--kill-on-bad-exit=1", "-K")
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURM_LOCALID="0"))
         for n in range(int(os.environ["SLURM_JOB_NUM_NODES"]))]
while any(p.poll() is None for p in procs):
    if kill_on_bad_exit and any(p.poll() for p in procs):
        for p in procs:
            p.poll() is None and p.kill()
    time.sleep(0.2)
sys.exit(max(p.returncode for p in procs))
'''

SCONTROL = '''#!/bin/bash
# scontrol stand-in: "show hostnames NODELIST" -> every node is this machine
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do echo 127.0.0.1; done
'''


def test_the_slurm_script_runs_two_nodes_under_a_faked_slurm(data, single, tmp_path):
    from dist_launch import free_port

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN.format(python=sys.executable)), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "run"
    env = worker_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=4242, SLURM_JOB_NAME="scalelm",
                     SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_NUM_NODES=2, SLURM_NNODES=2, SLURM_GPUS_ON_NODE=1,
                     VENV=Path(sys.executable).parent.parent, PORT=free_port(), PRESET="baby", DATA=data, OUT=out,
                     PRECISION="fp32", COMPILE="false", MAX_RESTARTS=0, OMP_NUM_THREADS=1, SCALELM_PEAK_TFLOPS=1)
    extra = [a for a in COMMON[2:] if not a.startswith("--train.precision")]  # the preset and precision: the env's
    p = subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sbatch"), *extra], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    assert "2 ranks" in p.stderr  # one process on each of the two nodes: FSDP2 over both
    close(losses(out), losses(single))
    assert (out / f"ckpt-{STEPS:08d}" / "dcp" / ".metadata").is_file()


# ----------------------------------------------------------------------------- context parallelism


def test_context_parallelism_from_the_cli_matches_one_process(data, single, tmp_path):
    """``--parallel.cp=2``: each training and validation window split over 2 processes (the
    numerics of every CP layout: test_context_parallel.py; here the trainer's wiring)."""
    out = tmp_path / "run"
    p = subprocess.run(torchrun_cmd(2, "-m", "scalelm", "train", "--data", data, "--out", out, *COMMON,
                                    "--parallel.cp=2"), capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=worker_env(SCALELM_PEAK_TFLOPS=1))
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    assert "1 ranks" in p.stderr  # both processes hold the same rows: one data-parallel rank
    close(losses(out), losses(single))
    close(losses(out, "val_loss"), losses(single, "val_loss"))
    assert json.loads((out / "config.json").read_text())["parallel"]["cp"] == 2
