"""Generation: cache == no cache, batching, sampling, stop strings, streaming text, limits."""

import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.generate.generator import GenerationError, Generator, generate_text
from scalelm.generate.sampling import (
    SamplingError,
    SamplingParams,
    filter_top_k,
    filter_top_p,
    next_token,
)
from scalelm.generate.textstream import TextStream
from scalelm.model import GPT

GREEDY = SamplingParams(temperature=0.0)
V = 300  # the vocabulary of the `tiny_tokenizer_json` fixture
SHAPES = {
    "mha-learned": dict(),
    "gqa-rope": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
    "mqa-rope": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1),
}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # a module-wide fixture (conftest)


def tiny(shape="mha-learned", block_size=64, **kw) -> GPT:
    """A random model whose greedy continuations vary (large init, untied head)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, block_size=block_size, n_layer=2, n_head=4, n_embd=64,
                      tie_embeddings=False, init_std=0.3, **{**SHAPES[shape], **kw})
    return GPT(cfg).eval()


@torch.no_grad()
def greedy_reference(model: GPT, prompt: list[int], n: int, window: int = 0) -> list[int]:
    """No cache: the whole sequence through the model for every token. With ``window``, the
    context restarts from the last ``window`` tokens whenever it outgrows block_size."""
    seq, start = list(prompt), 0
    for _ in range(n):
        if len(seq) - start > model.cfg.block_size:
            start = len(seq) - window
        seq.append(int(model(torch.tensor([seq[start:]]))[0][0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[5, 6, 7], list(range(10, 23)), [42]]  # different lengths: left padding in a batch


@pytest.mark.parametrize("pack", [False, True], ids=["linear", "packed"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_with_cache_equals_without_cache(shape, pack):
    m = tiny(shape)
    gen = Generator(m, pack=pack)
    outs = gen.generate(PROMPTS, max_new_tokens=20, sampling=GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.tokens == greedy_reference(m, prompt, 20), prompt
        assert out.finish_reason == "length" and out.prompt_tokens == prompt
    # one row alone gives the same tokens as inside a padded batch
    assert gen.generate(PROMPTS[1], max_new_tokens=20, sampling=GREEDY)[0].tokens == outs[1].tokens


def test_generation_past_the_context_slides_the_window():
    m = tiny("gqa-rope", block_size=16)
    gen = Generator(m)
    out = gen.generate([1, 2, 3, 4, 5], max_new_tokens=40, sampling=GREEDY)[0]
    assert len(out.tokens) == 40
    assert out.tokens == greedy_reference(m, [1, 2, 3, 4, 5], 40, window=gen.window_keep)
    mlearned = tiny("mha-learned", block_size=16)  # learned positions cannot go past 16 at all
    out = Generator(mlearned).generate([1, 2, 3], max_new_tokens=30, sampling=GREEDY)[0]
    assert out.tokens == greedy_reference(mlearned, [1, 2, 3], 30, window=Generator(mlearned).window_keep)


def test_sampling_is_reproducible_for_a_seed():
    gen = Generator(tiny())
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    a = gen.generate(PROMPTS, max_new_tokens=15, sampling=p, seed=123)
    b = gen.generate(PROMPTS, max_new_tokens=15, sampling=p, seed=123)
    c = gen.generate(PROMPTS, max_new_tokens=15, sampling=p, seed=124)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]
    many = gen.generate([7, 8], max_new_tokens=15, sampling=p, seed=5, num_samples=4)
    assert len(many) == 4 and len({tuple(x.tokens) for x in many}) > 1  # samples differ


def test_top_k_1_and_tiny_top_p_are_greedy():
    gen = Generator(tiny("gqa-rope"))
    ref = gen.generate(PROMPTS, max_new_tokens=10, sampling=GREEDY)
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        assert [x.tokens for x in gen.generate(PROMPTS, max_new_tokens=10, sampling=p, seed=0)] == \
            [x.tokens for x in ref]


def test_sampling_filters_and_repetition_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.isinf(filter_top_k(logits, 2)[0, 2:]).all() and filter_top_k(logits, 2)[0, 1] == 1.0
    probs = logits.softmax(-1)[0]  # 0.61, 0.22, 0.14, 0.03
    kept = torch.isfinite(filter_top_p(logits, 0.7)[0]).tolist()
    assert kept == [True, True, False, False] and probs[0] < 0.7 <= probs[:2].sum()
    seen = torch.tensor([[True, False, False, True]])
    out = next_token(logits, SamplingParams(temperature=0.0, repetition_penalty=10.0), seen=seen)
    assert out.item() == 1  # 2.0/10 < 1.0; the negative seen logit gets more negative


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-0.5), r"temperature=-0.5 is invalid: must be >= 0"),
    (dict(top_p=0.0), r"top_p=0.0 is invalid: must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 is invalid: must be in \(0, 1\]"),
    (dict(top_k=-1), r"top_k=-1 is invalid: must be >= 0"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0 is invalid: must be > 0"),
])
def test_invalid_sampling_values_name_the_valid_range(kw, message):
    with pytest.raises(SamplingError, match=message):
        Generator(tiny()).generate([1], max_new_tokens=2, sampling=SamplingParams(**kw))


def test_eos_and_stop_strings_end_one_row_not_the_others(tiny_tokenizer_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tiny_tokenizer_json)
    m = tiny()
    prompts = ["To be, or not", "First Citizen:", "And"]
    free = Generator(m, tok).generate(prompts, max_new_tokens=30, sampling=GREEDY)
    # end-of-text: make row 0's 4th token the eos id; each row stops at its first occurrence
    eos = free[0].tokens[3]
    out = Generator(m, tok, eos_ids=[eos]).generate(prompts, max_new_tokens=30, sampling=GREEDY)
    for f, o in zip(free, out):
        cut = f.tokens.index(eos) if eos in f.tokens else None
        assert o.tokens == f.tokens[:cut]
        assert o.finish_reason == ("eos" if cut is not None else "length")
    # a stop string taken from row 1's own text: it ends there, the stop string itself excluded
    stop = free[1].text[8:11]
    out = Generator(m, tok).generate(prompts, max_new_tokens=30, sampling=GREEDY, stop=[stop])
    assert out[1].finish_reason == "stop" and out[1].text == free[1].text[:free[1].text.index(stop)]
    for f, o in zip(free, out):
        if stop not in f.text:
            assert o.tokens == f.tokens and o.finish_reason == "length"


def test_stream_yields_the_same_text_and_tokens_as_generate(tiny_tokenizer_json):
    from tokenizers import Tokenizer

    gen = Generator(tiny("gqa-rope"), Tokenizer.from_str(tiny_tokenizer_json))
    full = gen.generate(["To be", "Once more"], max_new_tokens=25, sampling=GREEDY)
    texts, tokens, reasons = ["", ""], [[], []], {}
    for ev in gen.stream(["To be", "Once more"], max_new_tokens=25, sampling=GREEDY):
        texts[ev.index] += ev.text
        if ev.token is not None:
            tokens[ev.index].append(ev.token)
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    assert texts == [c.text for c in full] and tokens == [c.tokens for c in full]
    assert reasons == {0: "length", 1: "length"}


def test_text_stream_handles_characters_that_span_tokens(tiny_tokenizer_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tiny_tokenizer_json)
    text = "héllo wörld, 日本語 and 🙂 done"
    ids = tok.encode(text).ids
    assert len(ids) > len(text) // 2  # most of the non-ASCII characters are several byte tokens
    s = TextStream(tok)
    deltas = [s.add(i) for i in ids] + [s.flush()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    # a stop string is never shown, not even its first characters
    s = TextStream(tok, stops=["wör"])
    shown = "".join(s.add(i) for i in ids)
    assert s.stopped and shown == "héllo " and s.text == "héllo "


def test_prompt_limits(tiny_tokenizer_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tiny_tokenizer_json)
    gen = Generator(tiny(block_size=16), tok, eos_ids=[0])
    with pytest.raises(GenerationError, match="the prompt has 20 tokens but the model's context is 16.*--truncate"):
        gen.generate(list(range(1, 21)), max_new_tokens=2)
    out = gen.generate(list(range(1, 21)), max_new_tokens=2, truncate=True, sampling=GREEDY)[0]
    assert out.prompt_tokens == list(range(1, 21))[-gen.window_keep:]
    assert gen.generate("", max_new_tokens=2, sampling=GREEDY)[0].prompt_tokens == [0]  # from end-of-text
    with pytest.raises(GenerationError, match=r"token id 300 is outside the vocabulary \[0, 300\)"):
        gen.generate([1, 300], max_new_tokens=2)
    with pytest.raises(GenerationError, match="max_new_tokens=0 is invalid"):
        gen.generate([1], max_new_tokens=0)
    with pytest.raises(GenerationError, match="no tokenizer"):
        Generator(tiny()).generate("text", max_new_tokens=2)


def test_generate_text_leaves_the_model_alone_and_runs_in_bf16(tiny_tokenizer_json):
    from tokenizers import Tokenizer

    m = tiny().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    text = generate_text(m, Tokenizer.from_str(tiny_tokenizer_json), "To be", max_new_tokens=8, seed=0)
    assert isinstance(text, str) and m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    out = Generator(tiny().to(torch.bfloat16)).generate([1, 2, 3], max_new_tokens=5, sampling=GREEDY)[0]
    assert len(out.tokens) == 5


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    m = tiny("gqa-rope")
    want = Generator(m).generate([[5, 6, 7]], max_new_tokens=6, sampling=GREEDY)[0].tokens
    assert Generator(m, compile=True).generate([[5, 6, 7]], max_new_tokens=6, sampling=GREEDY)[0].tokens == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_decoding_copy_matches_the_model_and_leaves_it_alone(dtype):
    from scalelm.generate.cpu_layout import PackedLinear, onednn_bf16_available, pack_linears

    m = tiny("gqa-rope").to(dtype)
    names = [n for n, _ in m.named_modules()]
    packed = pack_linears(m)
    assert [n for n, _ in m.named_modules()] == names and not any(
        isinstance(x, PackedLinear) for x in m.modules())  # the original keeps its nn.Linear
    kinds = {n: type(x).__name__ for n, x in packed.named_modules()}
    if dtype == torch.bfloat16 and not onednn_bf16_available():  # a CPU without native bf16: nothing to gain
        assert "PackedLinear" not in kinds.values()
    else:
        assert kinds["lm_head"] == "PackedLinear" and kinds["blocks.0.mlp.up"] == "PackedLinear"
    if dtype == torch.float32:  # narrow weights are faster as nn.Linear stores them
        assert kinds["blocks.0.mlp.down"] == "Linear" and kinds["blocks.0.attn.k_proj"] == "Linear"
    idx = torch.randint(0, V, (3, 9))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        torch.testing.assert_close(packed(idx)[0].float(), m(idx)[0].float(), **tol)
    # the batched fp32 LM head path (oneDNN copy made on first use) equals nn.Linear too
    lin = torch.nn.Linear(32, 512, bias=True).to(dtype)
    p = PackedLinear(lin)
    x = torch.randn(4, 3, 32, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(p(x).float(), lin(x).float(), **tol)
        torch.testing.assert_close(p(x[:1, :1]).float(), lin(x[:1, :1]).float(), **tol)


def test_top_p_below_float32_resolution_keeps_the_top_token():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    kept = filter_top_p(logits, 5e-324)  # rounds to 0 in float32: the top token must still stay
    assert torch.isfinite(kept).sum() == 1 and kept.argmax() == 1
    assert next_token(logits, SamplingParams(temperature=1.0, top_p=5e-324)).item() == 1
