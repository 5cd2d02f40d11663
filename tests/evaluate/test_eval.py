"""`scalelm eval` and `evaluate()`: the figures are what they claim, and mismatches are refused."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import cli, make_char_data, one_thread, shakespeare_data  # noqa: F401 (fixture)

from scalelm.config import ModelConfig
from scalelm.data.loader import TokenData
from scalelm.evaluate import evaluate
from scalelm.model import GPT
from scalelm.model.io import save_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("eval")
    data_dir = shakespeare_data(shared_data, root / "d", chars=30_000)
    data = TokenData(data_dir)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=data.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_model_dir(model, root / "m", data.tokenizer_json)
    return data_dir, data, model, root


def test_evaluate_matches_a_direct_computation(setup):
    data_dir, data, model, _ = setup
    res = evaluate(model, data, "val", batch_size=5, seq_len=16)
    toks = torch.from_numpy(data.tokens("val").astype("int64"))
    n = (len(toks) - 1) // 16
    x = toks[:n * 16].view(n, 16)
    y = toks[1:n * 16 + 1].view(n, 16)
    with torch.no_grad():
        logits = model(x)[0]
    ref = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).item()
    assert res["tokens"] == n * 16
    assert res["loss"] == pytest.approx(ref, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    split = json.loads((data_dir / "meta.json").read_text())["splits"]["val"]
    assert res["bits_per_byte"] == pytest.approx(ref / math.log(2) * split["tokens"] / split["bytes"], rel=1e-5)
    capped = evaluate(model, data, "val", batch_size=5, seq_len=16, max_batches=2)
    assert capped["tokens"] == 2 * 5 * 16  # the cap is in batches, spread over the split


def test_eval_cli_prints_one_json_object(setup, one_thread):
    data_dir, _, model, root = setup
    rc, so, se = cli("eval", root / "m", "--data", data_dir, "--dtype", "fp32", "--batch-size", "5")
    assert rc == 0, se
    res = json.loads(so)  # stdout is exactly one JSON object
    assert set(res) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    direct = evaluate(model, TokenData(data_dir), "val", batch_size=5)
    assert res["loss"] == pytest.approx(direct["loss"], rel=1e-6) and res["tokens"] == direct["tokens"]
    rc, so, _ = cli("eval", root / "m", "--data", data_dir, "--split", "train", "--max-batches", "3")
    assert rc == 0 and json.loads(so)["tokens"] == 3 * 8 * 16


def test_eval_refuses_mismatches(setup, tmp_path, one_thread):
    data_dir, data, _, root = setup
    rc, _, se = cli("eval", root / "m", "--data", data_dir, "--split", "test")
    assert rc == 2 and "no split 'test'" in se
    rc, _, se = cli("eval", root / "m", "--data", data_dir, "--seq-len", "64")
    assert rc == 2 and "block_size 16" in se
    rc, _, se = cli("eval", tmp_path / "missing", "--data", data_dir)
    assert rc == 2 and "not found" in se
    rc, _, se = cli("eval", root / "m", "--data", data_dir, "--dtype", "fp16")
    assert rc == 2 and "bf16" in se
    # another tokenizer of the same size: ids mean different things
    chars = sorted({c for c in data.tokenizer().get_vocab() if not c.startswith("<|")})
    other = make_char_data(tmp_path / "other", "".join(chars).replace("e", "~") * 50)
    rc, _, se = cli("eval", root / "m", "--data", other)
    assert rc == 2 and "different tokenizer" in se
    # a data vocabulary larger than the model's
    big = make_char_data(tmp_path / "big", "".join(chr(0x4E00 + i) for i in range(300)) * 20)
    rc, _, se = cli("eval", root / "m", "--data", big)
    assert rc == 2 and "vocabulary of" in se
