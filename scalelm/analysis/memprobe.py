"""Measure the peak memory of real training steps on CPU, to check the planner against.

``measure(spec)`` runs ``python -m scalelm.analysis.memprobe SPEC_JSON`` in a fresh process:
it warms up the kernels and the optimizer's lazy imports on a tiny model, records the
resident set size, builds the model and the trainer's own step for the spec
(``scalelm.train.probe``: its precision, master weights, AdamW, clipping, activation
checkpointing), runs a few steps and reports the peak RSS (``VmHWM``) above that baseline.
A bf16 spec therefore measures bf16 weights with fp32 masters, the trainer's default on a CPU,
unless it says ``"master_weights": false`` (fp32 weights, bf16 autocast). glibc keeps freed
memory for reuse unless told otherwise, so by default the child runs with
``MALLOC_MMAP_THRESHOLD_=65536``: freed tensors go back to the OS and RSS tracks what the step
needs rather than the allocator's history (``malloc_default=True`` measures without it, for
comparison).

A spec: ``model`` (``ModelConfig`` fields), ``batch``, ``seq_len``, and optionally
``precision`` (fp32), ``master_weights`` (null: the trainer's choice), ``ac`` (false),
``fused`` (AdamW's fused kernel, true), ``steps`` (3), ``threads``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _config(spec: dict, model: dict):
    """The training config a spec describes (what the trainer would be run with)."""
    from ..config import Config, ModelConfig

    cfg = Config()
    cfg.model = ModelConfig(**model)
    t = cfg.train
    t.device, t.precision, t.master_weights = "cpu", spec.get("precision", "fp32"), spec.get("master_weights")
    t.activation_checkpointing = bool(spec.get("ac"))
    cfg.optim.fused = bool(spec.get("fused", True))
    return cfg


def run(spec: dict) -> dict:
    """In this process: the peak RSS increase over ``steps`` training steps of ``spec``."""
    import torch

    from ..model.gpt import GPT
    from ..train.probe import probe_step

    torch.manual_seed(0)
    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    cfg = _config(spec, spec["model"])
    B, T = spec["batch"], spec["seq_len"]

    # warm-up: kernels, thread pools and the optimizer's lazy imports allocate once, not per step
    m = cfg.model
    tiny = probe_step(_config(spec, dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32,
                                         pos_embedding=m.pos_embedding, norm=m.norm, mlp=m.mlp)))
    ids = torch.zeros(2, 16, dtype=torch.long)
    for _ in range(2):
        tiny([(ids, ids)])
    del tiny
    batch = (torch.randint(0, m.vocab_size, (B, T)), torch.randint(0, m.vocab_size, (B, T)))
    _reset_peak()
    base = _status("VmRSS")
    model = GPT(m)
    after_model = _status("VmRSS") - base
    step = probe_step(cfg, model)  # bf16 weights with fp32 masters are cast and copied here
    for _ in range(int(spec.get("steps", 3))):
        step([batch])  # as the trainer: the logits are not kept
    peak = _status("VmHWM") - base
    return dict(peak=peak, after_model=after_model, params=sum(p.numel() for p in model.parameters()),
                tensor_peak=_tensor_peak(lambda: step([batch]), step))


def _tensor_peak(run_step, step):
    """Peak bytes of live tensors during one more step, from the profiler's allocation events
    (parameters, fp32 masters and optimizer state, allocated before, are added): the
    allocator-level view, free of malloc and interpreter overhead. None if this torch's profiler
    lacks the events."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    opt = step.optimizer
    held = [*step.raw_model.parameters(), *(p for g in opt.param_groups for p in g["params"])]
    static = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in held}.values())
    static += sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run_step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except (AttributeError, RuntimeError):
        return None
    cur = top = 0
    for _, nbytes in events:
        cur += nbytes
        top = max(top, cur)
    return static + top


def measure(spec: dict, malloc_default: bool = False, timeout: float = 600) -> dict:
    """Run :func:`run` in a fresh process (so earlier allocations cannot hide the peak)."""
    env = dict(os.environ)
    if not malloc_default:
        env.update(MMAP_ENV)
    p = subprocess.run([sys.executable, "-m", "scalelm.analysis.memprobe", json.dumps(spec)],
                       capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"memory probe failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
