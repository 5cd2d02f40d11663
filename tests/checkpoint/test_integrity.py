"""Integrity: manifest.json hashes, non-finite weights, config checked against the weights header,
and strictly valid JSON on stdout. Corruption is an `error:` with exit 2, never a traceback."""

import hashlib
import json
import resource
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import TINY, cli, make_char_data, one_thread  # noqa: F401 (fixture)

from scalelm.checkpoint.manifest import MANIFEST, sha256_file, verify_manifest
from scalelm.config import ModelConfig
from scalelm.errors import CheckpointError
from scalelm.model import GPT
from scalelm.model.io import load_model_dir, save_model_dir

TEXT = "the quick brown fox jumps over the lazy dog. " * 80
CFG = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)
GEN = ("--prompt-ids", "1,2", "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu")


def strict_json(s: str):
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(s, parse_constant=bad)


def tree_hash(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    data = make_char_data(root / "data", TEXT)
    torch.manual_seed(0)
    save_model_dir(GPT(ModelConfig(**CFG)), root / "m", (data / "tokenizer.json").read_text())
    return root


@pytest.fixture
def model(base, tmp_path):
    shutil.copytree(base / "m", tmp_path / "m")
    return tmp_path / "m"


def eval_(m, data, *extra):
    return cli("eval", m, "--data", data, "--dtype", "fp32", "--device", "cpu", "--max-batches", "2", *extra)


def test_manifest_covers_every_file(model):
    man = json.loads((model / MANIFEST).read_text())
    assert man["format"] == "scalelm-manifest" and man["version"] == 1
    assert sorted(man["files"]) == ["config.json", "model.safetensors", "tokenizer.json"]
    for name, entry in man["files"].items():
        assert entry == {"sha256": sha256_file(model / name), "bytes": (model / name).stat().st_size}
    verify_manifest(model)


def test_corrupt_weights_are_refused_and_nothing_changes(model, base, one_thread):
    data = base / "data"
    w = model / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-200:-136] = b"\xff" * 64  # in the tensor data: NaNs if it were read
    w.write_bytes(bytes(raw))
    before = tree_hash(model)
    for rc, so, se in (eval_(model, data), cli("generate", model, *GEN)):
        assert rc == 2 and so == ""
        assert "corrupt" in se and MANIFEST in se and "model.safetensors" in se and "--no-verify" in se
        assert "Traceback" not in se
    assert tree_hash(model) == before  # refused, not repaired or rewritten
    # --no-verify skips the hashes; the non-finite check still refuses, naming a tensor
    for rc, so, se in (eval_(model, data, "--no-verify"), cli("generate", model, *GEN, "--no-verify")):
        assert rc == 2 and "Traceback" not in se and "non-finite" in se and "tensor '" in se, se
    # a damaged header: the safetensors parse fails cleanly
    raw[8:72] = b"\xff" * 64
    w.write_bytes(bytes(raw))
    rc, _, se = cli("generate", model, *GEN, "--no-verify", "--temperature", "1")
    assert rc == 2 and "Traceback" not in se and "model.safetensors" in se


def test_a_directory_without_manifest_still_loads(model, base, one_thread):
    (model / MANIFEST).unlink()
    rc, so, se = eval_(model, base / "data")
    assert rc == 0, se
    assert set(strict_json(so)) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    rc, so, se = cli("generate", model, *GEN)
    assert rc == 0, se


def test_other_manifest_problems(model):
    (model / "tokenizer.json").unlink()  # optional: a model dir may go without (generate --tokenizer)
    load_model_dir(model)
    (model / "model.safetensors").rename(model / "w")  # listed, required, missing
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        verify_manifest(model)
    (model / "w").rename(model / "model.safetensors")
    (model / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is corrupt"):
        load_model_dir(model)
    assert load_model_dir(model, verify=False).cfg.n_layer == 1


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, base, one_thread):
    m = GPT(ModelConfig(**CFG))
    with torch.no_grad():
        m.blocks["0"].mlp.up.weight[3, 5] = float("nan")
        m.blocks["0"].attn.q_proj.bias[0] = float("inf")
    save_model_dir(m, tmp_path / "m", (base / "data" / "tokenizer.json").read_text())  # the manifest matches
    rc, so, se = eval_(tmp_path / "m", base / "data")
    assert rc == 2 and so == "" and "Traceback" not in se
    assert "non-finite" in se and ("blocks.0.mlp.up.weight" in se or "blocks.0.attn.q_proj.bias" in se)
    rc, _, se = cli("generate", tmp_path / "m", *GEN)
    assert rc == 2 and "non-finite" in se


def test_a_tampered_config_is_refused_before_anything_is_allocated(model, base, one_thread):
    p = model / "config.json"
    meta = json.loads(p.read_text())
    meta["model"].update(n_layer=48, n_embd=8192, block_size=1 << 20)
    p.write_text(json.dumps(meta))
    rc, _, se = eval_(model, base / "data")
    assert rc == 2 and "config.json" in se and "corrupt" in se  # the manifest sees it first
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for rc, _, se in (eval_(model, base / "data", "--no-verify"), cli("generate", model, *GEN, "--no-verify")):
        assert rc == 2 and "Traceback" not in se
        assert "does not match the weights" in se and "'tok_emb.weight' is (64, 16) in the weights" in se
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 512 * 1024  # KiB: nothing near 32 GB
    meta["model"].update(n_layer=1, n_embd=16, block_size=1 << 21)
    p.write_text(json.dumps(meta))
    rc, _, se = cli("generate", model, *GEN, "--no-verify")
    assert rc == 2 and "block_size=2097152" in se and "beyond" in se


def test_eval_prints_strict_json_even_for_a_nan_loss(tmp_path, base, one_thread):
    rc, so, _ = eval_(base / "m", base / "data")
    assert rc == 0 and strict_json(so)["loss"] > 0
    m = GPT(ModelConfig(**CFG, tie_embeddings=False))
    with torch.no_grad():  # finite weights whose logits overflow: the loss is NaN
        m.lm_head.weight.copy_(torch.sign(torch.randn_like(m.lm_head.weight)) * 3e38)
    save_model_dir(m, tmp_path / "m", (base / "data" / "tokenizer.json").read_text())
    rc, so, se = eval_(tmp_path / "m", base / "data")
    assert rc == 0, se
    res = strict_json(so)  # NaN would raise here
    assert res["loss"] is None and res["tokens"] > 0


def test_training_checkpoints_carry_a_manifest_and_corruption_stops_resume(tmp_path, one_thread):
    data = make_char_data(tmp_path / "data", TEXT * 2)
    run = tmp_path / "run"
    args = ("--data", data, "--out", run, *TINY, "--train.save_every=2", "--train.precision=fp32")
    rc, so, se = cli("train", *args, "--train.max_steps=2")
    assert rc == 0, se
    strict_json(so)
    ck = run / "ckpt-00000002"
    files = json.loads((ck / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors", "rng.safetensors",
            "state.json"} <= set(files)
    assert all(files[f]["sha256"] == sha256_file(ck / f) for f in files)
    verify_manifest(run / "best")  # best/ goes through save_model_dir too
    assert "model.safetensors" in json.loads((run / "best" / MANIFEST).read_text())["files"]
    rc, so, se = cli("train", *args, "--train.max_steps=4")  # resume still works
    assert rc == 0 and "resumed from" in se and strict_json(so)["step"] == 4, se
    ck = run / "ckpt-00000004"
    opt = ck / "optimizer.safetensors"
    raw = bytearray(opt.read_bytes())
    raw[-100:-36] = b"\xff" * 64
    opt.write_bytes(bytes(raw))
    before = tree_hash(ck)
    rc, so, se = cli("train", "--out", run, "--train.max_steps=6")
    assert rc == 2 and "Traceback" not in se, se
    assert "corrupt" in se and "optimizer.safetensors" in se and "earlier checkpoint" in se
    assert tree_hash(ck) == before


def test_sharded_checkpoints_carry_a_manifest(tmp_path, one_thread):
    from scalelm.distributed.mesh import ParallelContext
    from scalelm.train.sharded_state import load_sharded_checkpoint, save_sharded_checkpoint

    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    ck = save_sharded_checkpoint(tmp_path / "run", 1, model, opt, None, {"step": 1}, ParallelContext())
    files = json.loads((ck / MANIFEST).read_text())["files"]
    assert {"config.json", "state.json", "dcp/.metadata", "rng/rank-00000.safetensors"} <= set(files)
    assert any(f.endswith(".distcp") for f in files)
    other = GPT(ModelConfig(**CFG))
    load_sharded_checkpoint(ck, other, torch.optim.AdamW(other.parameters(), lr=1e-3), ParallelContext())
    assert torch.equal(other.tok_emb.weight, model.tok_emb.weight)
    assert torch.equal(load_model_dir(ck).tok_emb.weight, model.tok_emb.weight)  # consolidated, verified
    shard = next(p for p in (ck / "dcp").iterdir() if p.suffix == ".distcp")
    raw = bytearray(shard.read_bytes())
    raw[100:164] = b"\xff" * 64
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is corrupt: dcp/.*distcp does not match"):
        load_sharded_checkpoint(ck, other, None, ParallelContext())
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_model_dir(ck)
    meta = json.loads((ck / "config.json").read_text())
    meta["model"].update(n_layer=48, n_embd=8192)
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the weights"):
        load_model_dir(ck, verify=False)  # before to_empty allocates the config's 38B parameters
