import dataclasses

import pytest
import torch

from scalelm.config import Config, ModelConfig, apply_preset
from scalelm.model import GPT, PreallocatedKVCache, flops_per_token
from scalelm.model.loss import IGNORE_INDEX

GPT2ISH = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
LLAMAISH = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                       pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
SHAPES = {"gpt2": GPT2ISH, "llama": LLAMAISH,
          "mqa": dataclasses.replace(LLAMAISH, n_kv_head=1),
          "shared": dataclasses.replace(GPT2ISH, n_layer=4, n_shared_blocks=2)}


@pytest.mark.parametrize("name", SHAPES)
def test_shapes_dtypes_and_loss(name):
    torch.manual_seed(0)
    m = GPT(SHAPES[name])
    idx = torch.randint(0, 97, (3, 16))
    logits, loss = m(idx)
    assert logits.shape == (3, 16, 97) and logits.dtype == torch.float32 and loss is None
    logits, loss = m(idx, idx)
    assert loss.ndim == 0 and 3.5 < loss.item() < 5.5  # ~ln(97) at init
    last, _ = m(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb, lossb = m(idx, idx)
    assert lossb.dtype == torch.float32 and abs(lossb.item() - loss.item()) < 0.05


@pytest.mark.parametrize("name", SHAPES)
def test_causality(name):
    torch.manual_seed(0)
    m = GPT(SHAPES[name]).eval()
    idx = torch.randint(0, 97, (2, 20))
    a, _ = m(idx)
    idx2 = idx.clone()
    idx2[:, 12:] = torch.randint(0, 97, (2, 8))
    b, _ = m(idx2)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_ignore_index_excludes_padding():
    torch.manual_seed(0)
    m = GPT(GPT2ISH)
    idx = torch.randint(0, 97, (2, 10))
    tgt = idx.clone()
    tgt[:, 5:] = IGNORE_INDEX
    logits, loss = m(idx, tgt)
    ref = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, 97), idx[:, :5].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_gqa_with_all_heads_equals_mha():
    torch.manual_seed(0)
    mha = GPT(dataclasses.replace(LLAMAISH, n_kv_head=None))
    gqa = GPT(dataclasses.replace(LLAMAISH, n_kv_head=4))
    gqa.load_state_dict(mha.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(mha(idx)[0], gqa(idx)[0], rtol=0, atol=0)


def test_tied_weights_share_storage():
    m = GPT(GPT2ISH)
    assert m.lm_head.weight.data_ptr() == m.tok_emb.weight.data_ptr()
    m2 = GPT(LLAMAISH)
    assert m2.lm_head.weight.data_ptr() != m2.tok_emb.weight.data_ptr()


def test_cross_layer_sharing_reuses_blocks():
    cfg = SHAPES["shared"]
    m = GPT(cfg)
    assert len(m.blocks) == 2 and m.layer_keys == ["0", "1", "0", "1"]
    unshared = GPT(dataclasses.replace(cfg, n_shared_blocks=None))
    assert m.num_params() < unshared.num_params()


@pytest.mark.parametrize("preset,count", [
    ("gpt2-124m", 124_439_808), ("gpt2-350m", 354_823_168), ("gpt2-774m", 774_030_080),
    ("gpt2-1.5b", 1_557_611_200), ("llama-1b", 1_235_814_400), ("llama3-8b", 8_030_261_248),
])
def test_preset_param_counts_match_published(preset, count):
    cfg = apply_preset(Config(), preset).model
    with torch.device("meta"):
        m = GPT(cfg)
    assert m.num_params() == count


def test_flops_per_token_counts_every_matmul():
    """FLOPs formula equals 6 x (matmul weights) + attention, checked against the modules."""
    for cfg in SHAPES.values():
        if cfg.n_shared_blocks:
            continue
        m = GPT(cfg)
        linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
        T = 16
        attn = 2 * 2 * cfg.n_layer * T * cfg.n_embd
        assert flops_per_token(cfg, T) == 3 * (2 * linear + attn)
        assert flops_per_token(cfg, T, training=False) == 2 * linear + attn


@pytest.mark.parametrize("name", ["gpt2", "llama", "mqa"])
def test_kv_cache_matches_full_forward(name):
    torch.manual_seed(0)
    m = GPT(SHAPES[name]).eval()
    idx = torch.randint(0, 97, (2, 12))
    full, _ = m(idx)
    cache = PreallocatedKVCache(m.cfg, batch_size=2)
    out0, _ = m(idx[:, :7], kv_cache=cache)
    steps = [m(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(7, 12)]
    inc = torch.cat([out0] + steps, dim=1)
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_left_padding_matches_unpadded():
    torch.manual_seed(0)
    m = GPT(SHAPES["llama"]).eval()
    short = torch.randint(0, 97, (1, 5))
    ref, _ = m(short)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    cache = PreallocatedKVCache(m.cfg, batch_size=1)
    cache.reset(start=torch.tensor([3]))
    out, _ = m(padded, kv_cache=cache)
    torch.testing.assert_close(out[:, 3:], ref, rtol=1e-5, atol=1e-5)


def test_too_long_sequence_is_a_clear_error():
    m = GPT(GPT2ISH)
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        m(torch.zeros(1, 33, dtype=torch.long))
