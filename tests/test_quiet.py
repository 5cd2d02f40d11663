"""The happy paths of train, generate, convert and eval write no warning lines on stderr: what the
libraries print that is known to be harmless is silenced (scalelm/quiet.py), nothing else is.

Each command runs in a fresh interpreter, so import-time messages (torchao's CUDA kernels, torch's
pytree deprecations) would show up here as they do for a user."""

import re

import pytest
from conftest import run_cli
from train_helpers import TINY, shakespeare_data

NOISE = re.compile(r"\bwarn(ing)?\b|^W\d{4} |Failed to load|fatal:|Traceback|\bdeprecat", re.IGNORECASE)
ENV = {"OMP_NUM_THREADS": "1", "SCALELM_PEAK_TFLOPS": "1"}  # no peak measurement (its busy-machine note)


def noise(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if NOISE.search(ln)]


@pytest.mark.slow
def test_happy_paths_write_no_warning_lines(shared_data, tmp_path):
    data = shakespeare_data(shared_data, tmp_path / "data", chars=20_000)
    run = tmp_path / "run"
    steps = [
        ("train", "--data", data, "--out", run, *TINY, "--train.max_steps=2", "--train.eval_every=2"),
        ("generate", run, "--prompt", "ROMEO:", "--max-new-tokens", "8", "--seed", "0"),
        ("eval", run, "--data", data, "--max-batches", "2"),
        ("convert", run / "best", "--to-hf", tmp_path / "hf"),
    ]
    for args in steps:
        r = run_cli(*args, env=ENV)
        assert noise(r.stderr) == [], f"scalelm {args[0]}: {noise(r.stderr)}"


def test_the_filter_lets_everything_else_through(capsys):
    import logging
    import warnings

    from scalelm.quiet import quiet_known_noise

    quiet_known_noise()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        warnings.warn("torch.distributed is disabled, unavailable or uninitialized, assuming ...", UserWarning)
        warnings.warn("something the user must see", UserWarning)
    assert [str(w.message) for w in seen] == ["something the user must see"]
    assert logging.getLogger("torchao").getEffectiveLevel() == logging.ERROR
    assert logging.getLogger("scalelm").getEffectiveLevel() <= logging.WARNING
