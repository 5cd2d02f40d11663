import json
import subprocess
import sys

import pytest
import torch

from scalelm import hardware as hw


@pytest.fixture(autouse=True)
def temp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(hw.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv("SCALELM_PEAK_TFLOPS", raising=False)
    hw._memo.clear()
    yield tmp_path
    hw._memo.clear()


@pytest.mark.parametrize("name,kind", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"), ("NVIDIA A10G", "a10g"), ("NVIDIA L4", "l4"),
    ("NVIDIA L40S", "l40s"), ("Tesla V100-SXM2-16GB", "v100"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA GeForce RTX 3090", "rtx3090"), ("Tesla T4", "t4"), ("NVIDIA GeForce GTX 1080", None),
])
def test_gpu_names_map_to_table(name, kind):
    assert hw.gpu_kind(name) == kind


def test_gpu_peaks_by_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(hw, "_tf32_enabled", lambda: False)
    assert hw.peak_flops("cuda", torch.bfloat16) == pytest.approx(989.4e12)
    assert hw.peak_flops("cuda:0", "fp16") == pytest.approx(989.4e12)
    assert hw.peak_flops("cuda", torch.float32) == pytest.approx(67e12)
    monkeypatch.setattr(hw, "_tf32_enabled", lambda: True)  # fp32 matmuls on tensor cores
    assert hw.peak_flops("cuda", torch.float32) == pytest.approx(494.7e12)
    # 1000 tokens/s at 6e9 FLOPs/token on a 989.4 TFLOP/s device
    assert hw.mfu(1e5, 6e9, "cuda", torch.bfloat16) == pytest.approx(6e14 / 989.4e12)
    for spec in hw.GPUS.values():  # dense peaks: low precision never below fp32
        assert spec.flops["bf16"] >= spec.flops["fp32"] and spec.memory > 0 and spec.mem_bandwidth > 0


def test_unknown_gpu_gives_nan_and_env_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Mystery GPU 9000")
    with pytest.warns(UserWarning, match="SCALELM_PEAK_TFLOPS"):
        assert hw.peak_flops("cuda", torch.bfloat16) != hw.peak_flops("cuda", torch.bfloat16)  # NaN
    monkeypatch.setenv("SCALELM_PEAK_TFLOPS", "100")
    assert hw.peak_flops("cuda", torch.bfloat16) == 100e12


def test_bad_dtype_is_an_error():
    with pytest.raises(ValueError, match="no peak"):
        hw.peak_flops("cpu", torch.int8)


def test_cpu_peaks_measured_and_cached(temp_cache, monkeypatch):
    p = hw.cpu_peaks()
    assert p["fp32"] > 0 and p["bf16"] > 0 and p["mem_bandwidth"] > 0
    if p["other_load"] <= hw.BUSY_LIMIT:  # a quiet machine: plausible for any CPU of the last decade
        assert 1e9 < p["fp32"] < 1e14 and p["bf16"] > 1e8 and 1e9 < p["mem_bandwidth"] < 1e13
    assert p["threads"] == torch.get_num_threads() and p["bf16_native"] == hw.cpu_has_bf16()
    assert hw.peak_flops("cpu", torch.float32) == p["fp32"]
    assert hw.peak_flops("cpu", "bf16") == p["bf16"]
    if p["other_load"] <= hw.BUSY_LIMIT:
        cached = json.loads((temp_cache / "peaks.json").read_text())
        assert cached[hw._machine_key()]["fp32"] == p["fp32"]
        hw._memo.clear()

        def boom():
            raise AssertionError("cached peaks must not be re-measured")
        monkeypatch.setattr(hw, "measure_cpu_peaks", boom)
        assert hw.cpu_peaks()["fp32"] == p["fp32"]


def test_busy_measurement_is_not_cached(temp_cache, monkeypatch):
    fake = dict(fp32=1e11, tf32=1e11, bf16=4e11, fp16=1e9, mem_bandwidth=4e10, bf16_native=True,
                threads=2, cpu="x", torch="y", other_load=0.6, measured_at=0.0)
    monkeypatch.setattr(hw, "measure_cpu_peaks", lambda: dict(fake))
    with pytest.warns(UserWarning, match="not cached"):
        assert hw.cpu_peaks()["fp32"] == 1e11
    assert not (temp_cache / "peaks.json").exists()
    fake["other_load"] = 0.0
    hw.cpu_peaks(refresh=True)
    assert hw._machine_key() in json.loads((temp_cache / "peaks.json").read_text())


def test_corrupt_cache_is_remeasured(temp_cache, monkeypatch):
    (temp_cache / "peaks.json").write_text("{not json")
    monkeypatch.setattr(hw, "measure_cpu_peaks", lambda: dict(
        fp32=2e11, tf32=2e11, bf16=2e11, fp16=1e9, mem_bandwidth=1e10, bf16_native=False,
        threads=1, cpu="x", torch="y", other_load=0.0, measured_at=0.0))
    assert hw.mfu(1000, 2e8, "cpu", torch.float32) == pytest.approx(1.0)
    assert json.loads((temp_cache / "peaks.json").read_text())  # rewritten, valid


def test_cpu_has_bf16_agrees_with_cpuinfo():
    flags = hw.cpu_flags()
    if flags:
        assert hw.cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def test_load_meter_sees_another_process():
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass"])
    try:
        import time
        time.sleep(0.3)  # let it start
        with hw.LoadMeter() as lm:
            time.sleep(0.8)
        assert lm.other > 0.8 / (2 * (__import__("os").cpu_count() or 1))  # a busy core is seen
    finally:
        spin.kill()
        spin.wait()


def test_device_specs():
    cpu = hw.device_spec("cpu")
    assert cpu.flops["fp32"] > 0 and cpu.memory > 2**30
    assert hw.device_spec("H100").name == "NVIDIA H100 SXM"
    from scalelm.errors import UserError
    with pytest.raises(UserError, match="known: cpu"):
        hw.device_spec("tpu-v9")
