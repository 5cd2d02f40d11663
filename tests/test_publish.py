"""``scalelm push``: the Hub upload (huggingface_hub's HfApi intercepted: never a real endpoint), its
model card, ``--dry-run``, refused kinds and a failing network.

One tiny run is trained once (4 steps, two evaluations); the upload's files are copied out of the
stubbed ``upload_folder`` and loaded with ``transformers``, whose logits must match scalelm's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_helpers import TINY, cli, make_char_data, read_metrics

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXT = "the king sees a dog. the cat runs to the house. a queen loves the film.\n" * 120


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny run (run/), a quantized model made from it (quant/) and a classifier (clf/)."""
    import torch

    from scalelm.config import ModelConfig
    from scalelm.model.gpt import GPT
    from scalelm.tasks.classify.files import ClassifierFiles
    from scalelm.tasks.classify.model import Classifier

    d = tmp_path_factory.mktemp("publish")
    data = make_char_data(d / "tinydata", TEXT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELM_PEAK_TFLOPS", "1")  # no CPU peak measurement for MFU
        rc, _, err = cli("train", "--data", data, "--out", d / "run", *TINY, "--train.max_steps=4",
                         "--train.eval_every=2")
    assert rc == 0, err[-3000:]
    rc, _, err = cli("quantize", d / "run", "--scheme", "int8", "--out", d / "quant")
    assert rc == 0, err[-3000:]
    torch.manual_seed(0)
    tok = (data / "tokenizer.json").read_text()
    clf = Classifier(GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)), 2)
    task = {"labels": ["neg", "pos"], "append_eos": True, "eos_id": 0, "pad_id": 1, "max_length": 32}
    ClassifierFiles(task).save(clf, clf.state_dict(), d / "clf", tok, {"step": 1})
    return d


class Hub:
    """Records HfApi's calls; ``upload_folder`` copies the folder it is given (it is deleted after)."""

    def __init__(self, monkeypatch, tmp_path: Path, fail: Exception | None = None):
        from huggingface_hub import HfApi

        self.calls: list[tuple[str, dict]] = []
        self.uploaded = tmp_path / "uploaded"
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.calls.append(("create_repo", dict(kw, repo_id=repo_id, token=api.token)))
            if fail is not None:
                raise fail
            from huggingface_hub import RepoUrl

            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, **kw):
            hub.calls.append(("create_branch", dict(kw, repo_id=repo_id)))

        def upload_folder(api, **kw):
            hub.calls.append(("upload_folder", dict(kw)))
            shutil.copytree(kw["folder_path"], hub.uploaded)

        for name, fn in (("create_repo", create_repo), ("create_branch", create_branch),
                         ("upload_folder", upload_folder)):
            monkeypatch.setattr(HfApi, name, fn)

    def call(self, name: str) -> dict:
        found = [kw for n, kw in self.calls if n == name]
        assert len(found) == 1, self.calls
        return found[0]


def _one_error_line(rc: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "Writing model shards" not in line]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def test_push_uploads_a_folder_transformers_loads_with_the_same_logits(root, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from scalelm.model.io import load_model_dir
    from scalelm.runs import resolve_checkpoint

    hub = Hub(monkeypatch, tmp_path)
    rc, out, err = cli("push", root / "run", "me/tiny", "--private", "--revision", "exp-1", "--token", "hf_x")
    assert rc == 0, err[-3000:]
    repo = hub.call("create_repo")
    assert repo["repo_id"] == "me/tiny" and repo["private"] is True and repo["exist_ok"] is True
    assert repo["token"] == "hf_x"
    assert hub.call("create_branch")["branch"] == "exp-1"
    up = hub.call("upload_folder")
    assert up["repo_id"] == "me/tiny" and up["revision"] == "exp-1"
    assert not Path(up["folder_path"]).exists()  # the staging folder is gone
    assert json.loads(out)["url"] == "https://huggingface.co/me/tiny/tree/exp-1"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in hub.uploaded.iterdir()}

    ours = load_model_dir(resolve_checkpoint(root / "run")).eval()
    theirs = AutoModelForCausalLM.from_pretrained(hub.uploaded).eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(idx)[0]  # (logits, loss)
        got = theirs(idx).logits
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()


def test_main_branch_is_not_created_and_the_repo_stays_public_by_default(root, tmp_path, monkeypatch):
    hub = Hub(monkeypatch, tmp_path)
    rc, out, err = cli("push", root / "run" / "best", "me/tiny")
    assert rc == 0, err[-3000:]
    assert hub.call("create_repo")["private"] is False
    assert not [n for n, _ in hub.calls if n == "create_branch"]
    assert hub.call("upload_folder")["revision"] is None
    assert json.loads(out)["revision"] == "main"


def test_the_card_names_the_parameters_the_data_the_eval_and_the_command(root):
    from scalelm.model.io import load_model_dir
    from scalelm.publish import model_card

    best = root / "run" / "best"
    card = model_card(best, "me/tiny", license="apache-2.0")
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in front and "license: apache-2.0" in front
    assert "- scalelm" in front and "- gpt2" in front and "pipeline_tag: text-generation" in front
    params = sum(p.numel() for p in load_model_dir(best).parameters())
    assert f"{params:,}" in body
    assert "`tinydata`" in body and str(root) not in card  # the data by name; no local path published
    step = json.loads((best / "config.json").read_text())["step"]
    val = [r for r in read_metrics(root / "run") if r.get("step") == step and "val_loss" in r][-1]
    assert f"| val_loss | {val['val_loss']:.4f} |" in body and f"step {step}" in body
    assert f"| val_bits_per_byte | {val['val_bits_per_byte']:.4f} |" in body
    assert "scalelm train" in body and "--train.max_steps=4" in body and "--model.n_layer=2" in body
    assert "--train.seed" not in body  # defaults are not repeated
    assert "AutoModelForCausalLM.from_pretrained(\"me/tiny\")" in body


def test_a_model_outside_a_run_gets_a_card_without_run_facts(root, tmp_path):
    from scalelm.model.io import load_model_dir, save_model_dir
    from scalelm.publish import model_card

    save_model_dir(load_model_dir(root / "run" / "best"), tmp_path / "m")
    card = model_card(tmp_path / "m")
    assert "license:" not in card and "datasets:" not in card
    assert "not recorded" in card and "How it was trained" not in card
    assert "| val_loss |" not in card  # a bare model directory keeps no validation figures


def test_a_classifier_is_published_as_sequence_classification(root, tmp_path, monkeypatch):
    hub = Hub(monkeypatch, tmp_path)
    rc, out, err = cli("push", root / "clf", "me/clf", "--dry-run", tmp_path / "staged")
    assert rc == 0, err[-3000:]
    assert hub.calls == []
    cfg = json.loads((tmp_path / "staged" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"]
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "labels: neg, pos" in card
    assert "AutoModelForSequenceClassification" in card


def test_dry_run_writes_the_folder_and_calls_nothing(root, tmp_path, monkeypatch):
    hub = Hub(monkeypatch, tmp_path)
    dest = tmp_path / "staged"
    rc, out, err = cli("push", root / "run", "me/tiny", "--dry-run", dest, "--license", "mit")
    assert rc == 0, err[-3000:]
    assert hub.calls == []
    files = json.loads(out)["files"]
    assert sorted(p.name for p in dest.iterdir()) == files
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    assert "license: mit" in (dest / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no stage left beside it
    # a non-empty DIR is never replaced
    rc, _, err = cli("push", root / "run", "me/tiny", "--dry-run", dest)
    assert "--dry-run" in _one_error_line(rc, err)


def test_a_quantized_model_is_refused_in_one_line(root, tmp_path, monkeypatch):
    hub = Hub(monkeypatch, tmp_path)
    rc, _, err = cli("push", root / "quant", "me/q", "--dry-run", tmp_path / "staged")
    line = _one_error_line(rc, err)
    assert "`scalelm push` works with" in line and "quantized" in line
    assert hub.calls == [] and not (tmp_path / "staged").exists()


def test_a_bad_repository_id_is_refused_in_one_line(root, tmp_path, monkeypatch):
    hub = Hub(monkeypatch, tmp_path)
    rc, _, err = cli("push", root / "run", "not a/valid/id")
    assert "ORG/NAME" in _one_error_line(rc, err)
    assert hub.calls == []


def test_a_network_error_is_one_line_and_leaves_nothing_behind(root, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the staging folder goes
    # what the Hub client raises underneath (its HTTP errors are OSErrors too, but need a live response)
    for fail in (ConnectionError("[Errno 111] Connection refused"), TimeoutError("timed out: no answer"),
                 RuntimeError("403 Forbidden: no write access")):
        hub = Hub(monkeypatch, tmp_path, fail=fail)
        rc, _, err = cli("push", root / "run", "me/tiny", "--token", "hf_x")
        line = _one_error_line(rc, err)
        assert "uploading to me/tiny failed" in line and str(fail).split(":")[0] in line
        assert [n for n, _ in hub.calls] == ["create_repo"]
        assert list(scratch.iterdir()) == []


def test_a_run_on_a_hub_dataset_lists_it_in_the_front_matter(root, tmp_path):
    from scalelm.publish import model_card

    data = tmp_path / "stories"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"source": {"type": "hf-hub", "path": "hf:roneneldan/TinyStories",
                                                           "split": "train"}}))
    run = tmp_path / "run"
    shutil.copytree(root / "run" / "best", run / "best")
    (run / "run.json").write_text(json.dumps({"command": "train", "data": {"path": str(data), "vocab_size": 18}}))
    card = model_card(run / "best")
    front = card.split("---\n")[1]
    assert "datasets:\n- roneneldan/TinyStories" in front
    assert "https://huggingface.co/datasets/roneneldan/TinyStories" in card and "split `train`" in card
    assert "| val_loss |" in card  # no metrics.jsonl: the checkpoint's own figure


def test_a_classifiers_card_counts_its_head(root):
    from scalelm.publish import model_card
    from scalelm.tasks.classify.files import load_classifier

    model, _, _ = load_classifier(root / "clf")
    assert f"parameters: {sum(p.numel() for p in model.parameters()):,} " in model_card(root / "clf")
