"""ONNX export (`scalelm export --format onnx`) and `generate --backend onnxruntime`: onnxruntime's
logits equal PyTorch's (prefill and 16 decode steps, 1e-4) and so do the generated tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import char_tokenizer, cli

from scalelm.config import ModelConfig
from scalelm.generate.generator import Generator
from scalelm.generate.onnx_backend import OrtCache, load_onnx_model
from scalelm.generate.sampling import SamplingParams
from scalelm.model import GPT
from scalelm.model.io import load_model_dir, save_model_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")
GREEDY = SamplingParams(temperature=0.0)
SLOW = pytest.mark.slow  # torch.onnx.export of even a tiny model takes 10-25 s (the `gpt2` fixture's export)


def export(src, out):
    rc, so, se = cli("export", src, "--format", "onnx", "--out", out)
    assert rc == 0, se
    return json.loads(so)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT-2 style model (learned positions, tied head) with a tokenizer, and its ONNX export."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    tok = char_tokenizer("First Citizen: To be, or not to be, that is the question.\n").to_str()
    save_model_dir(GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64, init_std=0.2)),
                   root / "model", tokenizer_json=tok)
    rep = export(root / "model", root / "onnx")
    assert rep["max_abs_logit_diff_vs_torch"] < 1e-4
    return root


def check_parity(model_dir, onnx_dir, steps: int = 16):
    """Prefill of two left-padded rows (all positions' logits), then ``steps`` decode steps."""
    model = load_model_dir(model_dir).eval()
    ort = load_onnx_model(onnx_dir)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    start = torch.tensor([0, 3])  # row 1 is left-padded by 3
    from scalelm.model.kv_cache import PreallocatedKVCache

    cache = PreallocatedKVCache(cfg, 2, max_len=9 + steps)
    cache.reset(start)
    ocache = OrtCache(cfg, 2, 9 + steps)
    ocache.reset(start)
    worst = 0.0
    with torch.no_grad():
        ref = model(prompt, kv_cache=cache)[0]
        got = ort(prompt, kv_cache=ocache)[0]
        real = torch.arange(9)[None, :] >= start[:, None]  # padding positions' logits are not used
        worst = float((got - ref).abs()[real].max())
        for _ in range(steps):
            tok = ref[:, -1].argmax(-1, keepdim=True)
            ref = model(tok, kv_cache=cache, last_only=True)[0]
            got = ort(tok, kv_cache=ocache, last_only=True)[0]
            worst = max(worst, float((got - ref).abs().max()))
    assert ocache.pos == cache.pos == 9 + steps
    assert np.allclose(ocache.k[:, 0], cache.k[:, 0].numpy(), atol=1e-5)
    return worst


@SLOW
def test_onnxruntime_logits_match_pytorch_for_prefill_and_16_decode_steps(gpt2):
    assert check_parity(gpt2 / "model", gpt2 / "onnx") < 1e-4
    files = json.loads((gpt2 / "onnx" / "manifest.json").read_text())["files"]
    assert {"model.onnx", "config.json", "tokenizer.json"} <= set(files)


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 4])  # 4: layer 0 within a sliding window shorter than the 25 tokens, layer 1 full
def test_llama_style_gqa_rope_export_matches_too(tmp_path, window):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, pos_embedding="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, init_std=0.2,
                      sliding_window=window, sliding_window_pattern=2)
    save_model_dir(GPT(cfg), tmp_path / "model")
    export(tmp_path / "model", tmp_path / "onnx")
    assert check_parity(tmp_path / "model", tmp_path / "onnx") < 1e-4


@SLOW
def test_generate_backend_onnxruntime_equals_pytorch_token_for_token(gpt2):
    args = ["--prompt", "First Citizen", "--prompt", "To", "--temperature", "0", "--max-new-tokens", "40",
            "--ignore-eos", "--json"]  # 40 > block_size 32: the window slides (a prefill from scratch) too
    rc, torch_out, se = cli("generate", gpt2 / "model", *args)
    assert rc == 0, se
    rc, ort_out, se = cli("generate", gpt2 / "onnx", "--backend", "onnxruntime", *args)
    assert rc == 0, se
    rows_t, rows_o = ([json.loads(x) for x in out.splitlines()] for out in (torch_out, ort_out))
    assert [r["tokens"] for r in rows_o] == [r["tokens"] for r in rows_t]
    assert [r["text"] for r in rows_o] == [r["text"] for r in rows_t] and len(rows_o[0]["tokens"]) == 40
    # sampled, same seed: the same draws from (almost exactly) the same distributions
    sampling = SamplingParams(temperature=0.9, top_k=50)
    a = Generator.from_checkpoint(gpt2 / "model").generate("To be", 20, sampling=sampling, seed=3, ignore_eos=True)
    b = Generator.from_checkpoint(gpt2 / "onnx", backend="onnxruntime").generate("To be", 20, sampling=sampling, seed=3,
                                                                             ignore_eos=True)
    assert a[0].tokens == b[0].tokens


@SLOW
def test_beam_search_on_onnxruntime_equals_pytorch(gpt2):
    """OrtCache reorders its rows as beam search asks (index_rows), as the GPT's cache does."""
    prompts = ["First Citizen", "To"]
    a = Generator.from_checkpoint(gpt2 / "model").beam_search(prompts, num_beams=3, max_new_tokens=10)
    b = Generator.from_checkpoint(gpt2 / "onnx", backend="onnxruntime").beam_search(prompts, num_beams=3,
                                                                                    max_new_tokens=10)
    assert [c.tokens for c in b] == [c.tokens for c in a] and all(c.tokens for c in a)


def refused(result, phrase):
    rc, _, err = result
    assert rc == 2 and "Traceback" not in err and phrase in err, err


def test_onnx_bad_input_is_refused_before_exporting(tmp_path):
    torch.manual_seed(0)
    save_model_dir(GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)), tmp_path / "m")
    refused(cli("generate", tmp_path / "m", "--backend", "onnxruntime", "--prompt-ids", "1"), "--format onnx")
    refused(cli("export", tmp_path / "m", "--format", "onnx", "--dtype", "bf16", "--out", tmp_path / "x"), "float32")
    refused(cli("export", tmp_path / "m", "--format", "onnx", "--out", tmp_path / "m"), "source itself")
    refused(cli("export", tmp_path / "m", "--format", "onnx", "--out", tmp_path), "folder above the source")
    rc, _, err = cli("quantize", tmp_path / "m", "--scheme", "int8", "--out", tmp_path / "q")
    assert rc == 0, err
    refused(cli("export", tmp_path / "q", "--format", "onnx", "--out", tmp_path / "x"), "quantized")
    assert not (tmp_path / "x").exists()


@SLOW
def test_onnx_dir_refusals(gpt2, tmp_path):
    refused(cli("generate", gpt2 / "onnx", "--backend", "onnxruntime", "--prompt-ids", "1", "--compile"),
            "not available with --backend onnxruntime")
    refused(cli("export", gpt2 / "model", "--format", "onnx", "--out", gpt2 / "onnx"), "--overwrite")
    refused(cli("export", gpt2 / "model", "--format", "onnx", "--out", gpt2 / "model" / ".."), "folder above")
