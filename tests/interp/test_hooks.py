"""The hooks API (scalelm/interp/hooks.py, sites.py): capture and patch by name on every architecture,
nothing left behind, and patches that apply the same under the KV-cached Generator as without a cache."""

import statistics
import time

import pytest
import torch

from scalelm import capture, patch
from scalelm.config import ModelConfig
from scalelm.generate.generator import Generator
from scalelm.generate.sampling import SamplingParams
from scalelm.generate.seq2seq import Seq2SeqGenerator
from scalelm.interp.hooks import HookError, hook_names
from scalelm.model.build import build_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GPT_STYLES = {
    "gpt2": dict(),
    "llama": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
    "qwen3": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, qk_norm=True),
    "shared": dict(n_shared_blocks=1),  # ALBERT-style: one Block runs both layers
}
# the families being added to gpt.py: sandwich norms, soft-capped scores and logits, a sliding window
# shorter than the texts (Gemma 2); norms after each sublayer and q/k norms over whole projections (OLMo 2)
NEW_STYLES = {
    "gemma2": dict(pos_embedding="rope", norm="rmsnorm", mlp="geglu", bias=False, n_kv_head=2,
                   norm_placement="sandwich", norm_unit_offset=True, attn_softcap=20.0, logit_softcap=10.0,
                   attn_scalar=8.0, sliding_window=4, sliding_window_pattern=2),
    "olmo2": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, norm_placement="post",
                  qk_norm=True, qk_norm_scope="all"),
}
try:  # (present once those families are in; until then these cases are skipped)
    ModelConfig(**NEW_STYLES["gemma2"], n_embd=64, n_head=4).validate()
    GPT_STYLES.update(NEW_STYLES)
except TypeError:
    pass
GREEDY = SamplingParams(temperature=0.0)


def tiny(style="gpt2", seed=0, **kw):
    torch.manual_seed(seed)
    arch = dict(arch="encoder-decoder", n_encoder_layer=2, n_decoder_layer=2) if style == "encdec" else {}
    cfg = ModelConfig(vocab_size=300, block_size=48, n_layer=2, n_head=4, n_embd=64,
                      **{"init_std": 0.1, **GPT_STYLES.get(style, {}), **arch, **kw})
    return build_model(cfg).eval()


def hook_count(m) -> int:
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def run(m, style, idx):
    if style == "encdec":
        return m(idx, idx[:, :5])[0]
    return m(idx)[0]


def values_of(m):
    """The projections' value vectors of each call, per module (for checking patterns: pattern @ v must
    give z); a shared block has one call per layer."""
    out, handles = {}, []
    for key, block in m.blocks.items():
        for part in ("attn", "cross"):
            mod = getattr(block, part, None)
            if mod is not None:
                handles.append(mod.v_proj.register_forward_hook(
                    lambda _, a, o, k=(key, part): out.setdefault(k, []).append(o)))
    return out, handles


@pytest.mark.parametrize("style", [*GPT_STYLES, "encdec"])
def test_capture_everything_and_the_pieces_add_up(style):
    m = tiny(style)
    idx = torch.randint(0, 300, (2, 9))
    ref = run(m, style, idx)
    vals, handles = values_of(m)
    with capture(m) as cache:
        logits = run(m, style, idx)
    for h in handles:
        h.remove()
    assert torch.equal(logits, ref)  # capturing changes nothing
    assert set(cache) == set(hook_names(m))
    assert torch.equal(cache["logits"], logits)
    pre = "decoder.blocks" if style == "encdec" else "blocks"
    # the residual stream: each block's output is the next one's input; its pieces add up
    assert torch.equal(cache[f"{pre}.0.resid_post"], cache[f"{pre}.1.resid_pre"])
    for L in range(2):
        c = {k.split(f"{pre}.{L}.")[1]: v for k, v in cache.items() if k.startswith(f"{pre}.{L}.")}
        mid = c["resid_pre"] + c["attn_out"] + (c["cross_out"] if style == "encdec" else 0)
        torch.testing.assert_close(c["resid_mid"], mid, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(c["resid_post"], c["resid_mid"] + c["mlp_out"], atol=1e-5, rtol=1e-6)
        key = f"d{L}" if style == "encdec" else m.layer_keys[L]
        block = m.blocks[key]
        bias = block.attn.o_proj.bias
        attn_out = c["attn_out"]
        if getattr(block, "attn_post_norm", None) is not None:  # head_out sums to o_proj's output, before the norm
            attn_out = None
        if attn_out is not None:
            torch.testing.assert_close(c["attn.head_out"].sum(2) + (0 if bias is None else bias), attn_out,
                                       atol=1e-5, rtol=0)
        # the recomputed pattern reproduces what SDPA computed: pattern @ v == each head's output
        for part in ("attn", "cross") if style == "encdec" else ("attn",):
            p, z = c[f"{part}.pattern"], c[f"{part}.z"]
            calls = vals[(key, part)]
            v = calls[L] if style == "shared" else calls[0]
            v = v.view(*v.shape[:2], -1, 16).transpose(1, 2)
            v = v.repeat_interleave(p.shape[1] // v.shape[1], dim=1)
            torch.testing.assert_close((p @ v).transpose(1, 2), z, atol=1e-5, rtol=1e-5)
            assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.triu(c["attn.pattern"], 1).abs().max() == 0  # causal
    if style == "encdec":
        assert "encoder.blocks.1.attn.pattern" in cache and "encoder.final_norm" in cache
        enc = cache["encoder.blocks.0.attn.pattern"]
        assert torch.triu(enc, 1).abs().max() > 0  # the encoder sees the whole source
    assert hook_count(m) == 0 and not {"hidden_states", "head_logits", "encode", "decode"} & set(vars(m))


def test_names_globs_and_mistakes():
    m = tiny()
    with capture(m, "blocks.*.resid_post") as cache:
        m(torch.randint(0, 300, (1, 5)))
    assert sorted(cache) == ["blocks.0.resid_post", "blocks.1.resid_post"]
    with pytest.raises(HookError, match="did you mean 'blocks.1.resid_post'"):
        with capture(m, "blocks.1.resid_pots"):
            pass
    with pytest.raises(HookError, match="blocks.5"):
        with capture(m, "blocks.5.*"):
            pass
    with pytest.raises(HookError, match="patch blocks.0.attn.z"):
        with patch(m, {"blocks.0.attn.pattern": lambda x: x}):
            pass
    with pytest.raises(HookError, match="must return a tensor of shape"):
        with patch(m, {"blocks.0.mlp_out": lambda x: x[:, :1]}):
            m(torch.randint(0, 300, (1, 5)))
    assert hook_count(m) == 0


@pytest.mark.parametrize("style", ["gpt2", "llama", "encdec"])
def test_patch_replaces_what_the_model_reads(style):
    m = tiny(style)
    idx = torch.randint(0, 300, (1, 8))
    pre = "decoder.blocks" if style == "encdec" else "blocks"
    base = run(m, style, idx)
    # identity patches change nothing, whatever the site
    sites = ["resid_pre", "attn.z", "attn.head_out", "attn_out", "resid_mid", "mlp_out", "resid_post"]
    with patch(m, {f"{pre}.{L}.{s}": (lambda x: x.clone()) for L in range(2) for s in sites}):
        torch.testing.assert_close(run(m, style, idx), base, atol=1e-5, rtol=1e-5)
    # replacing the last block's output with a constant makes the logits a constant of it
    with capture(m, "final_norm") as c, patch(m, {f"{pre}.1.resid_post": lambda x: torch.ones_like(x)}):
        out = run(m, style, idx)
    assert torch.allclose(out, out[:, :1].expand_as(out)) and not torch.allclose(out, base)
    # patching resid_mid sets the stream the MLP reads and adds to
    target = torch.randn(1, idx.shape[1] if style != "encdec" else 5, 64)
    with capture(m, [f"{pre}.0.resid_mid", f"{pre}.0.resid_post", f"{pre}.0.mlp_out"]) as c, \
            patch(m, {f"{pre}.0.resid_mid": lambda x: target}):
        run(m, style, idx)
    torch.testing.assert_close(c[f"{pre}.0.resid_mid"], target, atol=1e-6, rtol=0)
    torch.testing.assert_close(c[f"{pre}.0.resid_post"], target + c[f"{pre}.0.mlp_out"], atol=1e-6, rtol=0)
    # knocking out one head: zero its z, and its head_out (with the o_proj bias) is what is left out
    with capture(m, [f"{pre}.1.attn.head_out", f"{pre}.1.attn_out"]) as full:
        run(m, style, idx)
    knock = {f"{pre}.1.attn.z": lambda z: z.index_fill(2, torch.tensor([2]), 0.)}
    with capture(m, f"{pre}.1.attn_out") as ko, patch(m, knock):
        run(m, style, idx)
    torch.testing.assert_close(ko[f"{pre}.1.attn_out"],
                               full[f"{pre}.1.attn_out"] - full[f"{pre}.1.attn.head_out"][:, :, 2], atol=1e-5, rtol=0)
    assert hook_count(m) == 0


def test_patches_and_captures_compose_and_nest():
    m = tiny()
    idx = torch.randint(0, 300, (1, 6))
    add = lambda x: x + 1.0  # noqa: E731
    with capture(m, "blocks.0.resid_post") as outer:
        with patch(m, {"blocks.0.resid_post": add}):
            with patch(m, {"blocks.0.resid_post": add}), capture(m, "blocks.0.resid_post") as inner:
                m(idx)
        m(idx)  # the patches are gone, the outer capture still records
    two, plain = outer.steps("blocks.0.resid_post")
    torch.testing.assert_close(two, plain + 2.0)  # both patches, in order; the capture sees the result
    assert torch.equal(inner["blocks.0.resid_post"], two)
    assert hook_count(m) == 0


def test_no_hook_survives_an_error():
    m = tiny("encdec")
    before = [n for n, _ in m.named_modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m), patch(m, {"decoder.blocks.0.mlp_out": lambda x: x}):
            raise RuntimeError("boom")
    assert hook_count(m) == 0 and [n for n, _ in m.named_modules()] == before
    assert not {"encode", "decode"} & set(vars(m))


def test_unused_costs_nothing():
    """After the context: no hook, no shadowed method, the same modules and state, the same step time."""
    torch.manual_seed(0)
    m, twin = tiny(), tiny()
    tree = [(n, type(x).__name__) for n, x in m.named_modules()]
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    idx = torch.randint(0, 300, (4, 32))
    with capture(m), patch(m, {"blocks.*.mlp_out": lambda x: x}):
        m(idx)
    assert hook_count(m) == 0 and not {"hidden_states", "head_logits"} & set(vars(m))
    assert [(n, type(x).__name__) for n, x in m.named_modules()] == tree
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks

    def step(model):
        t = time.perf_counter()
        with torch.no_grad():
            model(idx)
        return time.perf_counter() - t

    for _ in range(3):
        step(m), step(twin)
    a, b = [], []
    for _ in range(20):  # interleaved, and the fastest of each: other processes only ever add time
        a.append(step(m))
        b.append(step(twin))
    assert min(a) < 1.5 * min(b), (statistics.median(a), statistics.median(b))


def shift_after(pos: int, v: torch.Tensor):
    """A patch that adds ``v`` to every token at position >= ``pos``: it needs the positions of each call."""
    def fn(x, hook):
        return x + v * (hook.positions >= pos).to(x.dtype)[..., None]
    return fn


@pytest.mark.parametrize("style", [s for s in ("gpt2", "llama", "gemma2") if s in GPT_STYLES])
def test_patch_during_cached_generation_equals_patch_without_cache(style):
    m = tiny(style, init_std=0.3)
    gen = Generator(m, None, eos_ids=[])  # decodes with its own (packed) copy of the weights
    prompts = [[5, 17, 42, 8, 99], [7, 3]]  # different lengths: left padding, positions per row
    v = torch.randn(64) * 3
    fn = shift_after(3, v)
    plain = [c.tokens for c in gen.generate(prompts, 10, sampling=GREEDY)]
    with patch(gen, {"blocks.0.resid_post": fn}):
        cached = [c.tokens for c in gen.generate(prompts, 10, sampling=GREEDY)]
    assert hook_count(gen.model) == 0
    uncached = []
    with torch.no_grad(), patch(m, {"blocks.0.resid_post": fn}):
        for p in prompts:
            seq = list(p)
            for _ in range(10):
                seq.append(int(m(torch.tensor([seq]))[0][0, -1].argmax()))
            uncached.append(seq[len(p):])
    assert cached == uncached
    assert cached != plain  # the patch matters


@pytest.mark.parametrize("style", [s for s in ("llama", "gemma2") if s in GPT_STYLES])
def test_capture_during_cached_generation_joins_the_steps(style):
    m = tiny(style, init_std=0.3)
    gen = Generator(m, None, eos_ids=[])
    names = ["blocks.1.resid_post", "blocks.1.attn.pattern", "blocks.0.attn.z"]
    with capture(gen, names) as cache:
        out = gen.generate([[5, 17, 42, 8]], 6, sampling=GREEDY)[0]
    assert len(cache.steps("blocks.1.resid_post")) == 6  # the prefill and 5 decode steps
    seq = torch.tensor([out.prompt_tokens + out.tokens[:-1]])  # what the model read
    with capture(m, names) as full, torch.no_grad():
        m(seq)
    for n in names:
        torch.testing.assert_close(cache[n], full[n], atol=1e-4, rtol=1e-4)  # packed vs plain matmuls


def test_encoder_decoder_patch_under_its_cache():
    m = tiny("encdec", init_std=0.3)
    gen = Seq2SeqGenerator(m, None, eos_ids=[0])
    src = [11, 12, 13, 14, 15]
    fns = {"decoder.blocks.1.cross.z": lambda z: z * 0.5,
           "decoder.blocks.0.resid_post": shift_after(2, torch.randn(64) * 2)}
    plain = gen.generate([src], 8, sampling=GREEDY, ignore_eos=True)[0].tokens
    with patch(gen, fns), capture(gen, "decoder.blocks.1.cross.pattern") as cache:
        cached = gen.generate([src], 8, sampling=GREEDY, ignore_eos=True)[0].tokens
    seq = [0]
    with torch.no_grad(), patch(m, fns):
        for _ in range(8):
            seq.append(int(m(torch.tensor([src]), torch.tensor([seq]))[0][0, -1].argmax()))
    assert cached == seq[1:] and cached != plain
    assert cache["decoder.blocks.1.cross.pattern"].shape == (1, 4, 8, 5)
