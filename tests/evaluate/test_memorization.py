"""`scalelm eval --memorization`: a model that memorised a sequence reproduces it from its prefix (and
says the scrubbed placeholder in it unprompted); a model that did not, does neither."""

import json
import random

import numpy as np
import pytest
import torch
from train_helpers import cli, make_char_data, one_thread  # noqa: F401 (fixture)

from scalelm.config import ModelConfig
from scalelm.data.loader import TokenData
from scalelm.evaluate.memorization import memorization, sample_windows
from scalelm.generate.generator import Generator
from scalelm.model import GPT
from scalelm.model.io import save_model_dir

# one period of the training text: 60 characters with a placeholder in it; val is the same characters
# in another order, so it holds nothing the model could have memorised
UNIT = "Mail <EMAIL_ADDRESS> today: qwrtyupkjhgfzxcvbnm 012345678!?\n"
SHUFFLED = "".join(random.Random(0).sample(UNIT, len(UNIT)))


def train(model: GPT, tokens: np.ndarray, steps: int, block: int = 64) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t = torch.from_numpy(tokens.astype(np.int64))
    model.train()
    for _ in range(steps):
        at = torch.randint(0, len(t) - block - 1, (16,), generator=g)
        x = torch.stack([t[i:i + block] for i in at])
        y = torch.stack([t[i + 1:i + block + 1] for i in at])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    assert len(UNIT) == 60
    data_dir = make_char_data(root / "d", UNIT * 108 + SHUFFLED * 12, val_fraction=0.1)
    data = TokenData(data_dir)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ModelConfig(vocab_size=data.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64)
        torch.manual_seed(0)
        fresh, learned = GPT(cfg), GPT(cfg)
        train(learned, data.tokens("train"), 150)
    finally:
        torch.set_num_threads(n)
    save_model_dir(learned, root / "learned", data.tokenizer_json)
    return data_dir, data, fresh, learned, root


def generator(model, data):
    return Generator(model, data.tokenizer(), eos_ids=[data.eot_id], pack=False)


def test_a_memorised_sequence_is_extracted_and_held_out_text_is_not(setup, one_thread):
    _, data, _, learned, _ = setup
    res = memorization(generator(learned, data), data, samples=20, batch_size=10, unprompted_samples=4,
                       new_tokens=120)
    mem = res["memorization"]
    assert mem["prefix_tokens"] == 32 and mem["suffix_tokens"] == 32
    assert mem["train"]["samples"] == 20 and mem["train"]["extractable_rate"] >= 0.9, mem
    assert mem["val"]["extractable_rate"] == 0.0 and mem["val"]["token_accuracy"] < 0.5, mem
    assert mem["gap"] >= 0.9
    un = res["unprompted"]
    assert un["samples"] == 4 and un["tokens"] == 4 * 120
    assert un["placeholders"]["<EMAIL_ADDRESS>"] >= 4 and un["placeholders_total"] == un["placeholders"]["<EMAIL_ADDRESS>"]


def test_a_model_that_learned_nothing_extracts_nothing(setup, one_thread):
    _, data, fresh, _, _ = setup
    res = memorization(generator(fresh, data), data, samples=20, batch_size=10, unprompted_samples=4, new_tokens=120)
    assert res["memorization"]["train"]["extractable_rate"] == 0.0
    assert res["memorization"]["train"]["token_accuracy"] < 0.2
    assert res["unprompted"]["placeholders_total"] == 0


def test_windows_are_seeded_distinct_and_checked():
    tokens = np.arange(1000)
    w = sample_windows(tokens, 50, 64, seed=3)
    assert w.shape == (50, 64) and len(set(w[:, 0])) == 50 and (np.diff(w, axis=1) == 1).all()
    assert (w == sample_windows(tokens, 50, 64, seed=3)).all()
    assert sample_windows(tokens[:70], 50, 64, seed=0).shape == (7, 64)  # every start there is
    with pytest.raises(Exception, match="fewer than one window of 64"):
        sample_windows(tokens[:63], 5, 64, seed=0, split="val")


def test_the_cli(setup, one_thread):
    data_dir, _, _, _, root = setup
    rc, so, se = cli("eval", root / "learned", "--memorization", "--data", data_dir, "--samples", "10",
                     "--unprompted", "2", "--max-new-tokens", "64", "--dtype", "fp32")
    assert rc == 0, se
    res = json.loads(so)
    assert res["memorization"]["train"]["extractable_rate"] >= 0.9 and res["memorization"]["val"]["samples"] == 10
    assert res["unprompted"]["tokens"] == 128
    rc, _, se = cli("eval", root / "learned", "--memorization", "--data", data_dir, "--prefix-tokens", "48")
    assert rc == 2 and "more than the model's context of 64" in se
    rc, _, se = cli("eval", root / "learned", "--memorization", "--text", data_dir / "meta.json")
    assert rc == 2 and "--memorization reads the train and val splits of --data" in se
