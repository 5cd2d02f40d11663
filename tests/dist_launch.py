"""Launch a worker under torchrun from a test, fail fast on a hang, parse its RESULT lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "tests" / "dist"


def torchrun_cmd(nproc: int, *args, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", *map(str, args)]


def worker_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun(nproc: int, script: str, *args, timeout: int = 240, cwd=None, **env) -> list[dict]:
    """Run ``tests/dist/SCRIPT ARGS`` on ``nproc`` processes; return rank 0's RESULT rows."""
    p = subprocess.run(torchrun_cmd(nproc, DIST / script, *args), capture_output=True, text=True,
                       timeout=timeout, env=worker_env(**env), cwd=cwd or ROOT)
    if p.returncode != 0:
        raise AssertionError(f"torchrun {script} {' '.join(map(str, args))} failed ({p.returncode}):\n"
                             f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-6000:]}")
    return [json.loads(line[len("RESULT "):]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]


# ----------------------------------------------------------------------------- two nodes on one machine

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_cmd(node_rank: int, nproc: int, port: int, *args, nnodes: int = 2, max_restarts: int = 0) -> list[str]:
    """One torchrun agent of an ``nnodes``-node job, as each node would start it: c10d rendezvous at
    127.0.0.1:PORT, hosted by node 0 (``is_host``), this node's own ``--node-rank``."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=scalelm-test", f"--rdzv-conf=is_host={int(node_rank == 0)},join_timeout=300,read_timeout=120",
            "--local-addr=127.0.0.1", f"--max-restarts={max_restarts}", *map(str, args)]


def run_nodes(nproc: int, *args, nnodes: int = 2, max_restarts: int = 0, timeout: int = 300, cwd=None,
              **env) -> list[subprocess.CompletedProcess]:
    """Start ``nnodes`` agents of ``nproc`` workers each running ARGS; wait for all of them. On a
    timeout every agent is killed (and its workers with it) before the error propagates."""
    port = free_port()
    procs = [subprocess.Popen(agent_cmd(n, nproc, port, *args, nnodes=nnodes, max_restarts=max_restarts),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT,
                              env=worker_env(**env))
             for n in range(nnodes)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
                p.wait()
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything under it (an agent and its workers), by process id."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for q in procs:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass


def check_nodes(done: list[subprocess.CompletedProcess], what: str) -> None:
    for n, p in enumerate(done):
        if p.returncode != 0:
            raise AssertionError(f"{what}: node {n} failed ({p.returncode}):\nstdout:\n{p.stdout[-3000:]}\n"
                                 f"stderr:\n{p.stderr[-6000:]}")


def torchrun_nodes(nproc: int, script: str, *args, timeout: int = 300, **env) -> list[dict]:
    """``torchrun`` on two nodes of ``nproc`` processes each: global rank 0's RESULT rows (rank 0
    lives on whichever node the rendezvous made the first)."""
    done = run_nodes(nproc, DIST / script, *args, timeout=timeout, **env)
    check_nodes(done, f"{script} {' '.join(map(str, args))}")
    return [json.loads(line[len("RESULT "):]) for p in done for line in p.stdout.splitlines()
            if line.startswith("RESULT ")]
