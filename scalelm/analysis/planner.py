"""``scalelm plan``: memory, FLOPs, communication and step time of every parallel layout,
before a GPU-hour is spent, and the cheapest layout that fits.

Memory comes from :mod:`scalelm.analysis.memory` (validated against the real model),
FLOPs from :func:`scalelm.model.flops_per_token` (exact matmul FLOPs), peaks and link
bandwidths from :mod:`scalelm.hardware`. Step time is a roofline estimate: compute
at an assumed fraction of peak, data-parallel traffic overlapped with it, tensor- and
pipeline-parallel traffic and the pipeline bubble on the critical path.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..cliargs import add_deprecated, add_dtype_arg
from ..config import Config, ModelConfig, resolve
from ..errors import UserError
from ..hardware import DeviceSpec, device_spec
from .memory import (
    Layout,
    MemoryEstimate,
    ParamSplit,
    estimate_memory,
    param_split,
    planning_config,
)

PHASE = {"loss backward": "loss-bwd", "layer backward": "layer-bwd", "first layer backward": "layer0-bwd",
         "backward end": "bwd-end",
         "optimizer step": "optimizer"}
HEADROOM = 0.9  # fits = peak under 90% of device memory (allocator slack, CUDA context, NCCL)
GiB = 2**30


@dataclass
class Setup:
    """Everything a layout is evaluated against."""

    cfg: ModelConfig
    devices: int
    device: DeviceSpec
    memory: float  # bytes per device
    per_node: int
    seq_len: int
    micro_batch: int
    global_batch: int  # sequences per optimizer step
    precision: str
    efficiency: float  # achieved fraction of peak FLOP/s
    schedule: str = "1f1b"
    seq_parallel: bool = False
    split: Optional[ParamSplit] = None
    device_type: str = "cuda"
    fixed: dict = field(default_factory=dict)  # layout dimensions the config pins (--parallel.tp=2)

    @property
    def peak(self) -> float:
        # fp32 is IEEE fp32: torch leaves TF32 matmuls off unless asked, and so does the trainer
        return self.device.flops[self.precision]


@dataclass
class Plan:
    layout: Layout
    name: str
    grad_accum: int  # micro-batches per optimizer step per data-parallel rank (pipeline: per pipeline)
    memory: MemoryEstimate
    fits: bool
    flops_per_step: float  # model FLOPs (recomputation excluded)
    device_flops_per_step: float  # what the busiest device executes (recompute, replicated head)
    comm_bytes: dict  # bytes each device sends per step, by dimension
    times: dict  # seconds: compute, bubble, dp, tp, pp, step
    tokens_per_s: float
    mfu: float
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = dict(asdict(self.layout), name=self.name)
        d["memory"] = {k: v for k, v in self.memory.to_dict().items() if k != "detail"}
        d["memory"]["phases"] = self.memory.detail["phases"]
        return d


# ----------------------------------------------------------------------------- layouts


def factorizations(n: int) -> list[tuple[int, int, int, int, int]]:
    """All (pp, dp_replicate, dp_shard, tp, cp) with product n."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return [(pp, r, s, tp, n // (pp * r * s * tp)) for pp in divs for r in divs for s in divs for tp in divs
            if n % (pp * r * s * tp) == 0]


def invalid_reason(setup: Setup, pp: int, r: int, s: int, tp: int, cp: int = 1) -> Optional[str]:
    """Why a layout cannot run (the same rules as scalelm.distributed), or None."""
    c = setup.cfg
    if c.arch == "encoder" and max(pp, tp, cp) > 1:  # as the trainer refuses them
        return "an encoder trains with data parallelism only (tp, pp and cp are built for the GPT)"
    if cp > 1:
        if pp > 1:
            return "cp does not run inside a pipeline"
        if setup.seq_parallel:
            return "cp and sequence parallelism both split the sequence"
        if setup.seq_len % (2 * cp):
            return f"cp={cp} splits a sequence into {2 * cp} chunks: seq_len {setup.seq_len} does not divide"
        if c.dropout > 0 or getattr(c, "sliding_window", None) is not None or getattr(c, "attn_softcap", None):
            return "cp runs plain causal attention (no dropout, window or softcap)"
    if tp > 1:
        if c.n_head % tp:
            return f"tp={tp} does not divide n_head={c.n_head}"
        if c.kv_heads % tp:
            return f"tp={tp} does not divide n_kv_head={c.kv_heads}"
        if c.ffn_dim % tp:
            return f"tp={tp} does not divide the MLP width {c.ffn_dim}"
        if tp > setup.per_node:
            return f"tp={tp} would span nodes of {setup.per_node} devices (every layer would wait on the network)"
    if pp > 1 and c.n_layer % pp:
        return f"pp={pp} does not divide n_layer={c.n_layer}"
    if c.n_shared_blocks and c.n_shared_blocks != c.n_layer and (pp > 1 or s > 1):
        return "cross-layer shared blocks cannot be pipelined or FSDP-sharded"
    per_rank = setup.global_batch / (r * s)
    if setup.global_batch % (setup.micro_batch * r * s):
        return (f"global batch {setup.global_batch} is not a multiple of micro-batch {setup.micro_batch} "
                f"x data-parallel size {r * s}")
    if per_rank < setup.micro_batch:
        return f"global batch {setup.global_batch} is smaller than {r * s} data-parallel ranks x micro-batch"
    return None


# ----------------------------------------------------------------------------- FLOPs, comm, time


def layer_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of one layer, the per-layer term of ``flops_per_token``."""
    d, hd = cfg.n_embd, cfg.head_dim
    attn_w = d * hd * (cfg.n_head * 2 + cfg.kv_heads * 2)
    mlp_w = d * cfg.ffn_dim * (3 if cfg.gated_mlp else 2)
    return 3 * (2 * (attn_w + mlp_w) + 4 * seq_len * cfg.n_head * hd)


def head_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token of the LM head; an encoder's masked-LM head (transform and decoder)
    runs on the predicted ``MLM_FRACTION`` of positions only (``encoder_flops_per_token``'s head term)."""
    if cfg.arch == "encoder":
        from ..model.gpt import MLM_FRACTION

        return 3 * 2 * MLM_FRACTION * (cfg.n_embd * cfg.n_embd + cfg.n_embd * cfg.vocab_size)
    return 3 * 2 * cfg.n_embd * cfg.vocab_size


def _link(setup: Setup, inner: int, size: int) -> tuple[str, float]:
    """The link a group of ``size`` ranks with stride ``inner`` runs over (mesh: pp, dp_replicate,
    dp_shard, cp, tp, tp innermost): inside a node if the group's span fits in one."""
    if inner * size <= setup.per_node:
        return setup.device.intra_node
    return setup.device.inter_node


def evaluate(setup: Setup, layout: Layout) -> Plan:
    cfg, split = setup.cfg, setup.split
    pp, r, s, tp, cp = layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp, layout.cp
    B, T = setup.micro_batch, setup.seq_len
    Tl = T / cp  # tokens of each sequence on this device (context parallelism)
    accum = setup.global_batch // (B * r * s)
    mem = estimate_memory(cfg, layout, B, T, setup.precision, accum, setup.schedule,
                          setup.seq_parallel, split, device_type=setup.device_type)
    from ..model.gpt import flops_per_token

    tokens_step = setup.global_batch * T
    flops_step = flops_per_token(cfg, T) * tokens_step
    # busiest stage, per micro-batch: its layers (split by TP; recomputed under AC) and the head
    # (not split by TP: every TP rank computes the whole vocabulary projection)
    lf = layer_flops_per_token(cfg, T) * (4 / 3 if layout.ac else 1) / tp
    stage_flops = [(cfg.n_layer // pp) * lf + (head_flops_per_token(cfg) if st == pp - 1 else 0)
                   for st in range(pp)]
    # under CP a device computes its 1/cp of the tokens, each attending over the whole sequence
    # (the zigzag split gives every rank the same share of the causal attention)
    mb_time = max(stage_flops) * B * Tl / (setup.peak * setup.efficiency)
    compute = accum * mb_time
    bubble = (pp - 1) * mb_time / (2 if setup.schedule == "interleaved_1f1b" else 1) if pp > 1 else 0.0
    device_flops = accum * max(stage_flops) * B * Tl

    # communication, bytes sent per device per step (ring collectives: 2(n-1)/n for all-reduce)
    low = setup.precision in ("bf16", "fp16")
    act = 2 if low else 4
    P_local = mem.detail["params_unsharded"]
    comm, times, notes = {}, {}, []
    if tp > 1:
        per = 2 * (tp - 1) / tp * B * Tl * cfg.n_embd * act
        n_ar = (6 if layout.ac else 4) * (cfg.n_layer // pp)  # 2 fwd + 2 bwd all-reduces a layer (+2 recompute)
        comm["tp"] = accum * n_ar * per
        times["tp"] = comm["tp"] / _link(setup, 1, tp)[1]
    if cp > 1:  # the ring: K and V go round (cp - 1 hops) in the forward, again in the backward with
        # their fp32 gradients (cp hops); AC's recompute sends them once more
        kv = 2 * B * Tl * cfg.kv_heads * cfg.head_dim / tp
        layers = cfg.n_layer // pp
        fwd = (2 if layout.ac else 1) * (cp - 1) * kv * act * layers * accum
        bwd_kv, bwd_grad = (cp - 1) * kv * act * layers * accum, cp * kv * 4 * layers * accum
        comm["cp"] = fwd + bwd_kv + bwd_grad
        link = _link(setup, tp, cp)[1]
        # K/V hops overlap the attention of the block in hand; the gradients' hop waits for it
        attn = 12 * T * cfg.n_head * cfg.head_dim / tp * B * Tl * layers * accum * (4 / 3 if layout.ac else 1)
        times["cp"] = max(0.0, (fwd + bwd_kv) / link - attn / (setup.peak * setup.efficiency)) + bwd_grad / link
    if layout.fsdp:
        pb = 2 if low else 4
        sc = s * cp  # FSDP2 shards over dp_shard x cp
        gathers = 1 if pp > 1 else 2  # forward, and again in backward (resharded after forward)
        ag = gathers * accum * (sc - 1) / sc * P_local * pb if sc > 1 else 0.0
        rs = (sc - 1) / sc * P_local * 4 if sc > 1 else 0.0  # one fp32 reduce-scatter per step
        ar = 2 * (r - 1) / r * P_local / sc * 4 if r > 1 else 0.0  # across replicas (HSDP)
        comm["dp"] = ag + rs + ar
        times["dp"] = (ag + rs) / _link(setup, tp, sc)[1] + (ar / _link(setup, tp * sc, r)[1] if r > 1 else 0)
    elif r > 1:
        comm["dp"] = 2 * (r - 1) / r * P_local * 4  # DDP: one fp32 all-reduce per step
        times["dp"] = comm["dp"] / _link(setup, tp * s * cp, r)[1]
    if pp > 1:
        comm["pp"] = 2 * accum * B * T * cfg.n_embd * act  # activations forward, gradients back
        times["pp"] = comm["pp"] / _link(setup, tp * s * r, pp)[1]
    # DP traffic overlaps compute; TP all-reduces and pipeline sends sit on the critical path
    step = max(compute + bubble, times.get("dp", 0.0)) + times.get("tp", 0.0) + times.get("pp", 0.0) \
        + times.get("cp", 0.0)
    times.update(compute=compute, bubble=bubble, step=step)
    if pp > 1 and accum < pp:
        notes.append(f"only {accum} micro-batches for {pp} stages: most of the pipeline idles")
    fits = mem.peak <= HEADROOM * setup.memory
    mfu = flops_step / (step * setup.devices * setup.peak) if step > 0 else 0.0
    return Plan(layout=layout, name=layout.name + ("+AC" if layout.ac else ""), grad_accum=accum,
                memory=mem, fits=fits, flops_per_step=flops_step, device_flops_per_step=device_flops,
                comm_bytes=comm, times=times, tokens_per_s=tokens_step / step if step else 0.0,
                mfu=mfu, notes=notes)


def complexity(layout: Layout) -> tuple:
    """Simpler first: fewer parallel dimensions, no checkpointing, no pipeline, no CP, no TP."""
    dims = sum(x > 1 for x in (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp, layout.cp))
    return (dims, layout.ac, layout.pp > 1, layout.cp > 1, layout.tp > 1, layout.dp_shard > 1)


def plan_all(setup: Setup) -> tuple[list[Plan], list[dict]]:
    setup.split = setup.split or param_split(setup.cfg)
    plans, skipped = [], []
    for pp, r, s, tp, cp in factorizations(setup.devices):
        dims = dict(pp=pp, dp_replicate=r, dp_shard=s, tp=tp, cp=cp)
        if any(dims[k] != v for k, v in setup.fixed.items()):
            continue  # the config asked for another layout
        why = invalid_reason(setup, pp, r, s, tp, cp)
        if why:
            skipped.append(dict(dims, reason=why))
            continue
        for ac in (False, True):
            plans.append(evaluate(setup, Layout(pp=pp, dp_replicate=r, dp_shard=s, tp=tp, cp=cp, ac=ac)))
    plans.sort(key=lambda p: (not p.fits, p.times["step"] if p.fits else p.memory.peak))
    return plans, skipped


def no_valid_layout(setup: Setup, skipped: list[dict]) -> str:
    """Why no layout can run at all (every one invalid): the reasons, and a batch that works."""
    reasons = list(dict.fromkeys(x["reason"] for x in skipped))
    pinned = " ".join(f"--parallel.{k}={v}" for k, v in setup.fixed.items())
    where = f"{setup.devices} devices" + (f" with {pinned}" if pinned else "")
    if any("global batch" in r for r in reasons):
        step = setup.micro_batch * setup.devices  # pure data parallelism: always a valid shape
        lo, hi = (setup.global_batch // step) * step, (setup.global_batch // step + 1) * step
        near = " or ".join(str(b) for b in (lo, hi) if b >= step)
        return (f"no layout of {where} can split a global batch of {setup.global_batch} sequences into "
                f"micro-batches of {setup.micro_batch}: it must be a multiple of micro-batch x data-parallel "
                f"size. Use e.g. --global-batch-size {near} (micro-batch {setup.micro_batch} x {setup.devices} "
                f"devices), or another --batch-size (the layouts' reasons: {'; '.join(reasons[:3])})")
    return (f"no layout of {where} can run this model: {'; '.join(reasons[:4])}"
            + (f". Drop {pinned} to compare every layout" if pinned else ". Use another --devices"))


def recommend(plans: list[Plan], setup: Setup) -> tuple[Optional[Plan], str]:
    fit = [p for p in plans if p.fits]
    budget = f"{_gib(HEADROOM * setup.memory)} (90% of {_gib(setup.memory)})"
    if not fit:
        smallest = min(plans, key=lambda p: p.memory.peak) if plans else None
        hint = (f"; the smallest peak is {_gib(smallest.memory.peak)} with {smallest.name} "
                f"({_layout_str(smallest.layout)})" if smallest else "")
        return None, (f"no layout fits in {budget} per device{hint}. Use more devices, a smaller "
                      f"--batch-size, a shorter --seq-len, or a device with more memory.")
    fastest = min(p.times["step"] for p in fit)
    # within 3% of the fastest, the simplest layout wins: fewer moving parts for the same cost
    best = min((p for p in fit if p.times["step"] <= 1.03 * fastest), key=lambda p: complexity(p.layout))
    why = [f"{best.name} ({_layout_str(best.layout)}) fits ({_gib(best.memory.peak)} of {budget}) "
           f"with the shortest estimated step: {best.times['step']:.3g} s, "
           f"{best.tokens_per_s:,.0f} tokens/s, MFU {best.mfu:.0%}"]
    if best.times["step"] > fastest:
        why.append("within 3% of the fastest and simpler to run")
    no_ac = [p for p in plans if not p.layout.ac]
    if best.layout.ac and not any(p.fits for p in no_ac):
        why.append("activation checkpointing is needed: no layout fits without it")
    simple = [p for p in plans if not p.layout.ac and complexity(p.layout)[0] <= 1 and p is not best]
    for p in sorted(simple, key=lambda p: complexity(p.layout))[:3]:
        if not p.fits:
            why.append(f"{p.name} would need {_gib(p.memory.peak)} per device")
        elif p.times["step"] > best.times["step"] * 1.03:
            why.append(f"{p.name} fits but is slower ({p.times['step']:.3g} s a step)")
    return best, "; ".join(why) + "."


# ----------------------------------------------------------------------------- output


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB" if x >= 0.1 * GiB else f"{x / 2**20:.0f} MiB"


def _layout_str(l: Layout) -> str:
    return (f"pp={l.pp} dp_replicate={l.dp_replicate} dp_shard={l.dp_shard} tp={l.tp}"
            + (f" cp={l.cp}" if l.cp > 1 else "") + (" +AC" if l.ac else ""))


def _bytes(x: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.0f} B"


def assumptions(setup: Setup) -> list[str]:
    d = setup.device
    return [
        f"device: {d.name}, {_gib(setup.memory)}, peak {setup.peak / 1e12:.4g} TFLOP/s in {setup.precision} "
        f"(dense), memory bandwidth {d.mem_bandwidth / 1e9:.0f} GB/s",
        f"compute runs at {setup.efficiency:.0%} of peak (--efficiency)",
        *([f"only layouts with {', '.join(f'{k}={v}' for k, v in setup.fixed.items())} (the config's "
           f"parallel settings)"] if setup.fixed else []),
        f"links: within a node of {setup.per_node}: {d.intra_node[0]} ({d.intra_node[1] / 1e9:.0f} GB/s per "
        f"direction); between nodes: {d.inter_node[0]} ({d.inter_node[1] / 1e9:.1f} GB/s)",
        "mesh order pp, dp_replicate, dp_shard, cp, tp (tp innermost, kept inside a node); ring collectives, "
        "latency ignored",
        "data-parallel traffic overlaps compute; tensor-parallel all-reduces, pipeline sends and the "
        f"pipeline bubble ({setup.schedule}) do not; context parallelism's K/V hops overlap attention, its "
        "gradient hops do not",
        "training state: fp32 weights, fp32 gradients, fp32 AdamW moments (16 bytes a parameter); "
        + ("bf16 autocast (FSDP2: bf16 gathered parameters, fp32 gradient reduction)" if setup.precision != "fp32"
           else "fp32 compute"),
        "gradient accumulation keeps unsharded gradients until the last micro-batch (DDP no_sync, FSDP2 "
        "gradient sync off); the loss is computed on full fp32 logits; activation checkpointing is per block",
        f"fits = peak under {HEADROOM:.0%} of device memory",
        *(["encoder (masked LM): the head, its logits and the loss on the 15% of positions that are predicted; "
           "data parallelism only"] if setup.cfg.arch == "encoder" else []),
    ]


def print_table(setup: Setup, plans: list[Plan], skipped: list[dict], best: Optional[Plan], why: str,
                show_all: bool, out=None) -> None:
    out = out or sys.stdout  # looked up per call: a default bound at import keeps a replaced stdout forever
    c = setup.cfg
    n = setup.split.total
    print(f"model: {n:,} parameters ({c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads / "
          f"{c.kv_heads} kv, vocab {c.vocab_size})", file=out)
    fpt = plans[0].flops_per_step / (setup.global_batch * setup.seq_len) if plans else 0
    how = ("encoder: 6N at every position + attention, the masked-LM head on 15% of them" if c.arch == "encoder"
           else "6N + attention")
    print(f"batch: {setup.global_batch} sequences x {setup.seq_len} tokens = "
          f"{setup.global_batch * setup.seq_len:,} tokens per step, micro-batch {setup.micro_batch}; "
          f"{fpt:.4g} FLOPs per token ({how}), {fpt * setup.global_batch * setup.seq_len:.4g} per step",
          file=out)
    print(f"devices: {setup.devices} x {setup.device.name} ({setup.per_node} per node)\n", file=out)
    hdr = (f"{'layout':<16}{'pp':>3}{'rep':>4}{'shard':>6}{'cp':>4}{'tp':>4}{'acc':>5}{'params':>10}{'grads':>10}"
           f"{'optim':>10}{'activ':>10}{'peak':>10} {'at':<10}{'fits':<5}{'comm/step':>10}{'step s':>9}{'tok/s':>11}{'MFU':>5}")
    print(hdr, file=out)
    shown = plans if show_all else [p for p in plans if p.fits][:12] + [p for p in plans if not p.fits][:4]
    for p in shown:
        l, m = p.layout, p.memory
        comm = sum(p.comm_bytes.values())
        print(f"{p.name:<16}{l.pp:>3}{l.dp_replicate:>4}{l.dp_shard:>6}{l.cp:>4}{l.tp:>4}{p.grad_accum:>5}"
              f"{_gib(m.params):>10}{_gib(m.grads):>10}{_gib(m.optimizer):>10}{_gib(m.activations):>10}"
              f"{_gib(m.peak):>10} {PHASE[m.phase]:<10}{'yes' if p.fits else 'no':<5}{_bytes(comm) if comm else '-':>10}"
              f"{p.times['step']:>9.3g}{p.tokens_per_s:>11,.0f}{p.mfu:>5.0%}", file=out)
    hidden = len(plans) - len(shown)
    if hidden:
        print(f"... {hidden} more layouts (--all shows them, --json lists them with reasons)", file=out)
    if skipped:
        print(f"skipped {len(skipped)} invalid layouts, e.g. " + "; ".join(
            f"pp={s['pp']} rep={s['dp_replicate']} shard={s['dp_shard']} tp={s['tp']} cp={s['cp']}: {s['reason']}"
            for s in skipped[:3]), file=out)
    print("\nassumptions:", file=out)
    for a in assumptions(setup):
        print(f"  - {a}", file=out)
    print(f"\nrecommended: {why}", file=out)
    if best:
        l = best.layout
        flags = (f"--parallel.pp={l.pp} --parallel.dp_replicate={l.dp_replicate} --parallel.dp_shard={l.dp_shard} "
                 f"--parallel.tp={l.tp} " + (f"--parallel.cp={l.cp} " if l.cp > 1 else "")
                 + f"--train.micro_batch_size={setup.micro_batch} "
                 f"--train.global_batch_size={setup.global_batch}"
                 + (" --train.activation_checkpointing=true" if l.ac else ""))
        print(f"  train with: {flags}", file=out)


# ----------------------------------------------------------------------------- CLI


def parse_bytes(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read a memory size from '{text}'; write e.g. 80GiB, 24GB or 512MiB")
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    scale = {"": 1, "B": 1}
    for i, p in enumerate("KMGT", 1):
        scale[p] = scale[p + "IB"] = 1024**i
        scale[p + "B"] = 1000**i
    if unit not in scale:
        raise UserError(f"unknown memory unit in '{text}'")
    return value * scale[unit]


def add_plan_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a named preset (scalelm presets lists them)")
    src.add_argument("--config", help="a TOML training config")
    p.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--device-kind", default=None,
                   help="this machine's GPU if known, else h100; or h100-pcie, h100-nvl, h200, a100, "
                        "a100-40gb, a10g, l4, l40s, v100, rtx4090, rtx3090, t4, or cpu (this machine, measured)")
    p.add_argument("--device-memory", default=None, help="memory per device, e.g. 80GiB (default: the kind's)")
    p.add_argument("--devices-per-node", type=int, default=None, help="default 8 (GPUs) or 1 (cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's block_size)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per device per forward pass, the "
                   "micro-batch (default: train.micro_batch_size)")
    p.add_argument("--global-batch-size", type=int, default=None, help="sequences per optimizer step "
                   "(default: train.global_batch_size, else --batch-size x grad_accum_steps x devices)")
    add_dtype_arg(p, default=None, help="training precision (default: train.precision; auto: bf16 where the "
                                        "device has it)")
    add_deprecated(p, "--micro-batch", "--batch-size")
    add_deprecated(p, "--global-batch", "--global-batch-size")
    add_deprecated(p, "--precision", "--dtype")
    p.add_argument("--efficiency", type=float, default=None,
                   help="achieved fraction of peak FLOP/s (default 0.5 on GPUs, 0.6 on CPU)")
    p.add_argument("--all", action="store_true", help="print every layout, not the best dozen")
    p.add_argument("--json", action="store_true", help="print JSON to stdout")
    p.set_defaults(accepts_overrides=True)


def _local_gpu_kind() -> Optional[str]:
    """The kind of this machine's GPU, when it has a known one (the default for --device-kind)."""
    import torch

    from ..hardware import gpu_kind

    return gpu_kind(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def setup_from_args(args) -> Setup:
    cfg: Config = resolve(preset=args.preset, config_file=args.config, overrides=args.overrides)
    kind = (args.device_kind or _local_gpu_kind() or "h100").lower()
    args.device_kind = kind
    spec = device_spec(kind)
    if args.devices < 1:
        raise UserError(f"--devices must be at least 1, got {args.devices}")
    # `is None`, not `or`: an explicit 0 is an error, never "the default"
    per_node = args.devices_per_node if args.devices_per_node is not None else (1 if kind == "cpu" else 8)
    if per_node < 1:
        raise UserError("--devices-per-node must be at least 1")
    memory = parse_bytes(args.device_memory) if args.device_memory else spec.memory
    if not memory > 0:
        raise UserError(f"--device-memory must be more than 0, got {args.device_memory!r}; write e.g. 80GiB")
    if kind == "cpu" and per_node > 1:  # processes on one machine share its cores and memory
        spec = DeviceSpec(spec.name + f" / {per_node} processes", {k: v / per_node for k, v in spec.flops.items()},
                          spec.memory / per_node, spec.mem_bandwidth, spec.intra_node, spec.inter_node)
        memory = memory if args.device_memory else spec.memory
    seq = args.seq_len if args.seq_len is not None else cfg.model.block_size
    if seq < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq}")
    if seq > cfg.model.block_size or seq < 1:
        raise UserError(f"--seq-len {seq} must be between 1 and the model's block_size {cfg.model.block_size} "
                        f"(raise it with --model.block_size={seq})")
    micro = args.batch_size if args.batch_size is not None else cfg.train.micro_batch_size
    if micro < 1:
        raise UserError("--batch-size must be at least 1")
    glob = args.global_batch_size if args.global_batch_size is not None else cfg.train.global_batch_size or (
        cfg.train.global_batch_tokens // seq if cfg.train.global_batch_tokens else None) or (
        micro * cfg.train.grad_accum_steps * args.devices)
    if glob < 1:
        raise UserError("--global-batch-size must be at least 1")
    precision = args.dtype or cfg.train.precision
    if precision == "auto":
        native = "no bf16" not in spec.notes
        precision = "bf16" if native else ("fp16" if kind in ("v100", "t4") else "fp32")
    eff = args.efficiency if args.efficiency is not None else (0.6 if kind == "cpu" else 0.5)
    if not 0 < eff <= 1:
        raise UserError(f"--efficiency must be in (0, 1], got {eff}")
    return Setup(cfg=planning_config(cfg.model), devices=args.devices, device=spec, memory=memory, per_node=per_node,
                 seq_len=seq, micro_batch=micro, global_batch=glob, precision=precision, efficiency=eff,
                 schedule=cfg.parallel.pp_schedule, seq_parallel=cfg.parallel.sequence_parallel,
                 device_type="cpu" if kind == "cpu" else "cuda", fixed=_fixed_dims(cfg, args))


def _fixed_dims(cfg: Config, args) -> dict:
    """The layout dimensions the config pins: given on the command line, or unlike the defaults
    (a TOML file or preset); ``dp_shard=-1`` means "the rest" and pins nothing."""
    from ..config import ParallelConfig

    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in args.overrides or [] if a.startswith("--")}
    fixed = {}
    for k in ("pp", "dp_replicate", "dp_shard", "tp", "cp"):
        v = getattr(cfg.parallel, k)
        if (f"parallel.{k}" in given or v != getattr(ParallelConfig(), k)) and not (k == "dp_shard" and v == -1):
            if v < 1:
                raise UserError(f"--parallel.{k} must be at least 1 (dp_shard: -1 = the rest), got {v}")
            fixed[k] = v
    n = math.prod(fixed.values())
    if args.devices % n or (len(fixed) == 5 and n != args.devices):
        divisors = [d for d in range(1, args.devices + 1) if args.devices % d == 0]
        pins = " ".join(f"--parallel.{k}={v}" for k, v in fixed.items())
        raise UserError(f"{pins} cannot be laid out on --devices {args.devices}: pp x dp_replicate x dp_shard x tp "
                        f"x cp must equal the device count, so each must divide it ({', '.join(map(str, divisors))}); "
                        f"change --devices or those settings, or drop them to compare every layout")
    return fixed


def run_plan(args) -> int:
    setup = setup_from_args(args)
    plans, skipped = plan_all(setup)
    if not plans:  # every layout is invalid: "no layout fits in N GiB" would blame the memory
        raise UserError(no_valid_layout(setup, skipped))
    best, why = recommend(plans, setup)
    if args.json:
        out = dict(model=asdict(setup.cfg), params=setup.split.total, devices=setup.devices,
                   device=dict(kind=args.device_kind, name=setup.device.name, memory=setup.memory,
                               peak_flops=setup.peak, per_node=setup.per_node),
                   seq_len=setup.seq_len, micro_batch=setup.micro_batch, global_batch=setup.global_batch,
                   precision=setup.precision, efficiency=setup.efficiency, assumptions=assumptions(setup),
                   layouts=[p.to_dict() for p in plans], skipped=skipped,
                   recommended=best.to_dict() if best else None, why=why)
        print(json.dumps(out, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    else:
        print_table(setup, plans, skipped, best, why, args.all)
    return 0
