"""An encoder-decoder warm-started from a GPT base (scalelm/tasks/translate/warm_start.py): every
weight the GPT has lands where it computes the same thing, the cross-attention is new, and bases
the encoder-decoder cannot express are refused in one line."""

import dataclasses

import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.errors import UserError
from scalelm.model.gpt import GPT
from scalelm.tasks.translate.warm_start import asks_encdec, encdec_config, warm_start

GPT2 = dict(vocab_size=97, block_size=32, n_layer=3, n_head=4, n_embd=32, intermediate_size=64,
            pos_embedding="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)
LLAMA = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
             pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


def _pair(shape):
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(**shape)).eval()
    with torch.no_grad():  # no weight at its init value: a weight left unmapped would show
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = warm_start(gpt, encdec_config(gpt.cfg, "BASE")).eval()
    return gpt, model


@pytest.mark.parametrize("shape", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_the_halves_compute_what_the_gpt_computes(shape):
    gpt, model = _pair(shape)
    cfg = model.cfg
    assert cfg.arch == "encoder-decoder" and cfg.n_encoder_layer == cfg.n_decoder_layer == gpt.cfg.n_layer
    x = torch.randint(0, 97, (2, 11))
    ref = gpt(x)[0]
    with torch.no_grad():
        # the encoder's blocks are the GPT's: given the causal mask, the encoder computes the GPT's logits
        h, rope = model._embed(x, torch.arange(11)[None])
        causal = torch.ones(11, 11, dtype=torch.bool).tril()[None, None]
        for i in range(cfg.n_encoder_layer):
            h = model.blocks[f"e{i}"](h, rope, None, i, causal)
        torch.testing.assert_close(model.lm_head(model.enc_norm(h)), ref, rtol=1e-5, atol=1e-5)
        # without it (encode) each position sees the whole source
        assert not torch.allclose(model.lm_head(model.encode(x))[:, 0], ref[:, 0], atol=1e-3)
        # the decoder is the GPT plus cross-attention: silence it and the logits are the GPT's
        for i in range(cfg.n_decoder_layer):
            model.blocks[f"d{i}"].cross.o_proj.weight.zero_()
            if model.blocks[f"d{i}"].cross.o_proj.bias is not None:
                model.blocks[f"d{i}"].cross.o_proj.bias.zero_()
        logits = model(torch.randint(0, 97, (2, 5)), x)[0]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_only_the_cross_attention_is_new():
    gpt, model = _pair(GPT2)
    g = gpt.state_dict()
    for name, p in model.state_dict().items():
        if ".cross" in name:
            # fresh init (GPT-2's), not a copy of any GPT weight
            assert not any(v.shape == p.shape and torch.equal(v, p) for v in g.values()), name
            continue
        src = name.replace("enc_norm", "norm_f")
        if name.startswith("blocks."):
            src = "blocks." + name.split(".", 2)[1][1:] + "." + name.split(".", 2)[2]
        assert torch.equal(p, g[src]), name
    assert model.lm_head.weight is model.tok_emb.weight  # still tied


def test_bases_it_cannot_express_are_refused_in_one_line():
    for extra, what in ((dict(attn_softcap=50.0), "attn_softcap"), (dict(n_shared_blocks=1), "shares blocks"),
                        (dict(norm_placement="sandwich"), "norm_placement"), (dict(qk_norm=True), "qk_norm")):
        with pytest.raises(UserError, match=what) as e:
            encdec_config(ModelConfig(**{**GPT2, **extra}), "runs/base")
        assert "runs/base" in str(e.value) and "\n" not in str(e.value)


def test_the_command_line_asks_for_it():
    class A:
        overrides = ["--model.arch=encoder-decoder", "--train.max_steps=3"]

    assert asks_encdec(A(), None)
    A.overrides = ["--model.arch", "encoder-decoder"]
    assert asks_encdec(A(), None)
    A.overrides = ["--model.dropout=0.1"]
    assert not asks_encdec(A(), None)
    saved = type("S", (), {"model": dataclasses.replace(ModelConfig(**GPT2), arch="encoder-decoder")})()
    assert asks_encdec(A(), saved)  # resuming keeps it
