"""Activation patching (scalelm/interp/patching.py, `scalelm trace`) on a model built so that the
answer is known: only one head of the last layer moves information between positions."""

import json

import pytest
import torch

from scalelm import cli
from scalelm.config import ModelConfig
from scalelm.data.tokenizer import byte_tokenizer
from scalelm.interp.hooks import HookError
from scalelm.interp.patching import trace
from scalelm.model.gpt import GPT
from scalelm.model.io import save_model_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")
T, P = 6, 2  # prompt length; the one position where the clean and corrupted prompts differ


def one_path_model(seed=0) -> GPT:
    """Layer 0 adds nothing (attention and MLP outputs zeroed); in layer 1 the MLP adds nothing and
    only head 0 writes to the stream. So the token at position P reaches the last position's logits
    through one path only: the stream at P, read by head 0 of layer 1."""
    torch.manual_seed(seed)
    m = GPT(ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=4, n_embd=64, init_std=0.5)).eval()
    with torch.no_grad():
        for blk in m.blocks.values():
            blk.mlp.down.weight.zero_()
            blk.mlp.down.bias.zero_()
            blk.attn.o_proj.bias.zero_()
        m.blocks["0"].attn.o_proj.weight.zero_()
        m.blocks["1"].attn.o_proj.weight[:, 16:].zero_()  # heads 1-3 write nothing
    return m


def test_recovery_is_where_the_one_path_runs():
    m = one_path_model()
    clean = [5, 9, 40, 7, 8, 11]
    corrupt = list(clean)
    corrupt[P] = 41
    with torch.no_grad():
        target = int(m(torch.tensor([clean]))[0][0, -1].argmax())
    r = trace(m, clean, corrupt, target)
    assert r.foil != target and r.clean_diff > r.corrupt_diff
    resid, attn, mlp = r.grids["resid_pre"], r.grids["attn_out"], r.grids["mlp_out"]
    want = torch.zeros(2, T)
    want[0, P] = want[1, P] = 1.0  # the stream at P, before either layer, carries it all
    torch.testing.assert_close(resid, want, atol=1e-4, rtol=0)
    want = torch.zeros(2, T)
    want[1, T - 1] = 1.0  # the attention of layer 1 at the last position: the head that reads P
    torch.testing.assert_close(attn, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(mlp, torch.zeros(2, T), atol=1e-4, rtol=0)
    heads = torch.zeros(2, 4)
    heads[1, 0] = 1.0
    torch.testing.assert_close(r.heads, heads, atol=1e-4, rtol=0)


def test_trace_refuses_what_it_cannot_patch():
    m = one_path_model()
    with pytest.raises(HookError, match="equally long"):
        trace(m, [1, 2, 3], [1, 2], 5)
    with pytest.raises(HookError, match="nothing to recover"):
        trace(m, [1, 2, 3], [1, 2, 3], 5, foil=6)
    with pytest.raises(HookError, match="unknown site"):
        trace(m, [1, 2, 3], [1, 4, 3], 5, sites=["resid_post"])


def test_trace_command_writes_json_and_heatmap(tmp_path, capsys):
    tok = byte_tokenizer()
    m = one_path_model()
    model = GPT(ModelConfig(**{**m.cfg.__dict__, "vocab_size": tok.get_vocab_size()})).eval()
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith(("tok_emb", "lm_head"))}
    model.load_state_dict(sd, strict=False)
    save_model_dir(model, tmp_path / "m", tokenizer_json=tok.to_str())
    out = tmp_path / "trace"
    capsys.readouterr()
    rc = cli.main(["trace", str(tmp_path / "m"), "--clean", "abcdef", "--corrupt", "abXdef", "--target", "g",
                   "--json", "--out", str(out)])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert got["target"]["text"] == "g" and len(got["recovery"]["resid_pre"]) == 2
    assert got["recovery"]["resid_pre"][0][2] == pytest.approx(1.0, abs=1e-3)  # the changed position, layer 0
    assert json.loads((out / "trace.json").read_text()) == got
    assert (out / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert cli.main(["trace", str(tmp_path / "m"), "--clean", "abcdef", "--corrupt", "abXdef", "--target", "gh"]) == 2
    assert "is 2 tokens" in capsys.readouterr().err
    assert cli.main(["trace", str(tmp_path / "m"), "--clean", "abcdef", "--corrupt", "abXdef", "--target", "g",
                     "--out", str(out)]) == 2  # an earlier report: only with --overwrite
    assert "--overwrite" in capsys.readouterr().err
