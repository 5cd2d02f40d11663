"""`finetune ... --base hf:ORG/NAME[@REV]`: a Hub model through the Hugging Face cache, converted once
into a folder named by its commit, then fine-tuned like any model directory.

Nothing can be downloaded here: the cache is laid out by hand as in tests/model/test_hf_hub.py and
the runs are offline (HF_HUB_OFFLINE=1)."""

import json
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from test_hf_hub import COMMIT_A, COMMIT_B, hub_cache, put_snapshot  # noqa: E402,F401
from train_helpers import cli  # noqa: E402

from scalelm.model.io import load_model_dir  # noqa: E402
from scalelm.tasks.base import hub_cache_root  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TINY = ["--train.max_steps=2", "--train.micro_batch_size=2", "--train.eval_every=2", "--train.save_every=2",
        "--log.progress=false", "--train.precision=fp32", "--max-length", "32"]


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=0))


def snapshot(cache, commit, tokenizer_json, refs=("main",)):
    snap = put_snapshot(cache, "org/tiny-llama", commit, tiny_llama(), refs=refs)
    (snap / "tokenizer.json").write_text(tokenizer_json)
    (snap / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    return snap


def test_base_from_a_hub_id_converts_once_per_commit(hub_cache, tiny_tokenizer_json, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELM_CACHE", str(tmp_path / "scalelm-cache"))
    snapshot(hub_cache, COMMIT_A, tiny_tokenizer_json)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f" {i} {i}"}) + "\n" for i in range(8)))
    args = ["finetune", "sft", "--base", "hf:org/tiny-llama", "--data", data, "--val-fraction", "0.25",
            "--template", "plain", "--lora.r=4", *TINY]
    rc, so, err = cli(*args, "--out", tmp_path / "r1")
    assert rc == 0, err
    converted = hub_cache_root() / "hub" / "org--tiny-llama" / COMMIT_A
    assert "converting hf:org/tiny-llama@" + COMMIT_A in err
    assert json.loads((converted / "config.json").read_text())["source"] == f"hf:org/tiny-llama@{COMMIT_A}"
    load_model_dir(converted)  # a plain scalelm model directory
    assert json.loads(so)["step"] == 2

    rc, _, err = cli(*args, "--out", tmp_path / "r2")  # the same commit: no second conversion
    assert rc == 0, err
    assert "converting" not in err

    task = json.loads((tmp_path / "r1" / "task.json").read_text())
    assert task["base"] == f"hf:org/tiny-llama@{COMMIT_A}"  # pinned: a resumed run keeps its base

    snapshot(hub_cache, COMMIT_B, tiny_tokenizer_json)  # main moved: a resumed run stays on its commit ...
    rc, so, err = cli(*[a if a != "--train.max_steps=2" else "--train.max_steps=3" for a in args], "--out", tmp_path / "r1")
    assert rc == 0 and "converting" not in err, err
    assert json.loads(so)["step"] == 3
    # ... and a new one converts the new commit
    rc, _, err = cli(*args, "--out", tmp_path / "r3")
    assert rc == 0, err
    assert "converting hf:org/tiny-llama@" + COMMIT_B in err
    rc, _, err = cli(*[a if a != "hf:org/tiny-llama" else f"hf:org/tiny-llama@{COMMIT_A}" for a in args],
                     "--out", tmp_path / "r4")  # a pinned commit: the first conversion again
    assert rc == 0 and "converting" not in err, err


def test_a_hub_base_missing_from_the_offline_cache_is_one_clear_line(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELM_CACHE", str(tmp_path / "c"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    rc, _, err = cli("finetune", "sft", "--base", "hf:org/absent", "--data", data, "--out", tmp_path / "r", *TINY)
    assert rc == 2
    assert "hf:org/absent is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err
    assert "Traceback" not in err
