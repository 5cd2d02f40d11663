"""The encoder-decoder Transformer: masks, cached decoding, beams, tying, saving, training."""

import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.generate.sampling import SamplingParams
from scalelm.generate.seq2seq import Seq2SeqGenerator
from scalelm.model.build import build_model
from scalelm.model.encdec import EncoderDecoder, flops_per_token
from scalelm.model.io import load_model_dir, save_model_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")
V, EOS = 50, 0
SHAPES = {"paper": dict(), "llama": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                         n_kv_head=2)}


def tiny(shape="paper", seed=0, **kw) -> EncoderDecoder:
    torch.manual_seed(seed)
    kw.setdefault("vocab_size", V)
    cfg = ModelConfig(arch="encoder-decoder", block_size=32, n_layer=2, n_encoder_layer=2,
                      n_decoder_layer=3, n_head=4, n_embd=32, init_std=0.2, **{**SHAPES[shape], **kw})
    return build_model(cfg).eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_source_padding_is_never_attended(shape):
    m = tiny(shape)
    src = torch.tensor([[5, 6, 7, 8]])
    tgt = torch.tensor([[EOS, 9, 10]])
    ref = m(src, tgt)[0]
    for pad in (0, 17, 33):  # whatever sits in the padding, the real positions see the same
        padded = torch.tensor([[5, 6, 7, 8, pad, pad, pad]])
        valid = torch.tensor([[True] * 4 + [False] * 3])
        out = m(padded, tgt, src_valid=valid)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        enc = m.encode(padded, valid)[:, :4]
        torch.testing.assert_close(enc, m.encode(src), atol=1e-5, rtol=1e-5)


def test_the_decoder_is_causal():
    m = tiny()
    src = torch.tensor([[5, 6, 7]])
    a = m(src, torch.tensor([[EOS, 9, 10, 11]]))[0]
    b = m(src, torch.tensor([[EOS, 9, 10, 40]]))[0]
    torch.testing.assert_close(a[:, :3], b[:, :3])


def test_embeddings_and_output_layer_are_one_matrix():
    m = tiny()
    assert m.lm_head.weight is m.tok_emb.weight
    assert flops_per_token(m.cfg) > 0


@torch.no_grad()
def greedy_uncached(m, src: list[int], n: int) -> list[int]:
    out = [EOS]
    for _ in range(n):
        logits = m(torch.tensor([src]), torch.tensor([out]))[0]
        t = int(logits[0, -1].argmax())
        if t == EOS:
            break
        out.append(t)
    return out[1:]


@pytest.mark.parametrize("shape", SHAPES)
def test_cached_decoding_equals_uncached_token_for_token(shape):
    m = tiny(shape, seed=1)
    gen = Seq2SeqGenerator(m, eos_ids=[EOS])
    sources = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]  # different lengths: padded batch
    out = gen.generate(sources, max_new_tokens=10, sampling=SamplingParams(temperature=0))
    for src, c in zip(sources, out):
        assert c.tokens == greedy_uncached(m, src, 10)


def test_beam_search_one_beam_is_greedy_and_batches_like_alone():
    m = tiny(seed=2)
    gen = Seq2SeqGenerator(m, eos_ids=[EOS])
    sources = [[5, 6, 7, 8], [9, 10], [20, 21, 22]]
    greedy = gen.generate(sources, max_new_tokens=8, sampling=SamplingParams(temperature=0))
    one = gen.beam_search(sources, num_beams=1, max_new_tokens=8)
    assert [c.tokens for c in one] == [c.tokens for c in greedy]
    together = gen.beam_search(sources, num_beams=3, max_new_tokens=8)
    alone = [gen.beam_search([s], num_beams=3, max_new_tokens=8)[0] for s in sources]
    assert [c.tokens for c in together] == [c.tokens for c in alone]


def test_save_and_load_round_trip(tmp_path):
    m = tiny("llama")
    save_model_dir(m, tmp_path / "m")
    back = load_model_dir(tmp_path / "m")
    assert isinstance(back, EncoderDecoder)
    src, tgt = torch.tensor([[5, 6, 7]]), torch.tensor([[EOS, 9]])
    torch.testing.assert_close(back(src, tgt)[0], m(src, tgt)[0])


def test_label_smoothing_raises_the_loss_of_a_confident_model():
    m = tiny()
    src, tgt, y = torch.tensor([[5, 6]]), torch.tensor([[EOS, 9]]), torch.tensor([[9, EOS]])
    assert m(src, tgt, y, label_smoothing=0.1)[1] != m(src, tgt, y)[1]


def test_from_checkpoint_and_the_plain_generator_refuses_an_encoder_decoder(tmp_path, tiny_tokenizer_json):
    from scalelm.generate.generator import GenerationError, Generator

    m = tiny(vocab_size=300)
    save_model_dir(m, tmp_path / "m", tiny_tokenizer_json)
    gen = Seq2SeqGenerator.from_checkpoint(tmp_path / "m", device="cpu")
    assert isinstance(gen.model, EncoderDecoder)
    out = gen.generate(["hello there"], max_new_tokens=4)[0]
    assert isinstance(out.text, str) and len(out.tokens) <= 4
    with pytest.raises(GenerationError, match="encoder-decoder"):
        Generator(m, eos_ids=[EOS])
