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
