"""The decoding controls (repetition penalty, no repeated n-gram, least new tokens, beam length
penalty) give Hugging Face ``generate``'s tokens, greedy and with beams, on an exported GPT."""

import pytest
import torch
from train_helpers import one_thread  # noqa: F401

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from scalelm.config import ModelConfig  # noqa: E402
from scalelm.generate.generator import Generator  # noqa: E402
from scalelm.generate.sampling import SamplingError, SamplingParams, banned_ngram_tokens  # noqa: E402
from scalelm.model import GPT  # noqa: E402
from scalelm.model.hf import to_hf  # noqa: E402

PROMPTS = [[5, 17, 42, 8, 9], [33, 2, 2, 61, 7, 40, 12], [100, 101]]
N = 14


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0)).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init: loops for the controls to break
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    # end-of-text: a token greedy decoding reaches early, so that min_new_tokens and beams see it
    free = Generator(m, None, []).generate(PROMPTS[0], N, sampling=SamplingParams(temperature=0.0))[0].tokens
    eos = free[2]
    return m, to_hf(m, eos_id=eos, bos_id=eos), eos


def ours(m, eos, prompt, beams=1, **kw):
    gen = Generator(m, None, [eos])
    if beams > 1:
        return gen.beam_search(prompt, num_beams=beams, max_new_tokens=N, **kw)[0].tokens
    return gen.generate(prompt, N, sampling=SamplingParams(temperature=0.0, **kw))[0].tokens


def theirs(hf, eos, prompt, beams=1, **kw):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, num_beams=beams, max_new_tokens=N, eos_token_id=eos,
                      pad_token_id=eos, **kw)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos in out else out


CONTROLS = [{}, {"repetition_penalty": 1.8}, {"repetition_penalty": 0.7}, {"no_repeat_ngram_size": 2},
            {"no_repeat_ngram_size": 3}, {"min_new_tokens": 6}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
                                                                   "min_new_tokens": 4}]


@pytest.mark.parametrize("kw", CONTROLS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "none")
def test_greedy_equals_hf_generate(models, kw):
    m, hf, eos = models
    for p in PROMPTS:
        assert ours(m, eos, p, **kw) == theirs(hf, eos, p, **kw), p


@pytest.mark.parametrize("kw", [*CONTROLS[1:], {"length_penalty": 0.0}, {"length_penalty": 2.0},
                                {"length_penalty": -1.0, "early_stopping": False},
                                {"length_penalty": 2.0, "early_stopping": False, "no_repeat_ngram_size": 2}],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_beams_equal_hf_generate(models, kw):
    m, hf, eos = models
    for p in PROMPTS:
        assert ours(m, eos, p, beams=3, **kw) == theirs(hf, eos, p, beams=3, **{"early_stopping": True, **kw}), p


def test_the_controls_change_the_output(models):
    """So that the parity above is not vacuous: each control changes some greedy output here."""
    m, _, eos = models
    plain = [ours(m, eos, p) for p in PROMPTS]
    for kw in CONTROLS[1:]:
        assert [ours(m, eos, p, **kw) for p in PROMPTS] != plain, kw
    assert all(len(t) >= 6 for t in (ours(m, eos, p, min_new_tokens=6) for p in PROMPTS))
    for p in PROMPTS:
        t = ours(m, eos, p, no_repeat_ngram_size=2)
        seq = p + t
        assert len({tuple(seq[i:i + 2]) for i in range(len(seq) - 1)}) == len(seq) - 1  # no bigram twice


def test_banned_ngram_tokens():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 1, 2, 1], 2) == [2, 2]
    assert banned_ngram_tokens([1, 2], 1) == [1, 2]
    assert banned_ngram_tokens([1], 3) == []


def test_bad_controls_are_refused():
    for kw in ({"no_repeat_ngram_size": -1}, {"min_new_tokens": -2}, {"repetition_penalty": 0.0}):
        with pytest.raises(SamplingError):
            SamplingParams(**kw).validate()


# ----------------------------------------------------------------------------- the encoder-decoder

def _reference_greedy(model, src, eos, n, rp=1.0, ngram=0, min_new=0):
    """Greedy decoding by full recomputation, each control as HF's logits processor (on the
    decoder's sequence: the start token and the output)."""
    seq = [eos]
    for step in range(n):
        with torch.no_grad():
            x = model(torch.tensor([src]), torch.tensor([seq]))[0][0, -1].float()
        if rp != 1.0:
            s = torch.tensor(sorted(set(seq)))
            x[s] = torch.where(x[s] < 0, x[s] * rp, x[s] / rp)
        for t in banned_ngram_tokens(seq, ngram):
            x[t] = float("-inf")
        if step < min_new:
            x[eos] = float("-inf")
        t = int(x.argmax())
        if t == eos:
            break
        seq.append(t)
    return seq[1:]


def test_encoder_decoder_controls_equal_a_reference_decoding():
    from scalelm.generate.seq2seq import Seq2SeqGenerator
    from scalelm.model.build import build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="encoder-decoder", vocab_size=300, block_size=48, n_layer=2, n_encoder_layer=1,
                                n_decoder_layer=2, n_head=2, n_embd=64, init_std=0.2)).eval()
    src, eos = [5, 17, 42, 8, 9, 77], 0
    for kw in ({}, {"rp": 1.6}, {"ngram": 2}, {"min_new": 5}, {"rp": 1.3, "ngram": 2, "min_new": 3}):
        want = _reference_greedy(m, src, eos, N, **kw)
        params = SamplingParams(temperature=0.0, repetition_penalty=kw.get("rp", 1.0),
                                no_repeat_ngram_size=kw.get("ngram", 0), min_new_tokens=kw.get("min_new", 0))
        gen = Seq2SeqGenerator(m, None, [eos])
        assert gen.generate([src], N, sampling=params)[0].tokens == want, kw
        if "rp" in kw:  # beams penalize log-probabilities (as HF's beam search), greedy the logits
            continue
        # one beam is greedy, the bans included
        assert gen.beam_search([src], num_beams=1, max_new_tokens=N, repetition_penalty=params.repetition_penalty,
                               no_repeat_ngram_size=params.no_repeat_ngram_size,
                               min_new_tokens=params.min_new_tokens)[0].tokens == want, kw
    plain = _reference_greedy(m, src, eos, N)
    assert _reference_greedy(m, src, eos, N, ngram=2) != plain  # the ban changes this output
