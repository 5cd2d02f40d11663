"""benchmarks/gpu_suite.sh --smoke: every row of the GPU suite runs on CPU, so it cannot rot while no GPU is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "suite.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    r = subprocess.run([str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["meta"]["smoke"] is True
    rows = res["results"]
    for name in ("gpt2_124m_train", "llama_1b_train_ac", "decode_batch1", "decode_batch32"):
        assert rows[name]["tokens_per_s"] > 0, rows[name]
    assert rows["gpt2_124m_train"]["vs_hf"] > 0 and rows["decode_batch1"]["hf_tokens_per_s"] > 0
    assert rows["llama_1b_train_ac"]["activation_checkpointing"] is True
    assert rows["llama_1b_train_ac"]["planned_peak_gib"] > 0
    assert "| gpt2_124m_train |" in out.with_suffix(".md").read_text()
