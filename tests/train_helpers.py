"""Tiny DATA_DIRs for the trainer tests, written directly in the DATA_DIR format (meta.json,
tokenizer.json, train.bin/val.bin) so these tests do not depend on `scalelm prepare`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

EOT, PAD = "<|endoftext|>", "<|pad|>"


def char_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models

    vocab = {c: i for i, c in enumerate([EOT, PAD] + sorted(set(text)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOT, PAD])
    return tok


def make_char_data(out: Path, text: str, val_fraction: float = 0.1, tokenizer_text: str | None = None) -> Path:
    """Character-level DATA_DIR of ``text`` (first 1-val_fraction trains, the rest validates)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer(tokenizer_text or text)
    tok_json = tok.to_str()
    (out / "tokenizer.json").write_text(tok_json)
    cut = int(len(text) * (1 - val_fraction))
    splits = {}
    for name, part in (("train", text[:cut]), ("val", text[cut:])):
        ids = np.array(tok.encode(part).ids + [0], dtype=np.uint16)
        ids.tofile(out / f"{name}.bin")
        splits[name] = {"file": f"{name}.bin", "tokens": len(ids), "documents": 1,
                        "bytes": len(part.encode())}
    meta = {"format": "scalelm-data", "version": 1, "dtype": "uint16",
            "tokenizer": {"kind": "char", "vocab_size": tok.get_vocab_size(), "eot_id": 0, "pad_id": 1,
                          "sha256": hashlib.sha256(tok_json.encode()).hexdigest()},
            "splits": splits, "source": {"kind": "test"}, "inputs_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "created": "2025-01-01T00:00:00+00:00"}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def shakespeare_data(shared_data: Path, out: Path, chars: int = 60_000) -> Path:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:chars]
    return make_char_data(out, text)


TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--train.micro_batch_size=4", "--train.eval_iters=2", "--train.log_every=1",
        "--optim.warmup_steps=2", "--log.progress=false"]


# one thread: on a shared 2-core machine, tiny models run faster without OpenMP contention
ONE_THREAD = {"OMP_NUM_THREADS": "1", "SCALELM_PEAK_TFLOPS": "1"}


@pytest.fixture
def one_thread(monkeypatch):
    """In-process runs: one torch thread, no CPU peak measurement (restored afterwards)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("SCALELM_PEAK_TFLOPS", "1")
    yield
    torch.set_num_threads(n)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def cli(*args) -> tuple[int, str, str]:
    """Run `scalelm ARGS` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    import contextlib
    import io

    from scalelm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()
