"""Device peaks for MFU and the planner: a table for NVIDIA GPUs, measurements for CPUs.

GPU numbers are the vendor's dense (no sparsity) tensor-core peaks. A CPU has no datasheet we
can trust (clocks, cores given to a VM, BLAS build), so its peak is *measured*: the best of a
few square matmuls per dtype, plus a copy bandwidth, cached per machine in
``$SCALELM_CACHE_DIR/peaks.json`` (default ``~/.cache/scalelm``) keyed by CPU model, thread
count and torch version. A measurement taken while other processes loaded the machine is
used but not cached, so a busy moment cannot lower the peak (and inflate MFU) for good.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

TB = 1e12
GB = 1e9
GiB = 2**30
MiB = 2**20

# ----------------------------------------------------------------------------- device table


@dataclass(frozen=True)
class DeviceSpec:
    """Peaks of one accelerator: FLOP/s per precision, memory, bandwidths (bytes/s)."""

    name: str
    flops: dict[str, float]  # "fp32" (no tensor cores), "tf32", "bf16", "fp16", "fp8"
    memory: float  # bytes per device, as nvidia-smi reports the total
    mem_bandwidth: float  # bytes/s, device memory
    intra_node: tuple[str, float]  # link between devices of one node, bytes/s per direction
    inter_node: tuple[str, float] = ("InfiniBand NDR 400 Gb/s per device", 50 * GB)
    notes: str = ""
    patterns: tuple[str, ...] = field(default=(), repr=False)  # regexes on get_device_name


NVLINK4 = ("NVLink 4 (900 GB/s bidirectional)", 450 * GB)
NVLINK3 = ("NVLink 3 (600 GB/s bidirectional)", 300 * GB)
NVLINK2 = ("NVLink 2 (300 GB/s bidirectional)", 150 * GB)
PCIE5 = ("PCIe 5.0 x16", 64 * GB)
PCIE4 = ("PCIe 4.0 x16", 32 * GB)
PCIE3 = ("PCIe 3.0 x16", 16 * GB)
IB_HDR = ("InfiniBand HDR 200 Gb/s per device", 25 * GB)
ETH_25G = ("25 Gb Ethernet", 3.125 * GB)

# Order matters: the first pattern that matches wins ("H100 PCIe" before "H100", "L40S" before "L4").
GPUS: dict[str, DeviceSpec] = {
    "h100-pcie": DeviceSpec("NVIDIA H100 PCIe", dict(fp32=51 * TB, tf32=378 * TB, bf16=756 * TB,
                            fp16=756 * TB, fp8=1513 * TB), 81559 * MiB, 2.0 * TB, PCIE5,
                            patterns=(r"H100.*PCIe",)),
    "h100-nvl": DeviceSpec("NVIDIA H100 NVL", dict(fp32=60 * TB, tf32=418 * TB, bf16=835 * TB,
                           fp16=835 * TB, fp8=1671 * TB), 95830 * MiB, 3.9 * TB, NVLINK4,
                           patterns=(r"H100 NVL",)),
    "h100": DeviceSpec("NVIDIA H100 SXM", dict(fp32=67 * TB, tf32=494.7 * TB, bf16=989.4 * TB,
                       fp16=989.4 * TB, fp8=1978.9 * TB), 81559 * MiB, 3.35 * TB, NVLINK4,
                       patterns=(r"H100",)),
    "h200": DeviceSpec("NVIDIA H200 SXM", dict(fp32=67 * TB, tf32=494.7 * TB, bf16=989.4 * TB,
                       fp16=989.4 * TB, fp8=1978.9 * TB), 143771 * MiB, 4.8 * TB, NVLINK4,
                       patterns=(r"H200",)),
    "a100": DeviceSpec("NVIDIA A100 80GB SXM", dict(fp32=19.5 * TB, tf32=156 * TB, bf16=312 * TB,
                       fp16=312 * TB), 81920 * MiB, 2.039 * TB, NVLINK3, IB_HDR,
                       patterns=(r"A100.*80GB",)),
    "a100-40gb": DeviceSpec("NVIDIA A100 40GB", dict(fp32=19.5 * TB, tf32=156 * TB, bf16=312 * TB,
                            fp16=312 * TB), 40960 * MiB, 1.555 * TB, NVLINK3, IB_HDR,
                            patterns=(r"A100",)),
    # AWS's A10G: GA102 with fewer tensor-core FLOPs than the A10 datasheet (125 TF)
    "a10g": DeviceSpec("NVIDIA A10G", dict(fp32=31.2 * TB, tf32=35 * TB, bf16=70 * TB,
                       fp16=70 * TB), 23028 * MiB, 0.6 * TB, PCIE4, ETH_25G, patterns=(r"A10G",)),
    "l40s": DeviceSpec("NVIDIA L40S", dict(fp32=91.6 * TB, tf32=183 * TB, bf16=362 * TB,
                       fp16=362 * TB, fp8=733 * TB), 46068 * MiB, 0.864 * TB, PCIE4, ETH_25G,
                       patterns=(r"L40S",)),
    "l4": DeviceSpec("NVIDIA L4", dict(fp32=30.3 * TB, tf32=60 * TB, bf16=121 * TB,
                     fp16=121 * TB, fp8=242 * TB), 23034 * MiB, 0.3 * TB, PCIE4, ETH_25G,
                     patterns=(r"\bL4\b",)),
    # Volta and Turing have no bf16 units: torch emulates it at about the fp32 rate
    "v100": DeviceSpec("NVIDIA V100 SXM2", dict(fp32=15.7 * TB, tf32=15.7 * TB, bf16=15.7 * TB,
                       fp16=125 * TB), 32768 * MiB, 0.9 * TB, NVLINK2, IB_HDR,
                       notes="no bf16 hardware: use fp16", patterns=(r"V100",)),
    "rtx4090": DeviceSpec("NVIDIA GeForce RTX 4090", dict(fp32=82.6 * TB, tf32=82.6 * TB,
                          bf16=165.2 * TB, fp16=165.2 * TB, fp8=330.3 * TB), 24564 * MiB,
                          1.008 * TB, PCIE4, ETH_25G, notes="fp32 accumulate rate",
                          patterns=(r"4090",)),
    "rtx3090": DeviceSpec("NVIDIA GeForce RTX 3090", dict(fp32=35.6 * TB, tf32=35.6 * TB,
                          bf16=71 * TB, fp16=71 * TB), 24576 * MiB, 0.936 * TB, PCIE4, ETH_25G,
                          notes="fp32 accumulate rate", patterns=(r"3090",)),
    "t4": DeviceSpec("NVIDIA T4", dict(fp32=8.1 * TB, tf32=8.1 * TB, bf16=8.1 * TB, fp16=65 * TB),
                     15360 * MiB, 0.32 * TB, PCIE3, ETH_25G, notes="no bf16 hardware: use fp16",
                     patterns=(r"\bT4\b",)),
}


def gpu_kind(device_name: str) -> Optional[str]:
    """Map a ``torch.cuda.get_device_name`` string to a key of ``GPUS`` (None if unknown)."""
    for kind, spec in GPUS.items():
        if any(re.search(p, device_name, re.IGNORECASE) for p in spec.patterns):
            return kind
    return None


def _precision(dtype: Union[torch.dtype, str], cuda: bool) -> str:
    if isinstance(dtype, str):
        key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(dtype, dtype)
    else:
        key = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "")
    if key not in ("fp32", "tf32", "bf16", "fp16", "fp8"):
        raise ValueError(f"no peak for dtype {dtype!r}; use fp32, tf32, bf16 or fp16")
    if cuda and key == "fp32" and _tf32_enabled():
        key = "tf32"  # fp32 matmuls run on tensor cores when TF32 is allowed
    return key


def _tf32_enabled() -> bool:
    prec = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if isinstance(prec, str) and prec not in ("none", "ieee", ""):
        return prec == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


_warned: set[str] = set()


def peak_flops(device: Union[torch.device, str] = "cpu", dtype: Union[torch.dtype, str] = torch.float32) -> float:
    """Dense matmul peak in FLOP/s of ``device`` at ``dtype``.

    CUDA: the datasheet value of the GPU (fp32 means TF32 when torch allows it); an unknown GPU
    gives NaN with a warning (set ``SCALELM_PEAK_TFLOPS`` to supply one). CPU: measured, cached.
    """
    device = torch.device(device)
    env = os.environ.get("SCALELM_PEAK_TFLOPS")
    if env:
        return float(env) * TB
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = gpu_kind(name)
        if kind is None:
            if name not in _warned:
                _warned.add(name)
                warnings.warn(f"no peak FLOP/s known for GPU '{name}': MFU is NaN; set "
                              f"SCALELM_PEAK_TFLOPS=<dense TFLOP/s of your precision> to report it")
            return float("nan")
        return GPUS[kind].flops[_precision(dtype, cuda=True)]
    if device.type == "cpu":
        return cpu_peaks()[_precision(dtype, cuda=False)]
    if device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(f"no peak FLOP/s known for device type '{device.type}': MFU is NaN")
    return float("nan")


def mfu(tokens_per_s: float, flops_per_token: float, device: Union[torch.device, str] = "cpu",
        dtype: Union[torch.dtype, str] = torch.float32) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak at ``dtype``."""
    return tokens_per_s * flops_per_token / peak_flops(device, dtype)


def memory_bandwidth(device: Union[torch.device, str] = "cpu") -> float:
    """Device memory bandwidth in bytes/s: datasheet for GPUs, measured (cached) for CPUs."""
    device = torch.device(device)
    if device.type == "cuda":
        kind = gpu_kind(torch.cuda.get_device_name(device))
        return GPUS[kind].mem_bandwidth if kind else float("nan")
    return cpu_peaks()["mem_bandwidth"]


# ----------------------------------------------------------------------------- CPU features


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16, AMX, or Arm BF16)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        if (probe and probe()) or (amx and amx()):
            return True
    except RuntimeError:
        pass
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# ----------------------------------------------------------------------------- machine load


def _busy_seconds() -> float:
    """CPU-seconds spent non-idle by the whole machine since boot (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    v = [int(x) for x in fields]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """Measures what fraction of the machine's cores *other* processes used during a block.

    ``with LoadMeter() as lm: ...`` then ``lm.other`` (0 = we had the machine to ourselves,
    1 = others kept every core busy). Reads /proc/stat and this process's CPU times; NaN when
    /proc is not available.
    """

    def __enter__(self) -> "LoadMeter":
        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t
        others = (_busy_seconds() - self._busy) - (_own_seconds() - self._own)
        self.other = max(0.0, others) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def _own_seconds() -> float:
    t = os.times()  # children too: benchmarks measure subprocesses
    return t.user + t.system + t.children_user + t.children_system


def machine_is_quiet(threshold: float = 0.1, seconds: float = 0.5) -> bool:
    """True when other processes used less than ``threshold`` of the cores over ``seconds``."""
    with LoadMeter() as lm:
        time.sleep(seconds)
    return not lm.other > threshold


# ----------------------------------------------------------------------------- CPU measurement

CACHE_ENV = "SCALELM_CACHE_DIR"
BUSY_LIMIT = 0.1  # a measurement during which others used >10% of the cores is not cached


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "scalelm")


def _machine_key() -> str:
    return f"{cpu_name()} | threads={torch.get_num_threads()} | torch={torch.__version__}"


def _matmul_flops(dtype: torch.dtype, budget_s: float) -> float:
    """Best FLOP/s over square matmuls, growing n up to 2048 while one matmul stays cheap."""
    best, n, deadline = 0.0, 256, time.perf_counter() + budget_s
    while True:
        a = torch.randn(n, n, dtype=torch.float32).to(dtype)
        b = torch.randn(n, n, dtype=torch.float32).to(dtype)
        torch.mm(a, b)  # warm-up: library dispatch, page faults
        reps = 0
        while reps < 3 or (reps < 10 and time.perf_counter() < deadline - 0.5 * budget_s):
            t = time.perf_counter()
            torch.mm(a, b)
            dt = time.perf_counter() - t
            best = max(best, 2 * n**3 / dt)
            reps += 1
        if n >= 2048 or 2 * (2 * n) ** 3 / best * 3 > deadline - time.perf_counter():
            return best
        n *= 2


def _copy_bandwidth(budget_s: float = 0.3) -> float:
    """Best bytes/s of copying a buffer much larger than any cache (read + write counted)."""
    n = 64 * 2**20 // 4  # 64 MiB of fp32, twice the biggest L3s in VMs
    a, b = torch.ones(n), torch.empty(n)
    b.copy_(a)
    best, deadline = 0.0, time.perf_counter() + budget_s
    for _ in range(20):
        t = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t))
        if time.perf_counter() > deadline:
            break
    return best


def measure_cpu_peaks() -> dict:
    """Measure fp32/bf16/fp16 matmul peaks and copy bandwidth now (about 1-2 s)."""
    with LoadMeter() as lm:
        fp32 = _matmul_flops(torch.float32, 0.6)
        bf16 = _matmul_flops(torch.bfloat16, 0.4)
        fp16 = _matmul_flops(torch.float16, 0.15)  # slow on most CPUs: small sizes only
        bw = _copy_bandwidth()
    return dict(fp32=fp32, tf32=fp32, bf16=bf16, fp16=fp16, mem_bandwidth=bw,
                bf16_native=cpu_has_bf16(), threads=torch.get_num_threads(), cpu=cpu_name(),
                torch=torch.__version__, other_load=round(lm.other, 3), measured_at=time.time())


_memo: dict[str, dict] = {}


def cpu_peaks(refresh: bool = False) -> dict:
    """This machine's measured peaks, from the cache or measured now (and cached if quiet)."""
    key = _machine_key()
    if key in _memo and not refresh:
        return _memo[key]
    path = cache_dir() / "peaks.json"
    try:
        cached = json.loads(path.read_text())
        if not isinstance(cached, dict):
            cached = {}
    except (OSError, ValueError):
        cached = {}
    if key in cached and not refresh and isinstance(cached[key], dict) and "fp32" in cached[key]:
        _memo[key] = cached[key]
        return cached[key]
    peaks = measure_cpu_peaks()
    if peaks["other_load"] > BUSY_LIMIT:  # a low peak would inflate every MFU computed from it
        warnings.warn(f"CPU peak FLOP/s measured while other processes used {peaks['other_load']:.0%} of "
                      f"the cores: it is too low (MFU too high) and is not cached; it is measured again "
                      f"next time (or run `python -m scalelm.hardware` on a quiet machine)")
    else:
        from .fileio import atomic_write_text

        cached[key] = peaks
        try:
            atomic_write_text(path, json.dumps(cached, indent=2) + "\n")
        except OSError as e:  # a read-only home must not stop training
            warnings.warn(f"could not cache CPU peaks in {path}: {e}")
    _memo[key] = peaks
    return peaks


def device_spec(kind: str) -> DeviceSpec:
    """A ``DeviceSpec`` for a GPU kind of ``GPUS`` or for ``cpu`` (this machine, measured)."""
    kind = kind.lower()
    if kind in GPUS:
        return GPUS[kind]
    if kind == "cpu":
        import psutil

        p = cpu_peaks()
        return DeviceSpec(f"CPU: {p['cpu']} ({p['threads']} threads, measured)",
                          {k: p[k] for k in ("fp32", "tf32", "bf16", "fp16")},
                          float(psutil.virtual_memory().total), p["mem_bandwidth"],
                          ("shared memory (gloo), at the measured copy bandwidth / 2",
                           p["mem_bandwidth"] / 2), ETH_25G,
                          notes="" if p["bf16_native"] else "no native bf16: use fp32")
    from .errors import UserError

    raise UserError(f"unknown device kind '{kind}'; known: cpu, {', '.join(GPUS)}")


if __name__ == "__main__":  # measure and cache this machine's peaks: python -m scalelm.hardware
    p = cpu_peaks(refresh=True)
    print(json.dumps({k: v for k, v in p.items()}, indent=2))
