"""Beam search: one beam is greedy; enough beams find the exact best sequence (brute force)."""

import itertools

import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.generate.generator import GenerationError, Generator
from scalelm.generate.sampling import SamplingParams
from scalelm.model import GPT


def tiny(vocab=64, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    m = GPT(ModelConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so beams disagree with greedy
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return m


def seq_logprob(model: GPT, prompt: list[int], cont: list[int]) -> float:
    x = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0].float(), -1)[0]
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))


@pytest.mark.parametrize("rope", [False, True])
def test_one_beam_is_greedy_token_for_token(rope):
    kw = {"pos_embedding": "rope"} if rope else {}
    gen = Generator(tiny(**kw), eos_ids=[3])
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14]]  # different lengths: left padding
    greedy = gen.generate(prompts, max_new_tokens=12, sampling=SamplingParams(temperature=0))
    beams = gen.beam_search(prompts, num_beams=1, max_new_tokens=12)
    assert [c.tokens for c in beams] == [c.tokens for c in greedy]
    assert [c.finish_reason for c in beams] == [c.finish_reason for c in greedy]


def test_enough_beams_find_the_brute_force_best_sequence():
    V, n = 8, 3
    model = tiny(vocab=V, seed=1)
    gen = Generator(model, eos_ids=[])
    for prompt in ([1, 2], [4]):
        best = max(itertools.product(range(V), repeat=n), key=lambda c: seq_logprob(model, prompt, list(c)))
        out = gen.beam_search([prompt], num_beams=V * V, max_new_tokens=n)[0]
        assert out.tokens == list(best)


def test_finished_hypotheses_with_end_of_text_match_brute_force():
    """With length_penalty=0 the score is the summed log-probability of the tokens (end-of-text
    included): enough beams find the best over every sequence that ends or runs to the limit."""
    V, n, eos = 6, 3, 0
    model = tiny(vocab=V, seed=2)
    gen = Generator(model, eos_ids=[eos])
    prompt = [2, 3]
    cands = []
    for L in range(n + 1):
        for c in itertools.product(range(1, V), repeat=L):
            c = list(c)
            if L < n:
                cands.append((seq_logprob(model, prompt, c + [eos]), c))
            else:
                cands.append((seq_logprob(model, prompt, c), c))
    best = max(cands, key=lambda x: x[0])[1]
    out = gen.beam_search([prompt], num_beams=V ** n, max_new_tokens=n, length_penalty=0.0, early_stopping=False)[0]
    assert out.tokens == best


def test_beams_batch_like_one_prompt_at_a_time():
    gen = Generator(tiny(seed=3), eos_ids=[3])
    prompts = [[5, 6, 7], [9], [20, 21]]
    together = gen.beam_search(prompts, num_beams=4, max_new_tokens=10)
    alone = [gen.beam_search([p], num_beams=4, max_new_tokens=10)[0] for p in prompts]
    assert [c.tokens for c in together] == [c.tokens for c in alone]


def test_beam_search_scores_at_least_as_well_as_greedy():
    model = tiny(seed=4)
    gen = Generator(model, eos_ids=[])
    prompt = [7, 8]
    g = gen.generate([prompt], max_new_tokens=6, sampling=SamplingParams(temperature=0))[0].tokens
    b = gen.beam_search([prompt], num_beams=8, max_new_tokens=6)[0].tokens
    assert seq_logprob(model, prompt, b) >= seq_logprob(model, prompt, g) - 1e-5


def test_bad_arguments():
    gen = Generator(tiny(), eos_ids=[])
    with pytest.raises(GenerationError, match="num_beams"):
        gen.beam_search([[1]], num_beams=0)
    with pytest.raises(GenerationError, match="context"):
        gen.beam_search([list(range(40))], num_beams=2)
