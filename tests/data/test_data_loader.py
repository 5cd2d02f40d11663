import json

import numpy as np
import pytest
import torch

from scalelm.data.loader import BatchLoader, DataError, TokenData, eval_batches


def make_data_dir(path, n_train=5000, n_val=700, vocab=50):
    """A tiny DATA_DIR written by hand (no tokenizer training needed)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(0, vocab, n).astype(np.uint16).tofile(path / f"{split}.bin")
    meta = {"format": "scalelm-data", "version": 1, "dtype": "uint16",
            "tokenizer": {"kind": "byte", "vocab_size": vocab, "eot_id": 0, "pad_id": None, "sha256": "x"},
            "splits": {"train": {"file": "train.bin", "tokens": n_train, "documents": 1, "bytes": n_train * 2},
                       "val": {"file": "val.bin", "tokens": n_val, "documents": 1, "bytes": n_val * 2}}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_deterministic_and_windows_are_shifted(tmp_path, mode):
    d = TokenData(make_data_dir(tmp_path / "d"))
    toks = d.tokens("train")
    a = BatchLoader(toks, 4, 16, seed=3, mode=mode)
    b = BatchLoader(toks, 4, 16, seed=3, mode=mode)
    c = BatchLoader(toks, 4, 16, seed=4, mode=mode)
    xa, ya = a.next_batch()
    xb, yb = b.next_batch()
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == torch.int64 and xa.shape == (4, 16)
    assert torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(xa, c.next_batch()[0])


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_take_disjoint_slices_of_the_same_global_batch(tmp_path, mode):
    toks = TokenData(make_data_dir(tmp_path / "d")).tokens("train")
    single = BatchLoader(toks, 2, 8, grad_accum_steps=4, seed=1, mode=mode)
    ranks = [BatchLoader(toks, 2, 8, grad_accum_steps=2, dp_rank=r, dp_world=2, seed=1, mode=mode) for r in range(2)]
    for _ in range(3):  # optimizer steps
        ref = torch.cat([single.next_batch()[0] for _ in range(4)])
        got = [torch.cat([ranks[r].next_batch()[0] for _ in range(2)]) for r in range(2)]
        # same multiset of windows in the global batch; ranks disjoint
        rows = lambda t: sorted(map(tuple, t.tolist()))
        assert rows(torch.cat(got)) == rows(ref)
        starts = [set(map(tuple, g.tolist())) for g in got]
        assert not (starts[0] & starts[1]) or mode == "random"


def test_sequential_covers_each_window_once_per_epoch(tmp_path):
    toks = TokenData(make_data_dir(tmp_path / "d", n_train=161)).tokens("train")
    ld = BatchLoader(toks, 2, 16, seed=0, mode="sequential")  # (161-1)//16 = 10 windows
    seen = [tuple(row) for _ in range(5) for row in ld.next_batch()[0].tolist()]
    expected = {tuple(toks[i * 16:(i + 1) * 16].astype(np.int64).tolist()) for i in range(10)}
    assert set(seen) == expected and len(seen) == 10
    assert ld.epoch == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_sees_the_same_batches(tmp_path, mode):
    toks = TokenData(make_data_dir(tmp_path / "d", n_train=400)).tokens("train")
    full = BatchLoader(toks, 3, 16, grad_accum_steps=2, seed=7, mode=mode)
    stream = [full.next_batch()[0] for _ in range(40)]
    part = BatchLoader(toks, 3, 16, grad_accum_steps=2, seed=7, mode=mode)
    for _ in range(13):
        part.next_batch()
    state = json.loads(json.dumps(part.state_dict()))  # must survive JSON
    resumed = BatchLoader(toks, 3, 16, grad_accum_steps=2, seed=7, mode=mode)
    resumed.load_state_dict(state)
    for i in range(13, 40):
        assert torch.equal(resumed.next_batch()[0], stream[i])
    other = BatchLoader(toks, 3, 16, grad_accum_steps=1, seed=7, mode=mode)
    with pytest.raises(DataError, match="global_batch"):
        other.load_state_dict(state)


def test_eval_batches_fixed_and_split_across_ranks(tmp_path):
    toks = TokenData(make_data_dir(tmp_path / "d")).tokens("val")
    a = [x for x, _ in eval_batches(toks, 4, 16, max_batches=3)]
    b = [x for x, _ in eval_batches(toks, 4, 16, max_batches=3)]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b))
    r0 = [x for x, _ in eval_batches(toks, 4, 16, max_batches=3, dp_rank=0, dp_world=2)]
    r1 = [x for x, _ in eval_batches(toks, 4, 16, max_batches=3, dp_rank=1, dp_world=2)]
    assert len(r0) + len(r1) == 3 and torch.equal(r1[0], a[1])


def test_bad_data_dirs(tmp_path):
    with pytest.raises(DataError, match="not found.*scalelm prepare"):
        TokenData(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="meta.json is missing"):
        TokenData(tmp_path / "empty")
    d = make_data_dir(tmp_path / "d", n_val=10)
    data = TokenData(d)
    with pytest.raises(DataError, match="fewer than one window"):
        data.check_window("val", 16)
    with pytest.raises(DataError, match="fewer than one window"):
        list(eval_batches(data.tokens("val"), 2, 16))
    with pytest.raises(DataError, match="no split 'test'"):
        data.tokens("test")
    (d / "train.bin").write_bytes(b"\0" * 10)  # truncated shard
    with pytest.raises(DataError, match="truncated or corrupt"):
        TokenData(d).tokens("train")
