"""Steering vectors (scalelm/interp/steering.py, `scalelm steer`, `generate --steer`): the vector's
arithmetic checked against a forward pass written out by hand, files, and the command lines."""

import json

import pytest
import torch

from scalelm import cli
from scalelm.config import ModelConfig
from scalelm.data.tokenizer import byte_tokenizer
from scalelm.generate.generator import Generator
from scalelm.generate.sampling import SamplingParams
from scalelm.interp.hooks import HookError
from scalelm.interp.steering import load_vector, mean_stream, save_vector, steer, steering_vector
from scalelm.model.gpt import GPT
from scalelm.model.io import save_model_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")
GREEDY = SamplingParams(temperature=0.0)


def tiny(vocab=300, **kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab, block_size=48, n_layer=3, n_head=4, n_embd=64, init_std=0.2,
                           **kw)).eval()


@torch.no_grad()
def stream_by_hand(m: GPT, ids: list[int], layer: int, add=None) -> torch.Tensor:
    """The stream entering ``layer``, computed without hooks (``add`` added there, then the rest of the model
    run and the logits returned instead)."""
    idx = torch.tensor([ids])
    h = m.tok_emb(idx) + (m.pos_emb(torch.arange(len(ids)))[None] if m.pos_emb is not None else 0)
    rope = None
    if m.cfg.pos_embedding == "rope":
        pos = torch.arange(len(ids))[None]
        rope = (m.rope_cos[pos][:, None], m.rope_sin[pos][:, None])
    for i in range(layer):
        h = m.blocks[str(i)](h, rope, None, i)
    if add is None:
        return h[0]
    h = h + add
    for i in range(layer, m.cfg.n_layer):
        h = m.blocks[str(i)](h, rope, None, i)
    return m.lm_head(m.norm_f(h))[0]


@pytest.mark.parametrize("style", [{}, dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_the_vector_is_the_difference_of_mean_streams(style, pool):
    m = tiny(**style)
    pos, neg = [[5, 6, 7], [8, 9, 10, 11]], [[12, 13], [14, 15, 16, 17, 18]]
    L = 2

    def by_hand(prompts):
        rows = [stream_by_hand(m, p, L) for p in prompts]
        return torch.stack([r.mean(0) if pool == "mean" else r[-1] for r in rows]).mean(0)

    v = steering_vector(m, pos, neg, L, pool)
    torch.testing.assert_close(v, by_hand(pos) - by_hand(neg), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_stream(m, pos, L, pool) - mean_stream(m, neg, L, pool), v)
    # steering adds scale * v to that stream at every position: the rest of the model sees exactly that
    ids = [20, 21, 22, 23]
    with steer(m, v, L, scale=3.0), torch.no_grad():
        got = m(torch.tensor([ids]))[0][0]
    torch.testing.assert_close(got, stream_by_hand(m, ids, L, add=3.0 * v), atol=1e-4, rtol=1e-4)


def test_steering_is_linear_in_the_vector():
    m = tiny()
    a, b = torch.randn(64), torch.randn(64)
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        base = m(idx)[0]
        with steer(m, a, 1, 2.0), steer(m, b, 1, -0.5):
            nested = m(idx)[0]
        with steer(m, 2.0 * a - 0.5 * b, 1):
            combined = m(idx)[0]
        with steer(m, a, 1, 0.0):
            zero = m(idx)[0]
    torch.testing.assert_close(nested, combined, atol=1e-5, rtol=1e-5)
    assert torch.equal(zero, base) and not torch.allclose(nested, base)


def test_vector_files_round_trip_and_are_checked(tmp_path):
    m = tiny()
    v = torch.randn(64)
    save_vector(tmp_path / "v.safetensors", v, 2, pool="mean", positive=3)
    got, meta = load_vector(tmp_path / "v.safetensors")
    assert torch.equal(got, v) and meta["layer"] == 2 and meta["positive"] == "3"
    with pytest.raises(HookError, match="64 wide"):
        with steer(m, torch.randn(32), 1):
            pass
    with pytest.raises(HookError, match="outside the model's layers"):
        with steer(m, v, 3):
            pass
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception, match="not a readable safetensors"):
        load_vector(tmp_path / "bad.safetensors")


def test_steer_and_generate_commands(tmp_path, capsys):
    tok = byte_tokenizer()
    m = tiny(vocab=tok.get_vocab_size())
    save_model_dir(m, tmp_path / "m", tokenizer_json=tok.to_str())
    (tmp_path / "pos.txt").write_text("I loved it\nwonderful, great\n\n")
    vec = tmp_path / "love.safetensors"
    capsys.readouterr()
    assert cli.main(["steer", str(tmp_path / "m"), "--positive", str(tmp_path / "pos.txt"), "--negative", "I hated it",
                     "--negative", "awful", "--layer", "1", "--out", str(vec), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["positive"] == 2 and summary["negative"] == 2 and len(summary["promotes"]) == 10
    v, meta = load_vector(vec)
    ids = lambda t: tok.encode(t).ids  # noqa: E731
    want = steering_vector(m, [ids("I loved it"), ids("wonderful, great")], [ids("I hated it"), ids("awful")], 1)
    torch.testing.assert_close(v, want)
    assert meta["layer"] == 1 and meta["pool"] == "mean"

    def generate(*extra):
        capsys.readouterr()
        assert cli.main(["generate", str(tmp_path / "m"), "--prompt", "The film", "--max-new-tokens", "12",
                         "--temperature", "0", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["tokens"]

    plain = generate()
    steered = generate("--steer", str(vec), "--steer-scale", "25")
    assert generate("--steer", str(vec), "--steer-scale", "0") == plain
    assert steered != plain
    gen = Generator(m, tok, [])  # the command's steering is the Python API's
    with steer(gen, v, 1, 25.0):
        assert gen.generate("The film", 12, sampling=GREEDY)[0].tokens == steered
    assert cli.main(["generate", str(tmp_path / "m"), "--steer-scale", "2"]) == 2
    assert "need --steer" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "m"), "--steer", str(vec), "--steer-layer", "7"]) == 2
    assert "outside the model's layers" in capsys.readouterr().err
