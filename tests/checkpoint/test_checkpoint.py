"""scalelm.checkpoint: staged_dir's atomicity, each reader/writer round-trip, the manifest, the names."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalelm.checkpoint import names, staged_dir
from scalelm.checkpoint.adapters import fold_lora, lora_entry, merge_adapters, read_adapters, save_adapter_dir
from scalelm.checkpoint.dcp import (
    is_sharded_checkpoint,
    model_entries,
    read_model_shards,
    read_rank_rng,
    read_shards,
    sharded_meta,
    write_rank_rng,
    write_shards,
    write_sharded_files,
)
from scalelm.checkpoint.head import read_head, write_classifier_files
from scalelm.checkpoint.manifest import read_manifest, verify_manifest
from scalelm.checkpoint.model_dir import read_config, read_tensors, read_tokenizer_json, save_model_files
from scalelm.checkpoint.quantized import quant_meta, read_quantization, save_quantized_dir
from scalelm.checkpoint.rundir import clean_staging, latest_checkpoint, list_checkpoints
from scalelm.checkpoint.training import (
    checkpoint_stage,
    is_training_checkpoint,
    read_optimizer,
    read_rng,
    read_state,
    write_training_files,
)
from scalelm.errors import CheckpointError

MODEL = {"vocab_size": 8, "n_embd": 4, "tie_embeddings": True}  # the config entry, as JSON
TOK = '{"tokenizer": "not parsed here"}'


def sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(8, 4, generator=g)
    return {"tok_emb.weight": emb, "lm_head.weight": emb, "blocks.0.attn.q_proj.weight": torch.randn(4, 4, generator=g)}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- staged_dir

def test_staged_dir_publishes_all_at_once_with_the_manifest_last(tmp_path):
    out = tmp_path / "model"
    with staged_dir(out) as d:
        (d / "a.txt").write_text("a")
        (d / "sub").mkdir()
        (d / "sub" / "b.bin").write_bytes(b"\x00\x01")
        assert not out.exists() and d.parent == tmp_path and d.name.startswith(".")  # hidden until the end
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["a.txt", names.MANIFEST, "sub/b.bin"]
    assert set(read_manifest(out)) == {"a.txt", "sub/b.bin"}
    verify_manifest(out)
    assert hidden(tmp_path) == []


def test_an_exception_inside_leaves_the_old_directory_and_no_stage(tmp_path):
    out = tmp_path / "model"
    with staged_dir(out) as d:
        (d / "a.txt").write_text("old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="killed"):
        with staged_dir(out) as d:
            (d / "a.txt").write_text("new, half written")
            (d / "b.txt").write_text("more")
            raise RuntimeError("killed")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert hidden(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):  # BaseException too (Ctrl-C)
        with staged_dir(tmp_path / "new") as d:
            (d / "x").write_text("x")
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists() and hidden(tmp_path) == []


def test_staged_dir_replaces_an_earlier_directory_whole(tmp_path):
    out = tmp_path / "model"
    with staged_dir(out, manifest=False) as d:
        (d / "old-only.txt").write_text("1")
    with staged_dir(out, manifest=False) as d:
        (d / "new.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # no manifest asked, none written
    assert hidden(tmp_path) == []


def test_a_fixed_stage_is_emptied_or_adopted(tmp_path):
    stage = tmp_path / ".staging-x"
    stage.mkdir()
    (stage / "left by a kill").write_text("?")
    with staged_dir(tmp_path / "x", stage=stage) as d:
        assert d == stage and list(d.iterdir()) == []
    stage.mkdir()
    (stage / "written by rank 1").write_text("shard")
    with staged_dir(tmp_path / "y", stage=stage, adopt=True, manifest=False):
        pass
    assert (tmp_path / "y" / "written by rank 1").is_file() and not stage.exists()


# ----------------------------------------------------------------------------- readers and writers

def test_model_dir_round_trip(tmp_path):
    out = save_model_files(tmp_path / "m", MODEL, sd(), TOK, extra={"step": 3}, files={"chat_template.jinja": "{{x}}"})
    meta = read_config(out)
    assert meta == {"format": "scalelm", "model": MODEL, "step": 3}
    got = read_tensors(out / names.WEIGHTS)
    assert set(got) == {"tok_emb.weight", "blocks.0.attn.q_proj.weight"}  # a tied head is stored once
    assert all(torch.equal(got[k], sd()[k]) for k in got)
    assert read_tokenizer_json(out) == TOK and (out / "chat_template.jinja").read_text() == "{{x}}"
    assert set(read_manifest(out)) == {names.WEIGHTS, names.CONFIG, names.TOKENIZER, "chat_template.jinja"}
    nan = sd()
    nan["tok_emb.weight"][0, 0] = float("nan")
    save_model_files(tmp_path / "nan", MODEL, nan)
    with pytest.raises(CheckpointError, match="non-finite"):
        read_tensors(tmp_path / "nan" / names.WEIGHTS)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / names.CONFIG).write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="Hugging Face"):
        read_config(tmp_path / "hf")


def test_classifier_dir_round_trip(tmp_path):
    head = {"weight": torch.randn(3, 4)}
    with staged_dir(tmp_path / "cls") as d:
        write_classifier_files(d, MODEL, sd(), head, TOK, {"task": {"name": "classify", "labels": ["a", "b", "c"]}})
    assert torch.equal(read_head(tmp_path / "cls")["weight"], head["weight"])
    assert read_config(tmp_path / "cls")["task"]["labels"] == ["a", "b", "c"]
    with pytest.raises(CheckpointError, match=names.HEAD):
        read_head(tmp_path)


def test_lora_dir_round_trip_and_one_merge(tmp_path):
    a, b = torch.randn(2, 4), torch.randn(4, 2)
    tensors = {"gpt.blocks.0.attn.q_proj.lora_A": a, "gpt.blocks.0.attn.q_proj.lora_B": b, "head.weight": torch.ones(3, 4)}
    entry = {"r": 2, "alpha": 6.0, "prefix": "gpt.", "base": "/nowhere", "base_sha256": "0" * 64}
    save_adapter_dir(MODEL, tensors, tmp_path / "lora", TOK, {"lora": entry})
    assert lora_entry(tmp_path / "lora") == entry
    got_entry, got = read_adapters(tmp_path / "lora")
    assert got_entry == entry and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert torch.equal(read_head(tmp_path / "lora")["weight"], torch.ones(3, 4))  # a LoRA classifier's head
    weights = sd()
    want = weights["blocks.0.attn.q_proj.weight"] + (b @ a) * 3.0
    assert merge_adapters(weights, got, entry, "test") == ["blocks.0.attn.q_proj"]
    assert torch.allclose(weights["blocks.0.attn.q_proj.weight"], want)
    w = torch.zeros(4, 4, dtype=torch.bfloat16)
    fold_lora(w, a, b, 3.0)  # accumulated in fp32, rounded once
    assert torch.equal(w, ((b @ a) * 3.0).to(torch.bfloat16))
    with pytest.raises(CheckpointError, match="not a linear layer"):
        merge_adapters(sd(), {"gpt.nope.lora_A": a, "gpt.nope.lora_B": b}, entry, "test")


def test_quantized_dir_round_trip(tmp_path):
    src = save_model_files(tmp_path / "float", MODEL, sd(), TOK, files={names.TOKENIZER_CONFIG: "{}"})
    q = quant_meta("int4", 32, "rtn", ["blocks.0.attn.q_proj"])
    weights = {"tok_emb.weight": sd()["tok_emb.weight"], "blocks.0.attn.q_proj.qweight": torch.zeros(4, 2, dtype=torch.uint8)}
    out = save_quantized_dir(tmp_path / "q", MODEL, weights, TOK, {"quantization": q}, src=src)
    assert read_quantization(out) == q and read_quantization(src) is None
    assert (out / names.TOKENIZER_CONFIG).read_text() == "{}"  # the source's tokenizer files come along
    assert read_tensors(out / names.WEIGHTS)["blocks.0.attn.q_proj.qweight"].dtype == torch.uint8
    meta = read_config(out)
    meta["quantization"]["scheme"] = "int3"
    (out / names.CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="damaged"):
        read_quantization(out)


def test_training_checkpoint_round_trip_latest_and_pruning(tmp_path):
    run = tmp_path / "run"
    opt = {"tok_emb.weight/exp_avg": torch.randn(8, 4)}
    rng = {"torch_cpu": torch.get_rng_state()}
    for step in (1, 2, 3):
        with checkpoint_stage(run, step, keep_last=2) as d:
            save_model_files(d, MODEL, sd(), TOK, {"step": step}, manifest=False)
            write_training_files(d, opt, rng, {"step": step, "loader": {"step": step, "micro": 0}})
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000002", "ckpt-00000003"]
    ck = latest_checkpoint(run)
    assert ck.name == names.ckpt_name(3) and (run / names.LATEST).read_text() == "ckpt-00000003\n"
    assert is_training_checkpoint(ck) and read_state(ck)["step"] == 3
    assert torch.equal(read_optimizer(ck)["tok_emb.weight/exp_avg"], opt["tok_emb.weight/exp_avg"])
    assert torch.equal(read_rng(ck)["torch_cpu"], rng["torch_cpu"])
    verify_manifest(ck)  # it covers the model files and the optimizer, RNG and state files
    with pytest.raises(RuntimeError):
        with checkpoint_stage(run, 4) as d:
            (d / names.STATE).write_text("{}")
            raise RuntimeError("killed while saving")
    assert latest_checkpoint(run) == ck and not (run / names.ckpt_name(4)).exists()
    (run / ".staging-ckpt-00000005").mkdir()  # what a SIGKILL leaves
    (run / ".best.x1y2").mkdir()
    clean_staging(run)
    assert hidden(run) == []


def test_sharded_checkpoint_round_trip_and_consolidation(tmp_path):
    state = {"model": {"tok_emb.weight": torch.randn(8, 4), "blocks.0.w": torch.randn(4, 4)}}
    with staged_dir(tmp_path / "ck") as d:
        write_shards(state, d, distributed=False)
        write_rank_rng(d / names.RNG_DIR, 0, {"torch_cpu": torch.get_rng_state()}, {"python": [1]})
        write_sharded_files(d, sharded_meta(MODEL, {"lora": None}, 4, 1, "1 process"), TOK, {"step": 4})
    ck = tmp_path / "ck"
    assert is_sharded_checkpoint(ck) and read_state(ck) == {"step": 4}
    meta = read_config(ck)
    assert meta["sharded"] is True and meta["step"] == 4 and list(meta)[:2] == ["format", "model"]
    assert model_entries(ck) == {k: (tuple(v.shape), v.dtype) for k, v in state["model"].items()}
    full = {k: torch.empty_like(v) for k, v in state["model"].items()}
    read_model_shards(ck, full)  # in this process, no process group
    assert all(torch.equal(full[k], state["model"][k]) for k in full)
    again = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
    read_shards(again, ck, distributed=False)
    assert torch.equal(again["model"]["blocks.0.w"], state["model"]["blocks.0.w"])
    tensors, js = read_rank_rng(ck / names.RNG_DIR, 0)
    assert js == {"python": [1]} and read_rank_rng(ck / names.RNG_DIR, 1) is None  # saved by fewer ranks
    with pytest.raises(CheckpointError, match="could not read the weights"):
        read_model_shards(ck, {"missing.weight": torch.empty(2)})


# ----------------------------------------------------------------------------- the manifest

@pytest.mark.parametrize("name", [names.WEIGHTS, names.CONFIG])
def test_a_flipped_byte_is_caught_by_the_manifest(tmp_path, name):
    out = save_model_files(tmp_path / "m", MODEL, sd(), TOK)
    raw = bytearray((out / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (out / name).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{re.escape(name)} does not match its sha256"):
        verify_manifest(out)
    verify_manifest(out, only=[names.TOKENIZER])  # the other files are still fine


# ----------------------------------------------------------------------------- one package owns the names

SRC = Path(__file__).resolve().parents[2] / "scalelm"
# a quoted file name another format happens to share, and why it is not ours
NOT_OURS = {("data/sources.py", names.STATE): "a Hugging Face datasets save_to_disk directory's state.json"}


def test_file_names_are_spelled_only_in_the_names_module():
    files = sorted({v for k, v in vars(names).items() if k.isupper() and isinstance(v, str) and "." in v})
    assert names.WEIGHTS in files and names.LOCK in files and len(files) > 15
    found = {}
    for py in SRC.rglob("*.py"):
        rel = py.relative_to(SRC).as_posix()
        if rel == "checkpoint/names.py":
            continue
        text = py.read_text()
        for f in files:
            if (f'"{f}"' in text or f"'{f}'" in text) and (rel, f) not in NOT_OURS:
                found.setdefault(f, []).append(rel)
    assert found == {}, f"spell these with scalelm.checkpoint.names: {found}"


def test_the_package_imports_no_torch():
    code = "import sys, scalelm.checkpoint, scalelm.runs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
