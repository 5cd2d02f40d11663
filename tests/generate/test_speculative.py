"""Speculative decoding: greedy equals plain greedy, sampling has the target's distribution, batches
with rows that accept different numbers of drafts, prompt lookup, limits, and the CLI."""

import copy
import dataclasses
import json

import pytest
import torch
from conftest import run_cli

from scalelm import cli
from scalelm.config import ModelConfig
from scalelm.generate.generator import GenerationError, Generator
from scalelm.generate.sampling import SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p
from scalelm.generate.speculative import lookup_proposal
from scalelm.model import GPT
from scalelm.model.io import save_model_dir

GREEDY = SamplingParams(temperature=0.0)
V = 300  # the vocabulary of the `tiny_tokenizer_json` fixture
PROMPTS = [[5, 6, 7], list(range(10, 23)), [42], [7, 8, 9, 7, 8, 9, 7, 8], [100, 101]]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny(seed=0, vocab=V, block_size=64, rope=False, **kw) -> GPT:
    torch.manual_seed(seed)
    shape = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2) if rope else {}
    cfg = dict(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False,
               init_std=0.3, **shape)
    return GPT(ModelConfig(**{**cfg, **kw})).eval()


def noisy(m: GPT, scale: float, seed: int = 3) -> GPT:
    """The model with noise on every weight: a draft that agrees with it often, not always."""
    d = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return d


def plain(m: GPT, prompts, n: int, **kw):
    return Generator(m, **{k: v for k, v in kw.items() if k in ("tokenizer", "eos_ids")}).generate(
        prompts, max_new_tokens=n, sampling=kw.get("sampling", GREEDY), stop=kw.get("stop", ()))


# ----------------------------------------------------------------------------- greedy

@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("proposer", ["small-draft", "noisy-draft", "lookup"])
@pytest.mark.parametrize("rope", [False, True], ids=["learned", "rope"])
def test_greedy_equals_plain_greedy_for_a_batch(k, proposer, rope):
    m = tiny(rope=rope)
    want = [c.tokens for c in plain(m, PROMPTS, 30)]
    kw = {"small-draft": dict(draft=tiny(1, rope=rope, n_layer=1, n_embd=32, n_head=2)),
          "noisy-draft": dict(draft=noisy(m, 0.05)), "lookup": dict(prompt_lookup=3)}[proposer]
    out = Generator(m, speculate_k=k, **kw).generate(PROMPTS, max_new_tokens=30, sampling=GREEDY)
    assert [c.tokens for c in out] == want
    assert all(c.finish_reason == "length" and len(c.tokens) == 30 for c in out)
    assert all(c.steps <= 30 and c.accepted <= c.drafted for c in out)
    if proposer == "noisy-draft":  # rows accepted different numbers of drafts: the realignment was exercised
        assert len({c.accepted for c in out}) > 1 and sum(c.accepted for c in out) > 0
        assert sum(c.steps for c in out) < 5 * 30  # fewer target forwards than tokens


def test_the_target_as_its_own_draft_accepts_everything():
    m = tiny(rope=True)
    want = [c.tokens for c in plain(m, PROMPTS, 25)]
    for k in (1, 4):
        out = Generator(m, draft=m, speculate_k=k).generate(PROMPTS, max_new_tokens=25, sampling=GREEDY)
        assert [c.tokens for c in out] == want
        assert [c.acceptance_rate for c in out] == [1.0] * len(PROMPTS)
        assert all(c.steps == -(-25 // (k + 1)) for c in out)  # k + 1 tokens per target forward


def test_greedy_with_repetition_penalty_equals_plain():
    m = tiny()
    s = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    want = [c.tokens for c in plain(m, PROMPTS, 25, sampling=s)]
    for kw in (dict(draft=noisy(m, 0.05)), dict(prompt_lookup=2)):
        out = Generator(m, speculate_k=3, **kw).generate(PROMPTS, max_new_tokens=25, sampling=s)
        assert [c.tokens for c in out] == want


@pytest.mark.parametrize("rope", [False, True], ids=["learned", "rope"])
def test_past_the_context_a_row_slides_as_plain_decoding_does(rope):
    m = tiny(rope=rope, block_size=16)
    want = plain(m, [[1, 2, 3, 4, 5]], 40)[0].tokens
    for kw in (dict(draft=noisy(m, 0.05)), dict(draft=m), dict(prompt_lookup=2)):
        out = Generator(m, speculate_k=3, **kw).generate([1, 2, 3, 4, 5], max_new_tokens=40,
                                                                     sampling=GREEDY)[0]
        assert out.tokens == want
    # a batch slides when its longest row fills the context (not where plain decoding would): lengths hold
    out = Generator(m, draft=noisy(m, 0.05), speculate_k=3).generate(PROMPTS, max_new_tokens=40,
                                                                               sampling=GREEDY)
    assert [len(c.tokens) for c in out] == [40] * len(PROMPTS)


def test_a_draft_with_a_smaller_context_slides_on_its_own():
    m = tiny(rope=True)
    d = noisy(m, 0.05)
    d.cfg = dataclasses.replace(m.cfg, block_size=8)  # the draft sees only its last tokens
    want = [c.tokens for c in plain(m, PROMPTS, 30)]
    out = Generator(m, draft=d, speculate_k=4).generate(PROMPTS, max_new_tokens=30, sampling=GREEDY)
    assert [c.tokens for c in out] == want and sum(c.accepted for c in out) > 0


def test_bfloat16_runs():
    m = tiny().to(torch.bfloat16)
    out = Generator(m, draft=m, speculate_k=3).generate(PROMPTS, max_new_tokens=8, sampling=GREEDY)
    assert all(len(c.tokens) == 8 for c in out)


# ----------------------------------------------------------------------------- eos, stop, stream

def test_eos_stop_strings_and_streaming_behave_as_in_plain_decoding(tiny_tokenizer_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tiny_tokenizer_json)
    m = tiny()
    draft = noisy(m, 0.05)
    prompts = ["To be, or not", "First Citizen:", "And"]

    free = Generator(m, tok).generate(prompts, max_new_tokens=30, sampling=GREEDY)
    eos = free[0].tokens[3]  # row 0's 4th token as end-of-text: rows end at its first occurrence
    for kw in (dict(eos_ids=[eos]), dict(stop=[free[1].text[8:11]]), {}):
        eos_ids = kw.pop("eos_ids", ())
        want = Generator(m, tok, eos_ids=eos_ids).generate(prompts, max_new_tokens=30, sampling=GREEDY, **kw)
        spec = Generator(m, tok, eos_ids=eos_ids, draft=draft, speculate_k=4)
        got = spec.generate(prompts, max_new_tokens=30, sampling=GREEDY, **kw)
        assert [(c.tokens, c.text, c.finish_reason) for c in got] == \
            [(c.tokens, c.text, c.finish_reason) for c in want]
        # streaming: per row, the same tokens and text as generate; one closing event per row, last
        texts, tokens, closed = [""] * 3, [[], [], []], []
        for ev in spec.stream(prompts, max_new_tokens=30, sampling=GREEDY, **kw):
            assert ev.index not in closed
            texts[ev.index] += ev.text
            if ev.token is not None:
                tokens[ev.index].append(ev.token)
            if ev.finish_reason:
                closed.append(ev.index)
        assert sorted(closed) == [0, 1, 2]
        assert texts == [c.text for c in want] and tokens == [c.tokens for c in want]
        assert any(c.finish_reason != "length" for c in want) == bool(kw or eos_ids)  # eos / stop did happen


# ----------------------------------------------------------------------------- sampling distribution

def exact_first_two(m: GPT, prompt: list[int], s: SamplingParams) -> torch.Tensor:
    """P(t1, t2) of plain sampling (V, V), from the same transforms as next_token."""
    def dist(seq):
        logits = m(torch.tensor([seq]))[0][0, -1].float()
        if s.repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            seen[seq] = True
            logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
        return filter_top_p(filter_top_k(logits[None] / s.temperature, s.top_k), s.top_p).softmax(-1)[0]

    with torch.no_grad():
        p1 = dist(prompt)
        return torch.stack([p1[a] * dist(prompt + [a]) for a in range(p1.numel())])


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, cells expected below 5 pooled into one."""
    from scipy.stats import chisquare

    n = counts.sum().item()
    exp = probs.flatten().double() * n
    obs = counts.flatten().double()
    small = exp < 5
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    obs = torch.cat([obs[~small], obs[small].sum()[None]])
    keep = exp > 0
    if obs[~keep].sum() > 0:  # a pair of tokens the distribution excludes was sampled
        return 0.0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp[keep].sum().item()).pvalue)


@pytest.mark.parametrize("case", ["draft-k1", "draft-k3", "draft-penalty", "lookup"])
def test_sampling_has_the_targets_distribution(case):
    """The first two tokens over 6,000 samples per prompt (one batch, fixed seed: deterministic) fit the
    target's exact joint distribution, and clearly do not fit the draft's."""
    cfg = dict(vocab=16, block_size=32, n_embd=32, n_head=2, init_std=0.15)
    m = tiny(0, **cfg)
    draft = tiny(5, n_layer=1, **cfg)
    s = SamplingParams(temperature=0.9, top_k=12, top_p=0.95,
                       repetition_penalty=1.3 if case == "draft-penalty" else 1.0)
    prompts = [[1, 2, 3, 1, 2], [4, 5, 6, 7, 4, 5, 6, 2, 9]] if case == "lookup" else [[1, 2, 3], [4, 5, 6, 7, 8]]
    kw = dict(prompt_lookup=3, speculate_k=3) if case == "lookup" else \
        dict(draft=draft, speculate_k=1 if case == "draft-k1" else 3)
    n = 6000
    gen = Generator(m, **kw)
    out = gen.generate(prompts, max_new_tokens=4, sampling=s, seed=1234, num_samples=n)
    rate = sum(c.accepted for c in out) / sum(c.drafted for c in out)
    assert (0.01 if case == "lookup" else 0.1) < rate < 0.95  # hundreds of acceptances and of rejections
    for i, prompt in enumerate(prompts):
        counts = torch.zeros(16, 16)
        for c in out[i * n:(i + 1) * n]:
            counts[c.tokens[0], c.tokens[1]] += 1
        want = exact_first_two(m, prompt, s)
        assert chi2_pvalue(counts, want) > 1e-3
        tv = 0.5 * (counts / n - want).abs().sum().item()
        assert tv < 0.06, tv
        if case != "lookup":  # the test has power: the draft's own distribution is far off
            assert 0.5 * (counts / n - exact_first_two(draft, prompt, s)).abs().sum().item() > 0.3


def test_sampling_is_reproducible_for_a_seed():
    m = tiny()
    s = SamplingParams(temperature=1.0, top_k=50)
    gen = Generator(m, draft=noisy(m, 0.05), speculate_k=3)
    a, b, c = (gen.generate(PROMPTS, max_new_tokens=15, sampling=s, seed=x) for x in (7, 7, 8))
    assert [x.tokens for x in a] == [x.tokens for x in b] != [x.tokens for x in c]


# ----------------------------------------------------------------------------- pieces and errors

def test_lookup_proposal_takes_the_longest_most_recent_match():
    assert lookup_proposal([1, 2, 3, 9, 1, 2, 4, 5, 1, 2], 3, 4) == [4, 5, 1, 2]  # "1 2" last seen before 4
    assert lookup_proposal([7, 1, 2, 3, 8, 5, 2, 3, 6, 1, 2, 3], 3, 2) == [8, 5]  # "1 2 3" beats the later "2 3"
    assert lookup_proposal([1, 2, 3], 3, 4) == []  # no earlier occurrence
    assert lookup_proposal([5, 5, 5], 2, 3) == [5]  # overlapping: the continuation ends at the sequence's end
    assert lookup_proposal([4], 3, 4) == []


def test_bad_settings_are_clear_errors():
    m = tiny()
    with pytest.raises(GenerationError, match=r"the draft model has a vocabulary of 200 tokens but the target "
                                              r"model has 300"):
        Generator(m, draft=tiny(vocab=200))
    with pytest.raises(GenerationError, match="speculate_k=0 is invalid"):
        Generator(m, draft=m, speculate_k=0)
    with pytest.raises(GenerationError, match="not both"):
        Generator(m, draft=m, prompt_lookup=2)
    with pytest.raises(GenerationError, match="--compile does not apply"):
        Generator(m, draft=m, compile=True)
    with pytest.raises(GenerationError, match="prompt_lookup=-1 is invalid"):
        Generator(m, prompt_lookup=-1)
    assert Generator(m).speculator is None


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer_json):
    root = tmp_path_factory.mktemp("spec")
    m = tiny(block_size=48)
    save_model_dir(m, root / "target", tokenizer_json=tiny_tokenizer_json)
    save_model_dir(noisy(m, 0.05), root / "draft", tokenizer_json=tiny_tokenizer_json)
    save_model_dir(tiny(vocab=256, n_layer=1), root / "vocab256")
    other = json.loads(tiny_tokenizer_json)  # same size, two tokens swapped: another tokenizer
    vocab = other["model"]["vocab"]
    a, b = list(vocab)[100], list(vocab)[101]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    save_model_dir(noisy(m, 0.05), root / "othertok", tokenizer_json=json.dumps(other))
    return root


def main(capsys, *args):
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("how", [["--draft", "DRAFT", "--speculate-k", "3"], ["--prompt-lookup", "2"]])
def test_cli_greedy_json_matches_plain_and_reports_acceptance(ckpts, capsys, how):
    how = [str(ckpts / "draft") if a == "DRAFT" else a for a in how]
    args = ["generate", ckpts / "target", "--prompt", "To be", "--prompt", "First Citizen:", "--temperature", "0",
            "--max-new-tokens", "20", "--json"]
    rc, want, _ = main(capsys, *args)
    rc2, got, err = main(capsys, *args, *how)
    assert rc == rc2 == 0
    rows_want, rows = [json.loads(x) for x in want.splitlines()], [json.loads(x) for x in got.splitlines()]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in rows_want]
    for r in rows:
        sp = r["speculative"]
        assert 0 <= sp["accepted"] <= sp["drafted"] and sp["target_forwards"] >= 1
        assert sp["acceptance_rate"] is None or sp["acceptance_rate"] == sp["accepted"] / sp["drafted"]
    assert "speculative: acceptance" in err and "tokens per target forward" in err
    assert "speculative decoding:" in err


def test_cli_streams_with_a_draft(ckpts):
    p = run_cli("generate", ckpts / "target", "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "15",
                "--draft", ckpts / "draft", "--stream", env={"OMP_NUM_THREADS": "1"})
    want = Generator.from_checkpoint(ckpts / "target").generate("To be", max_new_tokens=15, sampling=GREEDY)[0]
    assert p.stdout == want.text + "\n" and "speculative: acceptance" in p.stderr


@pytest.mark.parametrize("extra, message", [
    (["--draft", "vocab256"], r"the draft .*vocab256 has a vocabulary of 256 tokens but the target .*target has 300"),
    (["--draft", "othertok"], r"the draft .*othertok has another tokenizer.json than the target .*target"),
    (["--draft", "draft", "--prompt-lookup", "2"], "not both"),
    (["--speculate-k", "3"], "--speculate-k needs --draft"),
    (["--draft", "draft", "--speculate-k", "0"], "--speculate-k=0 is invalid"),
    (["--prompt-lookup", "-1"], "--prompt-lookup=-1 is invalid"),
    (["--draft", "draft", "--compile"], "--compile does not apply"),
    (["--draft", "draft", "--backend", "onnxruntime"], "need --backend torch"),
])
def test_cli_mismatched_draft_and_bad_options_exit_2_with_a_message(ckpts, capsys, extra, message):
    import re

    extra = [str(ckpts / a) if a in ("vocab256", "othertok", "draft") else a for a in extra]
    rc, _, err = main(capsys, "generate", ckpts / "target", "--prompt", "To be", "--max-new-tokens", "3", *extra)
    assert rc == 2 and re.search(message, err), err
