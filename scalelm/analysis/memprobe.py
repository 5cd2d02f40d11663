"""Measure the peak memory of real training steps on CPU, to check the planner against.

``measure(spec)`` runs ``python -m scalelm.analysis.memprobe SPEC_JSON`` in a fresh process:
it warms up the kernels and the optimizer's lazy imports on a tiny model, records the
resident set size, builds the model and AdamW, runs a few training steps (forward, backward,
AdamW step, ``zero_grad(set_to_none=True)``) and reports the peak RSS (``VmHWM``) above that
baseline. glibc keeps freed memory for reuse unless told otherwise, so by default the child
runs with ``MALLOC_MMAP_THRESHOLD_=65536``: freed tensors go back to the OS and RSS tracks
what the step needs rather than the allocator's history (``malloc_default=True`` measures
without it, for comparison).
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


def _wrap_ac(model) -> None:
    try:
        from ..distributed.parallelize import apply_ac
    except ImportError:
        apply_ac = None
    if apply_ac is not None:
        apply_ac(model)
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    for key in list(model.blocks):
        model.blocks[key] = checkpoint_wrapper(model.blocks[key])


def run(spec: dict) -> dict:
    """In this process: the peak RSS increase over ``steps`` training steps of ``spec``."""
    import torch

    from ..config import ModelConfig
    from ..model.gpt import GPT

    torch.manual_seed(0)
    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    cfg = ModelConfig(**spec["model"])
    B, T = spec["batch"], spec["seq_len"]
    bf16 = spec.get("precision", "fp32") == "bf16"
    fused = spec.get("fused", True)

    def train_steps(model, x, y, n):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None,
                                foreach=None if fused else True)
        for _ in range(n):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(x, y)[1]  # as the trainer: the logits are not kept
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return opt

    # warm-up: kernels, thread pools and the optimizer's lazy imports allocate once, not per step
    tiny = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32,
                           pos_embedding=cfg.pos_embedding, norm=cfg.norm, mlp=cfg.mlp))
    if spec.get("ac"):
        _wrap_ac(tiny)
    ids = torch.zeros(2, 16, dtype=torch.long)
    train_steps(tiny, ids, ids, 2)
    del tiny
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = torch.randint(0, cfg.vocab_size, (B, T))
    _reset_peak()
    base = _status("VmRSS")
    model = GPT(cfg)
    if spec.get("ac"):
        _wrap_ac(model)
    after_model = _status("VmRSS") - base
    opt = train_steps(model, x, y, int(spec.get("steps", 3)))
    peak = _status("VmHWM") - base
    return dict(peak=peak, after_model=after_model, params=sum(p.numel() for p in model.parameters()),
                tensor_peak=_tensor_peak(lambda: train_steps_with(model, opt, x, y, bf16), model, opt))


def train_steps_with(model, opt, x, y, bf16: bool) -> None:
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(x, y)[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _tensor_peak(step, model, opt):
    """Peak bytes of live tensors during one more step, from the profiler's allocation events
    (parameters and optimizer state, allocated before, are added): the allocator-level view,
    free of malloc and interpreter overhead. None if this torch's profiler lacks the events."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    static = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                         for p in model.parameters()}.values())
    static += sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
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
