"""`scalelm demo` on a small corpus with a tiny budget: it prepares, learns and prints text."""

import json

import pytest
from train_helpers import cli, one_thread  # noqa: F401 (fixture)


@pytest.mark.slow
def test_demo_learns_and_generates(tmp_path, shared_data, one_thread):
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text()[:150_000])
    out = tmp_path / "demo"
    rc, so, se = cli("demo", "--input", corpus, "--minutes", "0.2", "--out", out, "--max-new-tokens", "30",
                     "--no-progress")
    assert rc == 0, se
    report = json.loads((out / "demo.json").read_text())
    assert report["final_val_loss"] < report["initial_val_loss"] - 0.2  # it visibly learned
    assert report["final_bits_per_byte"] < report["initial_bits_per_byte"]
    # the budget is kept by the trainer's own stop (a wall-time bound would fail on a busy machine)
    assert report["steps"] >= 2 and report["stopped"] in ("max_steps", "time_budget")
    assert report["sample"].strip() and report["sample"] in so  # the text was printed
    assert "Validation loss" in so and "down" in so
    assert (out / "run" / "loss.png").is_file() and (out / "run" / "best" / "model.safetensors").is_file()
    # a second demo reuses the prepared corpus and replaces the previous run
    rc, so, se = cli("demo", "--input", corpus, "--minutes", "0.05", "--out", out, "--max-new-tokens", "5",
                     "--no-progress")
    assert rc == 0, se
    assert "reusing the prepared corpus" in se


def test_demo_refuses_a_bad_budget(tmp_path):
    rc, _, se = cli("demo", "--minutes", "0", "--out", tmp_path / "d")
    assert rc == 2 and "--minutes" in se
