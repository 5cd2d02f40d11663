"""`convert --from-hf ORG/NAME[@REV]`: Hub ids through the Hugging Face cache, shard-by-shard reading.

Nothing can be downloaded here, so each test lays out a Hugging Face cache by hand
(``models--org--name/snapshots/<commit>/`` + ``refs/<branch>``) and runs with HF_HUB_OFFLINE=1.
"""

import json
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from conftest import run_cli  # noqa: E402
from test_hf import IDX, hf_logits, our_logits, random_hf  # noqa: E402

from scalelm import cli  # noqa: E402
from scalelm.model import hf_weights as hf_mod  # noqa: E402  (where the shards are read)
from scalelm.model.hf import ConversionError, from_hf, import_hf_dir  # noqa: E402
from scalelm.model.io import load_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def put_snapshot(cache, repo, commit, model, refs=("main",), **save):
    """``model.save_pretrained`` into the cache as the Hub would have it: a snapshot folder named by
    its commit and refs naming that commit. A ``pytorch_model.bin`` that would fail to load lies beside
    the safetensors: reading it at all is a bug."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    model.save_pretrained(snap, safe_serialization=True, **save)
    (snap / "pytorch_model.bin").write_bytes(b"not a pickle: never to be read")
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path/hub; huggingface_hub read its env vars at import,
    so its constant is set too."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called: a .bin was read"))
    return cache


def convert(capsys, *args):
    capsys.readouterr()
    rc = cli.main(["convert", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_hub_id_converts_like_the_local_folder(tmp_path):
    """The real command in a subprocess, so HF_HUB_CACHE/HF_HUB_OFFLINE are read from the environment."""
    hf = random_hf("gpt2")
    snap = put_snapshot(tmp_path / "hub", "org/tiny-gpt2", COMMIT_A, hf)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    p = run_cli("convert", "--from-hf", "org/tiny-gpt2", "--out", tmp_path / "from-id", env=env)
    assert json.loads(p.stdout)["out"] == str(tmp_path / "from-id")
    ours = load_model_dir(tmp_path / "from-id")
    assert (our_logits(ours, IDX) - hf_logits(hf, IDX)).abs().max().item() <= 1e-4
    (snap / "pytorch_model.bin").unlink()  # a plain local folder (which would take a .bin) must agree
    same_weights(ours, load_model_dir(import_hf_dir(snap, tmp_path / "from-dir")))
    meta = json.loads((tmp_path / "from-id" / "config.json").read_text())
    assert meta["source"] == f"hf:org/tiny-gpt2@{COMMIT_A}"


def test_revision_picks_the_snapshot(hub_cache, tmp_path, capsys):
    a, b = random_hf("gpt2"), random_hf("gpt2-odd")
    put_snapshot(hub_cache, "org/m", COMMIT_A, a)
    put_snapshot(hub_cache, "org/m", COMMIT_B, b, refs=("v2",))
    cases = {"org/m": a, "hf:org/m@main": a, f"org/m@{COMMIT_B}": b, "org/m@v2": b}
    for i, (spec, want) in enumerate(cases.items()):
        rc, out, err = convert(capsys, "--from-hf", spec, "--out", tmp_path / f"out{i}")
        assert rc == 0, err
        got = load_model_dir(tmp_path / f"out{i}")
        assert (our_logits(got, IDX) - hf_logits(want, IDX)).abs().max().item() <= 1e-4, spec


def test_missing_id_offline_is_one_line(hub_cache, tmp_path, capsys):
    put_snapshot(hub_cache, "org/m", COMMIT_A, random_hf("gpt2"))
    for spec in ("org/absent", "org/m@v9", f"org/m@{COMMIT_B}"):
        rc, out, err = convert(capsys, "--from-hf", spec, "--out", tmp_path / "out")
        assert rc == 2 and out == "", err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "not in the local Hugging Face cache" in err and spec in err and "HF_HUB_OFFLINE" in err
        assert "nor is there a local folder" in err
    assert not (tmp_path / "out").exists()
    # a local folder that happens to look like ORG/NAME is a folder, as before
    random_hf("gpt2").save_pretrained(tmp_path / "org" / "absent")
    rc, _, err = convert(capsys, "--from-hf", tmp_path / "org" / "absent", "--out", tmp_path / "out")
    assert rc == 0, err


def test_missing_id_offline_cli_exit_2(tmp_path):
    p = run_cli("convert", "--from-hf", "org/absent", "--out", tmp_path / "out", check=False,
                env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "hf:org/absent is not in the local" in p.stderr


def test_unreachable_hub_fails_fast_without_offline(tmp_path):
    """No network (here: a closed local port as the endpoint): the probe's one line, not a retry loop."""
    p = run_cli("convert", "--from-hf", "org/absent", "--out", tmp_path / "out", check=False, timeout=120,
                env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9",
                     "HF_HUB_OFFLINE": "0", "SCALELM_HUB_TIMEOUT": "5"})
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "cannot reach the Hugging Face Hub" in p.stderr


@pytest.mark.parametrize("name", ["gpt2", "llama-untied-bias"])
def test_sharded_converts_identically_one_shard_at_a_time(hub_cache, tmp_path, capsys, monkeypatch, name):
    hf = random_hf(name)
    put_snapshot(hub_cache, "org/whole", COMMIT_A, hf)
    snap = put_snapshot(hub_cache, "org/sharded", COMMIT_A, hf, max_shard_size="40KB")
    shards = sorted(snap.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (snap / "model.safetensors.index.json").is_file()

    read, alive = [], []
    real_read = hf_mod._read_weights_file

    def tracked(path):  # when a shard is read, no tensor of the shard before it may still be alive
        assert all(r() is None for r in alive), f"{path.name} read while the previous shard is still held"
        alive.clear()
        part = real_read(path)
        alive.extend(weakref.ref(t) for t in part.values())
        read.append(path.name)
        return part

    monkeypatch.setattr(hf_mod, "_read_weights_file", tracked)
    for repo in ("org/whole", "org/sharded"):
        rc, _, err = convert(capsys, "--from-hf", repo, "--out", tmp_path / repo.split("/")[1])
        assert rc == 0, err
    assert read == ["model.safetensors"] + [s.name for s in shards]
    whole, sharded = load_model_dir(tmp_path / "whole"), load_model_dir(tmp_path / "sharded")
    same_weights(whole, sharded)
    assert (our_logits(sharded, IDX) - hf_logits(hf, IDX)).abs().max().item() <= 1e-4


def test_sharded_checkpoint_errors_name_the_problem(tmp_path):
    hf = random_hf("gpt2")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    first = sorted((tmp_path / "hf").glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(ConversionError, match="incomplete"):
        from_hf(tmp_path / "hf")
    first.write_bytes(b"garbage")
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        from_hf(tmp_path / "hf")


def test_hub_snapshot_with_only_a_bin_is_refused(hub_cache, tmp_path, capsys):
    snap = put_snapshot(hub_cache, "org/old", COMMIT_A, random_hf("gpt2"))
    (snap / "model.safetensors").unlink()
    rc, _, err = convert(capsys, "--from-hf", "org/old", "--out", tmp_path / "out")
    assert rc == 2 and "safetensors only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
