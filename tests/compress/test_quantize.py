"""Weight-only int8/int4 quantization: the kernels against the dequantized weight, the stored
format's round trip, GPTQ against round-to-nearest, the CLI (quantize, then generate/eval the
result like any model directory) and its refusals."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import torch.nn as nn
from train_helpers import cli, make_char_data

from scalelm.config import ModelConfig
from scalelm.generate.generator import Generator
from scalelm.generate.sampling import SamplingParams
from scalelm.model import GPT
from scalelm.model.io import load_model_dir, save_model_dir
from scalelm.model.quant import (
    QuantLinear,
    dequantize_values,
    int4_params,
    is_quantized,
    pack_int4,
    quantize_values,
    replace_module,
    unpack_int4,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")
GREEDY = SamplingParams(temperature=0.0)
SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def corpus(n_chars: int = 12_000) -> str:
    rng = random.Random(0)
    words = ["the", "king", "is", "dead", "long", "live", "queen", "to", "be", "or", "not", "a", "rose"]
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64, tie_embeddings=True, init_std=0.1)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A char DATA_DIR, a float model dir with its tokenizer (GPT-2 style) and a Llama-style one."""
    root = tmp_path_factory.mktemp("quant")
    data = make_char_data(root / "data", corpus())
    tok = (data / "tokenizer.json").read_text()
    torch.manual_seed(0)
    save_model_dir(GPT(tiny_cfg()), root / "model", tokenizer_json=tok)
    save_model_dir(GPT(tiny_cfg(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4,
                                n_kv_head=2, tie_embeddings=False)), root / "llama", tokenizer_json=tok)
    return root


def quantize(*args):
    rc, out, err = cli("quantize", *args)
    assert rc == 0, err
    return json.loads(out)


# ----------------------------------------------------------------------------- arithmetic and kernels

def test_int4_packing_round_trips_and_rtn_error_is_within_half_a_step():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    w = torch.randn(8, 128)
    for g in (32, 128):
        scale, zero = int4_params(w, g)
        vals = quantize_values(w, scale, zero)
        assert int(vals.max()) <= 15 and int(zero.max()) <= 15
        err = (dequantize_values(vals, scale, zero) - w).abs().reshape(8, -1, g)
        assert bool((err <= scale.float()[..., None] / 2 + 1e-6).all())


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_every_kernel_matches_the_dequantized_weight(scheme, group):
    """Each kernel that runs here, in fp32 (tight) and bf16 (bf16 rounding), against x @ dequant(W)^T + b."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    m = QuantLinear.from_float(lin, scheme, group or 0)
    x = torch.randn(2, 3, 256)
    ref = x @ m.dequantized().t() + lin.bias.detach()
    kernel = "int8_mm" if scheme == "int8" else "int4_cpu"
    m.select_kernel("dequant", torch.float32)
    torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
    m.select_kernel(kernel, torch.float32)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    m.select_kernel(kernel, torch.bfloat16)
    xb = x.bfloat16().float()  # the kernel sees the input rounded to bf16; its output is bf16 too
    ref_b = xb @ m.dequantized().t() + lin.bias.detach()
    torch.testing.assert_close(m(x).float(), ref_b, rtol=1e-2, atol=2e-2)
    assert m(x).dtype == torch.float32 and m(x.bfloat16()).dtype == torch.bfloat16
    assert m.select_kernel() in (kernel, "dequant")  # the automatic choice passed the same check


def test_to_dtype_keeps_the_stored_scales_and_state_dict_is_the_stored_form():
    torch.manual_seed(0)
    m = QuantLinear.from_float(nn.Linear(64, 32), "int4", 32)
    scale = m.scale.clone()
    m.to(torch.bfloat16)
    assert m.scale.dtype == torch.float16 and torch.equal(m.scale, scale) and m.bias.dtype == torch.bfloat16
    assert sorted(m.state_dict()) == ["bias", "qweight", "scale", "zero"]


# ----------------------------------------------------------------------------- GPTQ

def test_gptq_error_is_below_rtn_on_correlated_inputs():
    from scalelm.compress.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    K, N, n = 128, 64, 2048
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)  # inputs with strongly correlated features
    X = torch.randn(n, 16, generator=g) @ torch.randn(16, K, generator=g) + 0.1 * torch.randn(n, K, generator=g) @ mix
    W = torch.randn(N, K, generator=g) * 0.05
    H = X.T @ X
    for scheme, group in (("int4", 32), ("int4", 128), ("int8", 0)):
        rtn = QuantLinear.from_float(nn.Linear(K, N, bias=False), scheme, group, weight=W).dequantized()
        q, s, z = gptq_quantize(W, H, scheme, group)
        gptq = dequantize_values(q, s, z)
        err_rtn, err_gptq = ((X @ (W - rtn).T).norm() / (X @ W.T).norm(), (X @ (W - gptq).T).norm() / (X @ W.T).norm())
        assert err_gptq < 0.8 * err_rtn, (scheme, group, float(err_gptq), float(err_rtn))


# ----------------------------------------------------------------------------- stored format and loading

@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_save_load_round_trip_gives_identical_logits(dirs, tmp_path, scheme, group):
    out = tmp_path / "q"
    rep = quantize(dirs / "model", "--scheme", scheme, *(["--group-size", str(group)] if group else []),
                   "--out", out)
    assert rep["modules"] == 12 and rep["bytes"] < rep["bytes_before"]
    meta = json.loads((out / "config.json").read_text())["quantization"]
    assert meta["scheme"] == scheme and meta["group_size"] == group and meta["method"] == "rtn"
    assert {"model.safetensors", "config.json", "tokenizer.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "config.json", "tokenizer.json"}
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    a, b = load_model_dir(out).eval(), load_model_dir(out).eval()
    assert is_quantized(a) and not any(type(m) is nn.Linear and m is not a.lm_head for m in a.modules())
    with torch.no_grad():
        la, lb = a(ids)[0], b(ids)[0]
        assert torch.equal(la, lb)
        # the same model quantized in memory (no file in between) computes the same logits
        mem = load_model_dir(dirs / "model").eval()
        for name, lin in list(mem.named_modules()):
            if isinstance(lin, nn.Linear) and name.startswith("blocks."):
                replace_module(mem, name, QuantLinear.from_float(lin, scheme, group or 0))
        assert torch.equal(mem(ids)[0], la)
        ref = load_model_dir(dirs / "model").eval()(ids)[0]
    rel = float((la - ref).norm() / ref.norm())
    assert rel < (0.02 if scheme == "int8" else 0.3), rel  # random gaussian weights: int4 loses ~8% per weight


def test_llama_style_include_head_quantizes_the_untied_head(dirs, tmp_path):
    quantize(dirs / "llama", "--scheme", "int4", "--group-size", "32", "--include-head", "--out", tmp_path / "q")
    m = load_model_dir(tmp_path / "q")
    assert isinstance(m.lm_head, QuantLinear) and isinstance(m.blocks["0"].mlp.gate, QuantLinear)
    gen = Generator.from_checkpoint(tmp_path / "q")
    assert len(gen.generate([1, 2, 3], max_new_tokens=8, sampling=GREEDY, ignore_eos=True)[0].tokens) == 8


def test_quantized_dir_works_through_generate_and_eval_cli(dirs, tmp_path):
    out = tmp_path / "q"
    quantize(dirs / "model", "--scheme", "int4", "--group-size", "64", "--out", out)
    rc, so, se = cli("generate", out, "--prompt", "The king", "--temperature", "0", "--max-new-tokens", "12",
                     "--ignore-eos", "--json")
    assert rc == 0, se
    want = Generator.from_checkpoint(out).generate("The king", max_new_tokens=12, sampling=GREEDY, ignore_eos=True)
    assert json.loads(so)["tokens"] == want[0].tokens and len(want[0].tokens) == 12
    rc, so, se = cli("eval", out, "--data", dirs / "data", "--batch-size", "4", "--max-batches", "2")
    assert rc == 0, se
    q_loss = json.loads(so)["loss"]
    rc, so, _ = cli("eval", dirs / "model", "--data", dirs / "data", "--batch-size", "4", "--max-batches", "2")
    assert abs(q_loss - json.loads(so)["loss"]) < 0.5


def test_gptq_from_the_cli_uses_the_calibration_data(dirs, tmp_path):
    out = tmp_path / "g"
    rep = quantize(dirs / "llama", "--scheme", "int4", "--group-size", "32", "--method", "gptq", "--calib",
                   dirs / "data", "--calib-samples", "8", "--seq-len", "32", "--out", out)
    assert rep["method"] == "gptq"
    meta = json.loads((out / "config.json").read_text())["quantization"]
    assert meta["calib"]["samples"] == 8 and meta["method"] == "gptq"
    # on the calibration text, GPTQ's logits are closer to the float model's than round-to-nearest's
    quantize(dirs / "llama", "--scheme", "int4", "--group-size", "32", "--out", tmp_path / "r")
    from scalelm.compress.calib import calibration_windows

    ids = calibration_windows(dirs / "data", 8, 32, seed=1)
    with torch.no_grad():
        ref = load_model_dir(dirs / "llama").eval()(ids)[0]
        err = {k: float((load_model_dir(tmp_path / k).eval()(ids)[0] - ref).norm()) for k in ("g", "r")}
    assert err["g"] < err["r"], err


# ----------------------------------------------------------------------------- refusals

def refused(result, *phrases):
    rc, _, err = result
    assert rc == 2, err
    assert "Traceback" not in err
    for p in phrases:
        assert p in err, err
    return err


def test_bad_input_is_refused_with_a_clear_message(dirs, tmp_path):
    m = dirs / "model"
    refused(cli("quantize", m, "--scheme", "int3", "--out", tmp_path / "x"), "invalid choice", "int3")
    refused(cli("quantize", m, "--scheme", "int4", "--group-size", "16", "--out", tmp_path / "x"), "32, 64, 128")
    refused(cli("quantize", m, "--scheme", "int8", "--group-size", "32", "--out", tmp_path / "x"), "int8")
    refused(cli("quantize", m, "--scheme", "int4", "--method", "gptq", "--out", tmp_path / "x"), "--calib DATA_DIR")
    refused(cli("quantize", m, "--scheme", "int4", "--calib", dirs / "data", "--out", tmp_path / "x"), "gptq")
    refused(cli("quantize", m, "--scheme", "int4", "--include-head", "--out", tmp_path / "x"), "tied")
    refused(cli("quantize", m, "--scheme", "int4", "--out", dirs / "llama"), "does not hold a quantized model")
    torch.manual_seed(0)
    save_model_dir(GPT(tiny_cfg(n_embd=96, n_head=2)), tmp_path / "w96")
    refused(cli("quantize", tmp_path / "w96", "--scheme", "int4", "--group-size", "64", "--out", tmp_path / "x"),
            "does not divide the input width 96", "--group-size 32")
    assert not (tmp_path / "x").exists()
    quantize(m, "--scheme", "int8", "--out", tmp_path / "q")
    refused(cli("quantize", tmp_path / "q", "--scheme", "int4", "--out", tmp_path / "x"), "already quantized")
    refused(cli("quantize", m, "--scheme", "int8", "--out", tmp_path / "q"), "--overwrite")
    quantize(m, "--scheme", "int8", "--out", tmp_path / "q", "--overwrite")
    refused(cli("export", tmp_path / "q", "--out", tmp_path / "x"), "quantized")


def test_damaged_quantized_dirs_are_refused(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    from scalelm.errors import CheckpointError

    quantize(dirs / "model", "--scheme", "int4", "--group-size", "32", "--out", tmp_path / "q")
    with pytest.raises(CheckpointError, match="float weights"):
        load_model_dir(tmp_path / "q", allow_quantized=False)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "q", bad)
    (bad / "manifest.json").unlink()
    sd = load_file(str(bad / "model.safetensors"))
    sd["blocks.0.attn.q_proj.zero"][0, 0] = 200
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="zero points above 15"):
        load_model_dir(bad)
    sd["blocks.0.attn.q_proj.zero"][0, 0] = 1
    sd["blocks.0.attn.q_proj.scale"] = sd["blocks.0.attn.q_proj.scale"].float()
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="float16"):
        load_model_dir(bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization"]["group_size"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="group_size"):
        load_model_dir(bad)
