"""The encoder (``arch = "encoder"``): Hugging Face parity both ways (BertForMaskedLM and
ModernBertForMaskedLM from random-init models of a local config with every parameter perturbed, so a
weight mapped wrong or missed fails), the CLI conversion, no attention across packed documents, the
masked-LM head only on the gathered rows, its config checks, FLOPs and presets."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
)

from scalelm.config import Config, ConfigError, ModelConfig, apply_preset  # noqa: E402
from scalelm.model.build import build_model  # noqa: E402
from scalelm.model.encoder import MLM_FRACTION, Encoder, encoder_flops_per_token  # noqa: E402
from scalelm.model.gpt import flops_per_token  # noqa: E402
from scalelm.model.hf import ConversionError, from_hf, hf_family, model_config_from_hf, to_hf  # noqa: E402
from scalelm.model.loss import IGNORE_INDEX  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

V = 300
_NO_IDS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _bert(**kw):
    return BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64, **kw))


def _modernbert(**kw):
    return ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, layer_types=["full_attention"] * 2, cls_token_id=None, sep_token_id=None,
        **_NO_IDS, **kw))


FAMILIES = {"bert": _bert, "modernbert": _modernbert}


def _perturbed(make):
    torch.manual_seed(0)
    hf = make()
    with torch.no_grad():
        for p in hf.parameters():  # every parameter away from its init (LayerNorm 1/0, zero biases)
            p.add_(torch.randn_like(p) * 0.1)
    return hf.eval()


def _inputs(family):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (2, 24), generator=g)
    valid = torch.ones(2, 24, dtype=torch.long)
    valid[1, 17:] = 0  # right padding in row 1
    types = torch.randint(0, 2, (2, 24), generator=g) if family == "bert" else None
    return x, valid, types


def _hf_logits(hf, x, valid, types):
    kw = {"token_type_ids": types} if types is not None else {}
    with torch.no_grad():
        return hf(input_ids=x, attention_mask=valid, **kw).logits


def _ours(model, x, valid, types):
    with torch.no_grad():
        return model(x, attn_mask=valid.bool(), token_type_ids=types)[0]


def _close(a, b, valid):
    """Within 1e-4 at every real position (padding rows' outputs are not defined the same way)."""
    m = valid.bool()
    assert (a[m] - b[m]).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_parity_both_ways(family, tmp_path):
    hf = _perturbed(FAMILIES[family])
    x, valid, types = _inputs(family)
    ref = _hf_logits(hf, x, valid, types)
    ours = from_hf(hf)  # from the transformers model
    assert isinstance(ours, Encoder) and hf_family(ours.cfg) == family
    _close(_ours(ours, x, valid, types), ref, valid)
    hf.save_pretrained(tmp_path / "hf")  # from a directory (safetensors, read shard by shard)
    _close(_ours(from_hf(tmp_path / "hf"), x, valid, types), ref, valid)
    back = to_hf(ours)  # export: the same class, the same tensors
    assert type(back) is type(hf)
    _close(_hf_logits(back, x, valid, types), ref, valid)
    theirs, mine = hf.state_dict(), back.state_dict()
    assert set(theirs) == set(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)


def test_bert_untied_and_tanh_gelu_round_trip():
    hf = _perturbed(lambda: _bert(tie_word_embeddings=False, hidden_act="gelu_new"))
    x, valid, types = _inputs("bert")
    ours = from_hf(hf)
    assert ours.cfg.gelu == "tanh" and not ours.cfg.tie_embeddings
    _close(_ours(ours, x, valid, types), _hf_logits(hf, x, valid, types), valid)
    _close(_hf_logits(to_hf(ours), x, valid, types), _hf_logits(hf, x, valid, types), valid)


def test_convert_cli_both_ways(tmp_path):
    from scalelm.cli import main
    from scalelm.model.io import load_model_dir

    hf = _perturbed(_bert)
    hf.save_pretrained(tmp_path / "hf")
    x, valid, types = _inputs("bert")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    ours = load_model_dir(tmp_path / "ours")
    assert isinstance(ours, Encoder)
    _close(_ours(ours, x, valid, types), _hf_logits(hf, x, valid, types), valid)
    assert main(["convert", str(tmp_path / "ours"), "--to-hf", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    back = BertForMaskedLM.from_pretrained(tmp_path / "back").eval()
    _close(_hf_logits(back, x, valid, types), _hf_logits(hf, x, valid, types), valid)


def test_bert_pretraining_checkpoint_names_import():
    """The Hub's bert-base-uncased is a BertForPreTraining with LayerNorm gamma/beta: pooler and NSP dropped."""
    from scalelm.model.hf import hf_to_scalelm_state_dict

    hf = _perturbed(_bert)
    cfg = model_config_from_hf(hf.config.to_dict())
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in hf.state_dict().items()}
    sd.update({"bert.pooler.dense.weight": torch.zeros(64, 64), "cls.seq_relationship.weight": torch.zeros(2, 64)})
    ours = hf_to_scalelm_state_dict(sd, cfg)
    assert torch.equal(ours["emb_norm.weight"], hf.bert.embeddings.LayerNorm.weight)
    with pytest.raises(ConversionError, match="does not know"):
        hf_to_scalelm_state_dict({**sd, "bert.encoder.extra.weight": torch.zeros(1)}, cfg)


def _local_global(**kw):
    """ModernBERT's released layout: layer 0 and every third global, the others local (a bidirectional
    window of local_attention, here 8 < the 24-token test rows, with their own RoPE base)."""
    return ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, global_attn_every_n_layers=3, local_attention=8, global_rope_theta=160000.0,
        local_rope_theta=10000.0, cls_token_id=None, sep_token_id=None, **_NO_IDS, **kw))


def test_modernbert_local_and_global_layers_both_ways(tmp_path):
    hf = _perturbed(_local_global)
    assert hf.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    x, valid, _ = _inputs("modernbert")
    ref = _hf_logits(hf, x, valid, None)
    ours = from_hf(hf)
    cfg = ours.cfg
    assert (cfg.sliding_window, cfg.sliding_window_pattern, cfg.rope_local_theta) == (8, 3, 10000.0)
    assert [cfg.layer_window(i) for i in range(4)] == [None, 8, 8, None]
    _close(_ours(ours, x, valid, None), ref, valid)
    back = to_hf(ours)
    assert back.config.layer_types == hf.config.layer_types and back.config.local_attention == 8
    _close(_hf_logits(back, x, valid, None), ref, valid)
    # the window bites: without it (every layer global) the logits differ
    import dataclasses

    wide = build_model(dataclasses.replace(cfg, sliding_window=None, rope_local_theta=None)).eval()
    wide.load_state_dict(ours.state_dict())
    assert (_ours(wide, x, valid, None) - ref)[valid.bool()].abs().max() > 1e-2


def test_modernbert_irregular_layer_types_are_refused_by_name():
    cfg = _local_global().config.to_dict()
    cfg["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    with pytest.raises(ConversionError, match="layer_types.*global_attn_every_n_layers"):
        model_config_from_hf(cfg)


def test_unexportable_encoder_names_the_field():
    cfg = ModelConfig(arch="encoder", vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(ConversionError, match="pos_embedding='learned'.*ModernBertForMaskedLM"):
        hf_family(cfg)


# ----------------------------------------------------------------------------- the model itself

def _tiny(**kw):
    torch.manual_seed(0)
    base = dict(arch="encoder", vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64, gelu="erf")
    return build_model(ModelConfig(**{**base, **kw})).eval()


VARIANTS = {"bert": dict(norm_placement="post_add", type_vocab_size=2),
            "modern": dict(pos_embedding="rope", mlp="geglu", bias=False)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_attention_across_packed_documents(variant):
    """Changing document A's tokens leaves document B's hidden states (in the same row) unchanged, and B
    packed after A computes what B alone computes (positions restart at each document)."""
    from scalelm.model.masks import document_mask

    m = _tiny(**VARIANTS[variant])
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(2, V, (1, 10), generator=g), torch.randint(2, V, (1, 14), generator=g)
    doc = torch.tensor([[0] * 10 + [1] * 14])
    mask, pos = document_mask(doc, causal=False)
    with torch.no_grad():
        h = m.hidden_states(torch.cat([a, b], 1), attn_mask=mask, pos_ids=pos)
        a2 = torch.randint(2, V, (1, 10), generator=g)
        h2 = m.hidden_states(torch.cat([a2, b], 1), attn_mask=mask, pos_ids=pos)
        alone = m.hidden_states(b)
    assert not torch.allclose(h[0, :10], h2[0, :10])  # A itself did change
    assert torch.equal(h[0, 10:], h2[0, 10:])
    torch.testing.assert_close(h[0, 10:], alone[0], atol=1e-5, rtol=1e-5)
    full = m.hidden_states(torch.cat([a2, b], 1))  # without the mask B does see A: the mask is what stops it
    assert not torch.allclose(full[0, 10:], h2[0, 10:])


def test_attention_is_bidirectional_and_padding_is_masked():
    m = _tiny(**VARIANTS["modern"])
    x = torch.randint(2, V, (1, 12))
    with torch.no_grad():
        h = m.hidden_states(x)
        y = x.clone()
        y[0, -1] = (y[0, -1] + 1) % V
        assert not torch.allclose(m.hidden_states(y)[0, 0], h[0, 0])  # the first token sees the last
        valid = torch.ones(1, 16, dtype=torch.bool)
        valid[0, 12:] = False
        padded = torch.cat([x, torch.randint(2, V, (1, 4))], 1)
        torch.testing.assert_close(m.hidden_states(padded, attn_mask=valid)[0, :12], h[0], atol=1e-5, rtol=1e-5)


def test_head_runs_only_on_the_gathered_rows():
    m = _tiny(**VARIANTS["bert"])
    x = torch.randint(2, V, (2, 20))
    targets = torch.full_like(x, IGNORE_INDEX)
    targets[0, 3], targets[1, 7], targets[1, 19] = 5, 9, 11
    seen = []
    m.head_dense.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    logits, loss = m(x, targets)
    assert seen == [torch.Size([3, 64])] and logits.shape == (3, V)  # 3 rows, never 2 x 20
    with torch.no_grad():  # the same numbers as the full logits at those positions
        full = m(x)[0]
        ref = torch.nn.functional.cross_entropy(full[targets != IGNORE_INDEX], targets[targets != IGNORE_INDEX])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # the loss depends on nothing at the unmasked positions' outputs: break the head there and it stays
    orig = m.head_logits

    def poisoned(h):
        out = orig(h)
        return out if out.shape[0] == 3 else out + float("nan")

    m.head_logits = poisoned
    assert torch.equal(m(x, targets)[1], loss)


def test_no_masked_position_gives_a_zero_loss_with_gradients():
    m = _tiny(**VARIANTS["modern"]).train()
    x = torch.randint(2, V, (1, 8))
    _, loss = m(x, torch.full_like(x, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and m.tok_emb.weight.grad is not None


def test_config_checks():
    ok = dict(arch="encoder", vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=32)
    for bad, match in ((dict(attn_softcap=5.0), "attn_softcap is for arch=gpt"),
                       (dict(norm_placement="sandwich"), "norm_placement='sandwich' is for arch=gpt"),
                       (dict(n_shared_blocks=1), "n_shared_blocks is for arch=gpt"),
                       (dict(type_vocab_size=-1), "type_vocab_size must be")):
        with pytest.raises(ConfigError, match=match):
            ModelConfig(**ok, **bad).validate()
    with pytest.raises(ConfigError, match="post_add.*arch=encoder"):
        ModelConfig(norm_placement="post_add").validate()
    with pytest.raises(ConfigError, match="type_vocab_size.*arch=encoder"):
        ModelConfig(type_vocab_size=2).validate()


def test_flops_count_the_head_at_the_masked_share_only():
    cfg = ModelConfig(arch="encoder", vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64)
    gpt = ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64)
    d = 64
    head_gpt, head_enc = 2 * d * V, 2 * MLM_FRACTION * (d * d + d * V)
    assert flops_per_token(cfg, 32, training=False) == encoder_flops_per_token(cfg, 32, training=False)
    assert flops_per_token(cfg, 32, training=False) - (flops_per_token(gpt, 32, training=False) - head_gpt) \
        == int(head_enc)
    assert _tiny().flops_per_token(32) == 3 * flops_per_token(cfg, 32, training=False)


def test_bert_base_preset_has_bert_bases_shape_and_count():
    cfg = apply_preset(Config(), "bert-base").model
    with torch.device("meta"):
        ours = build_model(cfg)
        hf = BertForMaskedLM(BertConfig())  # bert-base-uncased's config (the class's defaults)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == 109_514_298
    assert hf_family(cfg) == "bert"
    assert model_config_from_hf(BertConfig().to_dict()) == cfg


@pytest.mark.parametrize("name", ["bert-small", "bert-mini", "encoder-cpu"])
def test_encoder_presets_build_and_export_family(name):
    cfg = apply_preset(Config(), name).model
    with torch.device("meta"):
        assert isinstance(build_model(cfg), Encoder)
    assert hf_family(cfg) in ("bert", "modernbert")
