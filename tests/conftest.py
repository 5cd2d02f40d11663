import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # measured CPU peaks (scalelm.hardware) go to a per-session dir, not ~/.cache
    import tempfile
    os.environ.setdefault("SCALELM_CACHE_DIR", tempfile.mkdtemp(prefix="scalelm-test-cache-"))


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models in this process: OpenMP threads only contend (other test workers share the cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def run_cli(*args, check=True, timeout=600, env=None, cwd=None):
    """Run `python -m scalelm ARGS` in a subprocess; returns CompletedProcess."""
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "scalelm", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, env=e, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"scalelm {' '.join(map(str, args))} failed ({p.returncode}):\n"
                             f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def tiny_tokenizer_json(shared_data) -> str:
    """A byte-level BPE (vocab 300, `<|endoftext|>` = id 0) trained on a slice of Shakespeare."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    tok.train_from_iterator([text], trainer)
    return tok.to_str()
