"""`scalelm eval RUN --text FILE [--stride S]`: rolling-window perplexity of any text file."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import cli, make_char_data, one_thread  # noqa: F401 (fixture)

from scalelm.config import ModelConfig
from scalelm.evaluate.text import rolling_windows
from scalelm.model import IGNORE_INDEX, GPT
from scalelm.model.io import save_model_dir

TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltext")
    # a DATA_DIR whose val split is exactly the text file below (one document + end-of-text)
    text = TEXT[: 16 * 40]  # 640 characters -> 641 tokens = 40 windows of 16 + 1: no tail dropped by --data
    data = make_char_data(root / "d", text + text, val_fraction=0.5, tokenizer_text=TEXT)
    meta = json.loads((data / "meta.json").read_text())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=meta["tokenizer"]["vocab_size"], block_size=16, n_layer=1, n_head=2,
                            n_embd=16))
    save_model_dir(model, root / "m", (data / "tokenizer.json").read_text())
    (root / "t.txt").write_text(text)
    return root, data, model, text


def test_windows_score_every_token_once_with_context():
    ids = list(range(50))
    for stride in (1, 5, 16):
        targets = [t for _, y in rolling_windows(ids, 16, stride) for t in y if t != IGNORE_INDEX]
        assert targets == ids[1:], stride
    wins = list(rolling_windows(ids, 16, 4))
    assert all(len(x) <= 16 for x, _ in wins) and wins[1][1][:12] == [IGNORE_INDEX] * 12  # 12 tokens of context


def test_text_eval_matches_data_eval_and_a_direct_computation(setup, one_thread):
    root, data, model, text = setup
    rc, so, se = cli("eval", root / "m", "--data", data, "--dtype", "fp32")
    assert rc == 0, se
    by_data = json.loads(so)
    rc, so, se = cli("eval", root / "m", "--text", root / "t.txt", "--dtype", "fp32")
    assert rc == 0, se
    by_text = json.loads(so)
    assert by_text["tokens"] == by_data["tokens"] == 640
    assert by_text["loss"] == pytest.approx(by_data["loss"], rel=1e-6)
    assert by_text["bits_per_byte"] == pytest.approx(by_text["loss"] * 640 / math.log(2) / len(text.encode()))
    assert by_text["word_perplexity"] == pytest.approx(math.exp(by_text["loss"] * 640 / len(text.split())))

    rc, so, se = cli("eval", root / "m", "--text", root / "t.txt", "--stride", "4", "--dtype", "fp32")
    assert rc == 0, se
    strided = json.loads(so)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(data / "tokenizer.json")).encode(text).ids + [0]
    total = 0.0
    with torch.no_grad():  # the reference: each token scored once, with its own window of context
        for x, y in rolling_windows(ids, 16, 4):
            logits = model(torch.tensor([x]))[0][0]
            total += F.cross_entropy(logits, torch.tensor(y), ignore_index=IGNORE_INDEX, reduction="sum").item()
    assert strided["tokens"] == 640 and strided["loss"] == pytest.approx(total / 640, rel=1e-5)
    assert strided["stride"] == 4 and strided["seq_len"] == 16


def test_text_eval_bad_input(setup, tmp_path, one_thread):
    root, data, _, _ = setup
    for args, phrase in [(["--text", tmp_path / "missing.txt"], "no such file"),
                         (["--text", root / "t.txt", "--stride", "0"], "--stride"),
                         (["--text", root / "t.txt", "--stride", "17"], "--stride"),
                         (["--text", root / "t.txt", "--data", data], "give one of --data DATA_DIR, --text FILE or --harness"),
                         ([], "what to score: --data DATA_DIR")]:
        rc, _, se = cli("eval", root / "m", *args)
        assert rc == 2 and phrase in se and "Traceback" not in se, (args, se)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe abc")
    rc, _, se = cli("eval", root / "m", "--text", tmp_path / "bin.txt")
    assert rc == 2 and "not UTF-8" in se
    (tmp_path / "empty.txt").write_text("  \n")
    rc, _, se = cli("eval", root / "m", "--text", tmp_path / "empty.txt")
    assert rc == 2 and "empty" in se
