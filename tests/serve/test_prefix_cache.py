"""The prefix cache (scalelm/serve/prefix_cache.py): the engine's outputs with it equal those without it.

Engines are stepped by hand (no thread, no server). Greedy tokens must be equal; logprobs to 1e-4:
a prompt that reuses cached blocks prefills its rest with an explicit causal mask over the cache
(SDPA's masked kernel) where the whole prompt uses ``is_causal``, so the last bits may differ.
"""

import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.generate.generator import Generator
from scalelm.generate.sampling import SamplingParams
from scalelm.model import GPT
from scalelm.serve.engine import Engine, Seq, SeqParams
from scalelm.serve.metrics import Metrics
from scalelm.serve.prefix_cache import PrefixCache, namespace

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GREEDY = SamplingParams(temperature=0.0)
KINDS = {
    "gpt2": {},
    "llama-gqa": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    # local layers of window 8 alternate with global ones: prompts longer than the window
    "window": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, sliding_window=8,
                   sliding_window_pattern=2),
}


def model(kind: str) -> Generator:
    torch.manual_seed(0)
    return Generator(GPT(ModelConfig(vocab_size=300, block_size=128, n_layer=2, n_head=4, n_embd=64,
                                     tie_embeddings=False, init_std=0.3, **KINDS[kind])), None, [0])


def run(g, prompts, together: bool, max_tokens=6, metrics=None, steer=None, **kw):
    """Each prompt's (tokens, logprobs) from an engine: all submitted at once, or one after another."""
    eng = Engine(g, max_batch=4, max_queue=64, metrics=metrics, **kw)
    got: dict[int, list] = {}

    def push(evs):
        for e in evs:
            got.setdefault(e.index, []).append(e)

    seqs = [Seq(i, p, SeqParams(max_tokens, GREEDY, logprobs=2, ignore_eos=True,
                                steer=steer[i] if steer else None), push) for i, p in enumerate(prompts)]
    with torch.inference_mode():
        for batch in ([seqs] if together else [[s] for s in seqs]):
            eng.submit(batch)
            while eng.busy:
                eng.step()
    out = [([e.token for e in got[i] if e.token is not None], [e.logprob for e in got[i] if e.token is not None])
           for i in range(len(prompts))]
    return out, eng


def assert_same(a, b):
    for i, ((ta, la), (tb, lb)) in enumerate(zip(a, b)):
        assert ta == tb, i
        assert la == pytest.approx(lb, abs=1e-4), i


def shared_prompts():
    torch.manual_seed(1)
    pre = torch.randint(1, 300, (40,)).tolist()  # 2 full blocks of 16 and a partial one
    return [pre + [7, 8, 9], pre + [11], pre[:32], pre[:35] + [5] * 20, pre[:10], pre + [7, 8, 9], [3] * 33]


@pytest.mark.parametrize("kind", list(KINDS))
def test_outputs_with_the_prefix_cache_equal_those_without(kind):
    g, prompts = model(kind), shared_prompts()
    off, _ = run(g, prompts, together=False, prefix_cache_mb=0)
    on, eng = run(g, prompts, together=False, prefix_cache_mb=16)
    assert_same(on, off)
    c = eng.prefix
    # the 2nd prompt reuses 2 blocks; pre[:32] is exactly 2 blocks but its last token is prefilled: 1 block;
    # pre[:35]+...: 2; pre[:10]: none (less than a block); the repeated prompt: 2; [3]*33: none
    assert (c.hits, c.misses) == (4, 3)
    assert c.hit_tokens == 16 * (2 + 1 + 2 + 2)
    # sent together: the first admitted fill the cache for the ones admitted after them
    both, _ = run(g, prompts, together=True, prefix_cache_mb=16)
    assert_same(both, off)


def test_eviction_under_a_tiny_budget_keeps_the_budget_and_the_outputs():
    g, prompts = model("llama-gqa"), shared_prompts()
    block_bytes = 2 * 2 * 2 * 16 * 16 * 4  # k and v: (2 layers, 2 kv heads, 16 slots, head dim 16) fp32
    off, _ = run(g, prompts, together=False, prefix_cache_mb=0)
    on, eng = run(g, prompts, together=False, prefix_cache_mb=3 * block_bytes / 2**20)
    assert_same(on, off)
    assert eng.prefix.evictions > 0 and eng.prefix.bytes <= 3 * block_bytes and len(eng.prefix.blocks) <= 3


def test_lru_keeps_a_prefixs_first_blocks_longest():
    c = PrefixCache(budget_bytes=3 * 2 * 4 * 4, block=4)  # 3 blocks of (1, 1, 4, 1) fp32 k and v
    ids = list(range(20))
    kv = torch.arange(20.0).reshape(1, 1, 20, 1)
    c.insert(ids, kv, kv)  # 5 blocks, 3 fit: the first three stay
    assert [len(c.lookup(ids[:n])) for n in (20, 8)] == [3, 2]
    k, v = c.lookup(ids)[2]
    assert k.flatten().tolist() == [8.0, 9.0, 10.0, 11.0]
    c.insert([99] * 8, torch.zeros(1, 1, 8, 1), torch.zeros(1, 1, 8, 1))  # evicts the least recently used
    assert len(c.lookup(ids)) == 1 and len(c.lookup([99] * 8)) == 2
    assert len(c.lookup([1] + ids[1:])) == 0  # another first token: another chain
    assert c.keys(ids, b"x") != c.keys(ids)  # a namespace starts another chain


def test_a_steered_prompt_does_not_reuse_the_plain_ones_blocks():
    g = model("gpt2")
    prompt = shared_prompts()[0]
    vec = torch.randn(64) * 3
    steer = [None, (vec, 1, 2.0), (vec, 1, 2.0), None]
    off, _ = run(g, [prompt] * 4, together=False, prefix_cache_mb=0, steer=steer)
    on, eng = run(g, [prompt] * 4, together=False, prefix_cache_mb=16, steer=steer)
    assert_same(on, off)
    assert off[0][0] != off[1][0]  # the vector changes the output: a reused plain prefix would show
    assert (eng.prefix.hits, eng.prefix.misses) == (2, 2)  # 2nd plain and 2nd steered hit their own
    assert namespace((vec, 1, 2.0)) != namespace((vec, 1, 1.0)) != namespace(None)
    both, _ = run(g, [prompt] * 4, together=True, prefix_cache_mb=16, steer=steer)  # one prefill, per-row vectors
    assert_same(both, off)


def test_hits_and_misses_are_prometheus_counters():
    g, m = model("gpt2"), Metrics()
    _, eng = run(g, shared_prompts()[:2], together=False, prefix_cache_mb=16, metrics=m)
    m.bind(eng)
    text = m.render().decode()
    assert "scalelm_prefix_cache_hits_total 1.0" in text
    assert "scalelm_prefix_cache_misses_total 1.0" in text
    assert "scalelm_prefix_cache_hit_tokens_total 32.0" in text
    assert f"scalelm_prefix_cache_bytes {float(eng.prefix.bytes)}" in text and eng.prefix.bytes > 0


def test_the_server_passes_the_settings_and_reports_hits(tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from scalelm.model.io import save_model_dir
    from serve_helpers import Live

    torch.manual_seed(0)
    save_model_dir(GPT(ModelConfig(vocab_size=300, block_size=128, n_layer=2, n_head=4, n_embd=64)), tmp_path / "m")
    live = Live(tmp_path / "m", prefix_cache_mb=1, prefill_chunk=8)
    try:
        eng = live.server.engine
        assert eng.prefix.budget == 2**20 and eng.prefill_chunk == 8
        prompt = list(range(1, 41))
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0, "logprobs": 1}
        outs = [httpx.post(live.url + "/v1/completions", json={**body, "prompt": prompt + [i]}).json()
                for i in (50, 51)]
        assert all(len(o["choices"][0]["logprobs"]["tokens"]) == 4 for o in outs)
        text = httpx.get(live.url + "/metrics").text
        assert "scalelm_prefix_cache_hits_total 1.0" in text and "scalelm_prefix_cache_hit_tokens_total 32.0" in text
    finally:
        live.close()
