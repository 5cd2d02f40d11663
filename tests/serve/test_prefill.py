"""Chunked prefill (scalelm/serve/prefill.py): running rows decode between a long prompt's chunks,
and every output equals the one without chunking.

Greedy tokens must be equal; logprobs to 1e-4: a chunk after the first attends to the slots before
it through an explicit causal mask (SDPA's masked kernel) where a whole prompt uses ``is_causal``,
so the last bits may differ.
"""

import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.generate.generator import Generator
from scalelm.generate.sampling import SamplingParams
from scalelm.model import GPT
from scalelm.serve.engine import Engine, Seq, SeqParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GREEDY = SamplingParams(temperature=0.0)
LONG = 200


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return Generator(GPT(ModelConfig(vocab_size=300, block_size=256, n_layer=2, n_head=4, n_embd=64, n_kv_head=2,
                                     pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                     tie_embeddings=False, init_std=0.3)), None, [0])


def schedule(g, chunk: int, long_params: SeqParams, cache_mb: float = 0):
    """Two rows decode; a LONG-token prompt arrives after two steps. Returns each sequence's events
    and, per step while the long prompt was prefilling, (tokens the running rows got, prompt tokens in)."""
    eng = Engine(g, max_batch=4, prefill_chunk=chunk, prefix_cache_mb=cache_mb)
    got: dict[int, list] = {}

    def push(evs):
        for e in evs:
            got.setdefault(e.index, []).append(e)

    p = SeqParams(60, GREEDY, logprobs=1, ignore_eos=True)
    long = Seq(2, [(7 * i) % 299 + 1 for i in range(LONG)], long_params, push)
    eng.submit([Seq(0, [5, 6, 7], p, push), Seq(1, [9] * 5, p, push)])
    steps = []
    with torch.inference_mode():
        eng.step()
        eng.step()
        eng.submit([long])
        while eng.busy:
            before = sum(len(got.get(i, [])) for i in (0, 1))
            eng.step()
            if eng.prefilling:
                steps.append((sum(len(got.get(i, [])) for i in (0, 1)) - before, eng.prefilling[0].done))
    return got, steps


def tokens(evs):
    return [e.token for e in evs if e.token is not None], [e.logprob for e in evs if e.token is not None]


def test_running_rows_decode_between_chunks_and_outputs_equal_unchunked(gen):
    lp = SeqParams(12, GREEDY, logprobs=1, ignore_eos=True)
    whole, whole_steps = schedule(gen, 0, lp)
    chunked, steps = schedule(gen, 32, lp)
    assert whole_steps == []  # unchunked: the prompt is in within the step that admits it
    # chunked: 200 tokens in 32-token chunks, one a step, each step both running rows got a token
    assert [done for _, done in steps] == [32, 64, 96, 128, 160, 192]
    assert all(n == 2 for n, _ in steps)
    for i in range(3):
        (ta, la), (tb, lb) = tokens(chunked[i]), tokens(whole[i])
        assert ta == tb, i
        assert la == pytest.approx(lb, abs=1e-4), i
    want = gen.generate([[(7 * i) % 299 + 1 for i in range(LONG)]], max_new_tokens=12, sampling=GREEDY)[0]
    assert tokens(chunked[2])[0] == want.tokens


def test_chunked_prompt_logprobs_equal_whole_ones(gen):
    echo = SeqParams(0, GREEDY, logprobs=2, prompt_logprobs=True)
    whole, _ = schedule(gen, 0, echo)
    chunked, steps = schedule(gen, 48, echo)
    assert len(steps) == 4  # 200 tokens: 48, 96, 144, 192 in after four steps, the rest in the fifth
    a, b = chunked[2][0].prompt_logprobs, whole[2][0].prompt_logprobs
    assert len(a) == len(b) == LONG and a[0] == b[0] == (None, None)
    assert [x[0] for x in a[1:]] == pytest.approx([x[0] for x in b[1:]], abs=1e-4)
    assert [[t for t, _ in x[1]] for x in a[1:]] == [[t for t, _ in x[1]] for x in b[1:]]


def test_chunked_prefill_with_the_prefix_cache(gen):
    """The long prompt is sent twice: the second reuses its blocks and prefills only the rest, in chunks."""
    lp = SeqParams(12, GREEDY, logprobs=1, ignore_eos=True)
    whole, _ = schedule(gen, 0, lp)
    eng = Engine(gen, max_batch=4, prefill_chunk=32, prefix_cache_mb=8)
    got: dict[int, list] = {}
    push = lambda evs: [got.setdefault(e.index, []).append(e) for e in evs]  # noqa: E731
    prompt = [(7 * i) % 299 + 1 for i in range(LONG)]
    with torch.inference_mode():
        for i in range(2):
            eng.submit([Seq(i, prompt, lp, push)])
            while eng.busy:
                eng.step()
    assert eng.prefix.hit_tokens == 192  # 12 blocks of 16; the last 8 tokens are prefilled
    for i in range(2):
        (ta, la), (tb, lb) = tokens(got[i]), tokens(whole[2])
        assert ta == tb
        assert la == pytest.approx(lb, abs=1e-4)


def test_a_lone_long_prompt_is_prefilled_whole(gen):
    eng = Engine(gen, max_batch=4, prefill_chunk=16)
    got = []
    with torch.inference_mode():
        eng.submit([Seq(0, list(range(1, 101)), SeqParams(3, GREEDY, ignore_eos=True), got.extend)])
        eng.step()
    assert [e.token is not None for e in got] == [True]  # no row decoding: no reason to chunk


def test_a_lone_row_takes_the_fast_path_and_decodes_as_the_generator(gen):
    """One active row (or rows of one length): a slice write and no mask, whatever --batch-size is; the
    batch cache grows with the rows in use."""
    eng = Engine(gen, max_batch=16)
    got = []
    prompt = list(range(1, 40))
    with torch.inference_mode():
        eng.submit([Seq(0, prompt, SeqParams(20, GREEDY, ignore_eos=True), got.extend)])
        eng.step()
        eng.cache.begin(1)
        assert eng.cache._same == len(prompt) and eng.cache._mask is None and eng.cache._rows is None
        assert eng.cache.k.shape[1] == 1  # the batch cache holds the rows in use, not --batch-size rows
        while eng.busy:
            eng.step()
    want = gen.generate([prompt], max_new_tokens=20, sampling=GREEDY)[0].tokens
    assert [e.token for e in got if e.token is not None] == want
    # two rows of one length: the same slice write for both
    got2: dict[int, list] = {}
    push = lambda evs: [got2.setdefault(e.index, []).append(e.token) for e in evs]  # noqa: E731
    other = list(range(100, 139))
    with torch.inference_mode():
        eng.submit([Seq(0, prompt, SeqParams(20, GREEDY, ignore_eos=True), push),
                    Seq(1, other, SeqParams(20, GREEDY, ignore_eos=True), push)])
        eng.step()
        eng.cache.begin(2)
        assert eng.cache._same == len(prompt) and eng.cache._mask is None and eng.cache.k.shape[1] == 2
        while eng.busy:
            eng.step()
    assert [t for t in got2[0] if t is not None] == want
    assert [t for t in got2[1] if t is not None] == gen.generate([other], max_new_tokens=20, sampling=GREEDY)[0].tokens


def test_serve_checks_the_new_flags(tmp_path, capsys):
    pytest.importorskip("fastapi")
    from scalelm.cli import main

    assert main(["serve", str(tmp_path), "--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk=-1 is invalid: must be >= 0" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--prefix-cache-mb", "nan"]) == 2
    assert "--prefix-cache-mb=nan is invalid" in capsys.readouterr().err


def test_prompts_admitted_together_share_one_padded_forward(gen, monkeypatch):
    prompts = [list(range(1, 21)), list(range(50, 68)), [9] * 15, list(range(200, 212)), [4]]
    lp = SeqParams(8, GREEDY, logprobs=1, ignore_eos=True)

    def run(together):
        eng = Engine(gen, max_batch=8, prefix_cache_mb=0)
        got: dict[int, list] = {}
        push = lambda evs: [got.setdefault(e.index, []).append(e) for e in evs]  # noqa: E731
        seqs = [Seq(i, p, lp, push) for i, p in enumerate(prompts)]
        with torch.inference_mode():
            for batch in ([seqs] if together else [[s] for s in seqs]):
                eng.submit(batch)
                while eng.busy:
                    eng.step()
        return [tokens(got[i]) for i in range(len(prompts))]

    calls = []
    hidden = type(gen.model).hidden_states
    monkeypatch.setattr(type(gen.model), "hidden_states", lambda self, x, **kw: (calls.append(tuple(x.shape)),
                                                                                 hidden(self, x, **kw))[1])
    alone = run(False)
    calls.clear()
    together = run(True)
    # 20, 18, 15 and 12 tokens padded to 20 (80 slots for 65 tokens); a 1-token prompt would take the
    # padding over 1.5x (100 slots for 66 tokens), so it runs alone; after that, one-token decode steps
    assert calls[:2] == [(4, 20), (1, 1)] and all(c[1] == 1 for c in calls[2:])
    for i, ((ta, la), (tb, lb)) in enumerate(zip(together, alone)):
        assert ta == tb == gen.generate([prompts[i]], max_new_tokens=8, sampling=GREEDY)[0].tokens, i
        assert la == pytest.approx(lb, abs=1e-4), i


def test_a_prompt_cancelled_while_prefilling_leaves_and_the_rows_go_on(gen):
    eng = Engine(gen, max_batch=4, prefill_chunk=16)
    got: dict[int, list] = {}
    push = lambda evs: [got.setdefault(e.index, []).append(e) for e in evs]  # noqa: E731
    running = Seq(0, [5, 6, 7], SeqParams(30, GREEDY, ignore_eos=True), push)
    long = Seq(1, list(range(1, 151)), SeqParams(5, GREEDY, ignore_eos=True), push)
    with torch.inference_mode():
        eng.submit([running])
        eng.step()
        eng.submit([long])
        eng.step()
        eng.step()
        assert eng.prefilling and eng.prefilling[0].done == 32
        eng.cancel([long])
        eng.step()
        assert not eng.prefilling and eng.rows == [running]
        while eng.busy:
            eng.step()
    assert 1 not in got and len([e for e in got[0] if e.token is not None]) == 30


def test_groups_keep_padding_and_size_bounded():
    from types import SimpleNamespace

    from scalelm.serve.prefill import MAX_GROUP_TOKENS, groups

    jobs = [SimpleNamespace(want_all=False, done=0) for _ in range(6)]
    sizes = lambda plan: [[n for _, n in g] for g in groups(plan)]  # noqa: E731
    assert sizes(list(zip(jobs, [20, 18, 15, 12, 1]))) == [[20, 18, 15, 12], [1]]
    long = MAX_GROUP_TOKENS // 2
    assert sizes(list(zip(jobs, [long, long, long]))) == [[long, long], [long]]  # 2 x long fills a group
    assert sizes(list(zip(jobs, [3 * long, 8]))) == [[3 * long], [8]]  # a prompt over the cap runs alone
    echo = SimpleNamespace(want_all=True, done=0)
    cached = SimpleNamespace(want_all=False, done=16)
    assert sizes([(jobs[0], 10), (echo, 10), (cached, 10), (jobs[1], 10)]) == [[10], [10, 10], [10]]
