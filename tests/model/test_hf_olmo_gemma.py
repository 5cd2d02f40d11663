"""OLMo 2, Gemma 2 and Gemma 3 (text) through Hugging Face interop, and the switches they brought:
norms after each sub-layer (OLMo 2) or before and after (Gemma), q/k norms over the whole projection
(OLMo 2), Gemma's (1 + w) RMSNorm, GeGLU, scaled embeddings, the attention scale, attention and
output soft-capping, and Gemma 3's RoPE base for its local layers.

Each family as in test_hf_families.py (whose helpers and per-import tests are reused): a random-init
HF model from a tiny config with every parameter perturbed, windows shorter than the test sequence
and soft-caps small enough to bite, through `convert --from-hf` (logits within 1e-4 of HF, fp32),
`convert --to-hf` back to the same class (logits again, the same tensors); a LoRA step, a
`--to-peft` adapter, int8 quantization, structured pruning, a classifier's export and a served chat
completion on the import. Each switch also decodes with the KV cache (and through the ONNX decode
graph) to the logits of the full forward. The presets are checked against the published config.json.
"""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_hf_families import (  # noqa: E402  (the per-import tests run here on this file's `imported`)
    IDX,
    TEMPLATE,
    V,
    convert,
    logits,
    test_lora_run_exports_as_a_peft_adapter_of_the_hf_family,  # noqa: F401
    test_lora_step_on_the_import,  # noqa: F401
    test_served_chat_completion_on_the_import,  # noqa: F401
)
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Olmo2Config,
    Olmo2ForCausalLM,
)

from scalelm import cli  # noqa: E402
from scalelm.config import Config, ConfigError, ModelConfig, apply_preset, config_from_dict  # noqa: E402
from scalelm.model.gpt import GPT  # noqa: E402
from scalelm.model.hf import ConversionError, hf_family, model_config_from_hf  # noqa: E402
from scalelm.model.io import load_model_dir  # noqa: E402
from scalelm.model.kv_cache import PreallocatedKVCache  # noqa: E402
from scalelm.model.masks import padding_mask  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

_SHAPE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
# windows of 8 < the 40-token test batch; layer 0 local, layer 1 global (pattern 2, for Gemma 3 too);
# soft-caps a few units wide, where the perturbed model's scores and logits reach
FAMILIES = {
    "olmo2": (Olmo2ForCausalLM, lambda: Olmo2Config(**_SHAPE, tie_word_embeddings=False)),
    # heads 32 wide (4 x 32 > 64) and an attention scale that is not head_dim's
    "gemma2": (Gemma2ForCausalLM, lambda: Gemma2Config(
        **_SHAPE, head_dim=32, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    # scaled RoPE on the global layer only; the local layer's own base; untied head
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **_SHAPE, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=2,
        final_logit_softcapping=3.0, tie_word_embeddings=False,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}
# per family, what the import must have switched on
SWITCHES = {
    "olmo2": dict(norm_placement="post", qk_norm=True, qk_norm_scope="all", mlp="swiglu", sliding_window=None),
    "gemma2": dict(norm_placement="sandwich", norm_unit_offset=True, mlp="geglu", embed_scale=8.0, attn_scalar=24.0,
                   attn_softcap=3.0, logit_softcap=2.0, qk_norm=False, sliding_window=8, sliding_window_pattern=2),
    "gemma3": dict(norm_placement="sandwich", norm_unit_offset=True, mlp="geglu", embed_scale=8.0, attn_scalar=None,
                   attn_softcap=None, logit_softcap=3.0, qk_norm=True, qk_norm_scope="head", sliding_window=8,
                   sliding_window_pattern=2, rope_theta=1e6, rope_scaling="linear", rope_factor=4.0,
                   rope_local_theta=100.0),
}
# per family, switches turned back to their neutral value: each must change the logits (so the
# parity test would notice if it were computed wrong or not at all)
NEUTRAL = {
    "olmo2": [dict(qk_norm=False, qk_norm_scope="head"), dict(norm_placement="sandwich")],
    "gemma2": [dict(attn_softcap=None), dict(logit_softcap=None), dict(sliding_window=None), dict(attn_scalar=None),
               dict(embed_scale=1.0), dict(norm_unit_offset=False), dict(mlp="swiglu")],
    "gemma3": [dict(rope_local_theta=None), dict(logit_softcap=None), dict(sliding_window=None, rope_local_theta=None),
               dict(norm_placement="post")],
}


def random_hf(name: str):
    """A random-init HF model with every parameter perturbed (norms non-trivial)."""
    torch.manual_seed(0)
    cls, make = FAMILIES[name]
    m = cls(make())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory, tiny_tokenizer_json):
    """(family, HF model, scalelm model dir): the HF model saved with a tokenizer and a chat template,
    imported through the CLI."""
    name, root = request.param, tmp_path_factory.mktemp(request.param)
    hf = random_hf(name)
    hf.save_pretrained(root / "hf", safe_serialization=True)
    (root / "hf" / "tokenizer.json").write_text(tiny_tokenizer_json)
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    assert cli.main(["convert", "--from-hf", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    return name, hf, root / "ckpt"


def test_import_then_export_match_hf_logits(imported, tmp_path, capsys):
    name, hf, ckpt = imported
    ours = load_model_dir(ckpt).eval()
    assert {k: getattr(ours.cfg, k) for k in SWITCHES[name]} == SWITCHES[name]
    want = logits(hf)
    assert (want - logits(ours)).abs().max().item() <= 1e-4
    for change in NEUTRAL[name]:
        other = GPT(dataclasses.replace(ours.cfg, **change)).eval()
        theirs = other.state_dict()  # the tensors both have (the others as initialised: norms at scale 1)
        other.load_state_dict({k: v for k, v in ours.state_dict().items() if k in theirs}, strict=False)
        assert (logits(other) - want).abs().max().item() > 1e-3, f"{change} changes nothing here"
    convert(capsys, ckpt, "--to-hf", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(hf)
    keys = ("rope_parameters", "layer_types", "sliding_window", "query_pre_attn_scalar", "final_logit_softcapping",
            "attn_logit_softcapping", "head_dim", "tie_word_embeddings")
    assert {k: getattr(back.config, k, None) for k in keys} == {k: getattr(hf.config, k, None) for k in keys}
    assert (logits(back) - want).abs().max().item() <= 1e-4
    hf_sd, back_sd = hf.state_dict(), back.state_dict()
    assert set(hf_sd) == set(back_sd) and all(torch.equal(hf_sd[k], back_sd[k]) for k in hf_sd)


def test_gemma_embedding_scale_and_norm_in_bf16_are_hf_s():
    """In bf16, HF multiplies Gemma's embeddings by sqrt(n_embd) rounded to bf16 (8.5 for 72, not
    8.485...) and computes the norm's 1 + w in fp32: the same here, bit for bit where it matters."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm, Gemma2TextScaledWordEmbedding

    from scalelm.model.gpt import RMSNorm

    torch.manual_seed(0)
    cfg = ModelConfig(**dict(LLAMA, n_embd=72, n_head=4, embed_scale=72 ** 0.5))
    ours = GPT(cfg).to(torch.bfloat16)
    theirs = Gemma2TextScaledWordEmbedding(cfg.vocab_size, 72, None, embed_scale=72 ** 0.5).to(torch.bfloat16)
    theirs.weight.data.copy_(ours.tok_emb.weight)
    ids = torch.arange(cfg.vocab_size)[None]
    assert torch.equal(ours.embed(ids, ids), theirs(ids))
    assert not torch.equal(ours.embed(ids, ids), ours.tok_emb(ids) * 72 ** 0.5)  # the rounding shows
    norm, ref = RMSNorm(72, 1e-6, unit_offset=True), Gemma2RMSNorm(72, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
        ref.weight.copy_(norm.weight)
    x = torch.randn(4, 9, 72)
    for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        got, want = norm.to(dt)(x.to(dt)), ref.to(dt)(x.to(dt))
        assert got.dtype == want.dtype == dt and (got.float() - want.float()).abs().max().item() <= tol


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_a_gemma_without_a_window_round_trips(name):
    """No window: every layer full_attention (Gemma still builds its sliding mask from a number)."""
    from scalelm.model.hf import from_hf, to_hf

    ours = from_hf(random_hf(name))
    cfg = dataclasses.replace(ours.cfg, sliding_window=None, rope_local_theta=None, sliding_window_pattern=1)
    full = GPT(cfg).eval()
    full.load_state_dict(ours.state_dict())
    hf = to_hf(full)
    assert set(hf.config.layer_types) == {"full_attention"}
    assert (logits(hf) - logits(full)).abs().max().item() <= 1e-4
    assert model_config_from_hf(hf.config.to_dict()) == cfg


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_classifier_on_the_family_exports_as_its_sequence_classification_class(name):
    from scalelm.model.hf import from_hf
    from scalelm.tasks.classify.hf import to_hf_classifier
    from scalelm.tasks.classify.model import Classifier

    clf = Classifier(from_hf(random_hf(name)), 2).eval()
    with torch.no_grad():
        clf.head.weight.normal_(0, 1)
    hf = to_hf_classifier(clf, {"labels": ["neg", "pos"], "eos_id": 0, "pad_id": 1})
    assert type(hf).__name__.endswith("ForSequenceClassification") and type(hf).__name__.startswith(name[:5].title())
    ids = IDX[:, :12].clamp(min=2)  # no pad id: HF reads the last token, as the classifier does
    with torch.no_grad():
        assert (hf(ids).logits - clf(ids)).abs().max().item() <= 1e-4


def test_int8_quantized_import_is_its_rounded_weights_and_generates(imported, tmp_path, capsys):
    """int8 of the import computes what its float model does with each block linear rounded to its
    int8 grid (the post-sub-layer norms rescale the rounding error, so a bound on the error against
    the float model would say more about the random weights than about the quantization)."""
    from scalelm.generate.generator import Generator
    from scalelm.generate.sampling import SamplingParams
    from scalelm.model.quant import fake_quantize, int8_params, is_quantized, quantizable_linears

    _, _, ckpt = imported
    capsys.readouterr()
    assert cli.main(["quantize", str(ckpt), "--scheme", "int8", "--out", str(tmp_path / "q")]) == 0
    q = load_model_dir(tmp_path / "q").eval()
    assert is_quantized(q)
    # the same kernels in fp32: where bf16 is native they would compute in bf16, whose rounding (tested in
    # tests/compress/test_quantize.py) is not what this test is about
    for m in q.modules():
        if hasattr(m, "select_kernel"):
            m.select_kernel(m.kernel, torch.float32)
    rounded = load_model_dir(ckpt).eval()
    with torch.no_grad():
        for lin in quantizable_linears(rounded).values():
            lin.weight.copy_(fake_quantize(lin.weight, int8_params(lin.weight), None))
    ref = logits(rounded)
    assert float((logits(q) - ref).norm() / ref.norm()) < 1e-4
    gen = Generator.from_checkpoint(tmp_path / "q")
    out = gen.generate([1, 2, 3], max_new_tokens=6, sampling=SamplingParams(temperature=0.0), ignore_eos=True)
    assert len(out[0].tokens) == 6


# ----------------------------------------------------------------------------- each switch with the KV cache

LLAMA = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, init_std=0.2,
             pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
GEMMA = dict(LLAMA, mlp="geglu", norm_placement="sandwich", norm_unit_offset=True, embed_scale=32 ** 0.5,
             head_size=16, attn_scalar=12.0, attn_softcap=2.0, logit_softcap=3.0, qk_norm=True, sliding_window=4,
             sliding_window_pattern=2, rope_local_theta=100.0, rope_theta=1e4, rope_scaling="linear", rope_factor=2.0)
CACHED = {
    "post": dict(LLAMA, norm_placement="post"),
    "sandwich": dict(LLAMA, norm_placement="sandwich"),
    "qk_norm_all": dict(LLAMA, qk_norm=True, qk_norm_scope="all"),
    "norm_unit_offset": dict(LLAMA, norm_unit_offset=True),
    "embed_scale": dict(LLAMA, embed_scale=3.0),
    "attn_scalar": dict(LLAMA, attn_scalar=7.0),
    "attn_softcap": dict(LLAMA, attn_softcap=1.5),
    "attn_softcap_window": dict(LLAMA, attn_softcap=1.5, sliding_window=3),
    "logit_softcap": dict(LLAMA, logit_softcap=2.0),
    "geglu": dict(LLAMA, mlp="geglu"),
    "rope_local_theta": dict(LLAMA, sliding_window=4, sliding_window_pattern=2, rope_local_theta=50.0),
    "gemma": GEMMA,
}


def perturbed(cfg: ModelConfig) -> GPT:
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:  # norms start at scale 1: make them matter
                p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.mark.parametrize("name", list(CACHED))
def test_cached_decoding_equals_the_full_forward(name):
    """A prefill and single-token steps through the KV cache give the full forward's logits, past
    the window where there is one, and so does the ONNX export's graph (run by PyTorch) with its past
    keys and values fed back; a left-padded row computes what the row alone does."""
    from scalelm.compress.onnx_export import DecodeGraph

    cfg = ModelConfig(**CACHED[name])
    model = perturbed(cfg)
    seq = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    cache = PreallocatedKVCache(cfg, 2, max_len=16)
    with torch.no_grad():
        full = model(seq)[0]
        got = [model(seq[:, :5], kv_cache=cache)[0]]
        got += [model(seq[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 12)]
        assert (torch.cat(got, 1) - full).abs().max().item() < 1e-5
        graph, ones = DecodeGraph(model), torch.ones(2, 12, dtype=torch.long)
        none = torch.zeros(cfg.n_layer, 2, cfg.kv_heads, 0, cfg.head_dim)
        first, k, v = graph(seq[:, :7], torch.arange(7).repeat(2, 1), ones[:, :7], none, none, torch.arange(7))
        then, _, _ = graph(seq[:, 7:], torch.arange(7, 12).repeat(2, 1), ones, k, v, torch.arange(5))
        assert (torch.cat([first, then], 1) - full).abs().max().item() < 1e-5
        valid = torch.ones(2, 12, dtype=torch.bool)
        valid[1, :3] = False  # row 1: 3 padding tokens, then its last 9
        mask, pos = padding_mask(valid)
        padded = model(seq, attn_mask=mask, pos_ids=pos)[0]
        alone = model(seq[1:, 3:])[0]
    assert (padded[1, 3:] - alone[0]).abs().max().item() < 1e-5


def test_the_attention_softcap_bites_and_trains():
    """The explicit attention path (soft-capping) has gradients and dropout, as SDPA's does."""
    cfg = ModelConfig(**dict(GEMMA, dropout=0.1))
    model = perturbed(cfg).train()
    seq = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    loss = model(seq[:, :-1], seq[:, 1:])[1]
    loss.backward()
    assert torch.isfinite(loss) and model.blocks["0"].attn.q_proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        capped = model(seq)[0]
        model.blocks["0"].attn.softcap = model.blocks["1"].attn.softcap = None
        assert (model(seq)[0] - capped).abs().max().item() > 1e-3


def test_structured_pruning_of_the_imports(imported):
    """Pruning copies every norm (the post-sub-layer ones too; a missing copy would be uninitialised
    memory, not an error), OLMo 2's whole-projection q/k norms by the heads kept, and Gemma's (1 + w)
    compensation; removing layers that would shift Gemma's local/global pattern is refused."""
    from scalelm.compress.structured import Plan, apply_plan, prune_structured
    from scalelm.errors import UserError

    name, _, ckpt = imported
    model = load_model_dir(ckpt).eval()
    same, _ = prune_structured(model, IDX[:, :16], heads=4)  # every unit kept: the same model
    assert (logits(same) - logits(model)).abs().max().item() < 1e-5
    small, _ = prune_structured(model, IDX[:, :16], heads=2, embd=48)
    assert small.cfg.embed_scale == model.cfg.embed_scale and torch.isfinite(logits(small)).all()
    if name == "olmo2":
        assert small.blocks["0"].attn.q_norm.weight.shape == (2 * 16,)
    if model.cfg.sliding_window is not None:  # layer 1 is global: alone, it would become layer 0, local
        keep = Plan(layers=[1], groups=[torch.arange(2)], neurons=[torch.arange(96)], channels=torch.arange(64))
        with pytest.raises(UserError, match="would change which layers attend within the sliding window"):
            apply_plan(model, keep)


def test_tensor_parallelism_refuses_the_post_norm_placements():
    from scalelm.config import ParallelConfig
    from scalelm.distributed.mesh import LayoutError, resolve_layout

    gemma2 = apply_preset(Config(), "gemma-2-2b").model
    assert resolve_layout(ParallelConfig(tp=1), gemma2, 2).dp_shard == 2
    with pytest.raises(LayoutError, match="norm_placement=sandwich .* tensor parallelism"):
        resolve_layout(ParallelConfig(tp=2), gemma2, 2)


# ----------------------------------------------------------------------------- presets = published shapes

PUBLISHED = {
    "olmo-2-1b": {  # allenai/OLMo-2-0425-1B
        "model_type": "olmo2", "vocab_size": 100352, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "rope_theta": 500000, "rope_scaling": None,
        "attention_bias": False, "hidden_act": "silu", "tie_word_embeddings": False},
    "gemma-2-2b": {  # google/gemma-2-2b
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "attention_bias": False, "cache_implementation": "hybrid"},
    "gemma-3-1b": {  # google/gemma-3-1b-pt (written by transformers 4.50: no layer_types, no rope_parameters)
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
        "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
        "rope_local_base_freq": 10000, "rope_scaling": None, "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_bias": False,
        "cache_implementation": "hybrid"},
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_is_the_published_shape(preset):
    ours = apply_preset(Config(), preset).model
    theirs = model_config_from_hf(PUBLISHED[preset])
    theirs.block_size, theirs.init_std = ours.block_size, ours.init_std  # the context to train at differs
    assert ours == theirs
    with torch.device("meta"):
        assert set(GPT(ours).state_dict()) == set(GPT(theirs).state_dict())
        assert GPT(ours).num_params() == PARAMS[preset]


# the published parameter counts (OLMo-2-0425-1B's is given rounded, 1.48B: this is its shape's exact count)
PARAMS = {"olmo-2-1b": 1_484_916_736, "gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952}


def test_gemma3_old_and_new_config_formats_agree():
    """transformers 5 writes Gemma 3's RoPE per layer type and its layer_types; 4.x wrote rope_theta,
    rope_local_base_freq, rope_scaling (global layers) and sliding_window_pattern."""
    old = dict(PUBLISHED["gemma-3-1b"], rope_scaling={"rope_type": "linear", "factor": 8.0})
    new = transformers.Gemma3TextConfig(**{k: v for k, v in old.items() if k != "model_type"}).to_dict()
    assert "layer_types" in new and "sliding_attention" in new["rope_parameters"]
    a, b = model_config_from_hf(old), model_config_from_hf(new)
    assert a == b and a.rope_scaling == "linear" and a.rope_factor == 8.0 and a.rope_local_theta == 10000.0
    assert [a.layer_window(i) for i in range(12)] == [512] * 5 + [None] + [512] * 5 + [None]


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change, message", [
    (dict(qk_norm_scope="all"), "needs qk_norm=true"),
    (dict(norm_unit_offset=True), "needs norm=rmsnorm"),
    (dict(embed_scale=0.0), "embed_scale must be positive"),
    (dict(attn_softcap=-1.0), "attn_softcap must be positive"),
    (dict(pos_embedding="rope", rope_local_theta=1e4), "it needs sliding_window"),
    (dict(arch="encoder-decoder", norm_placement="sandwich", logit_softcap=30.0),
     "norm_placement, logit_softcap are for arch=gpt"),
])
def test_bad_switches_are_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**change).validate()


def test_saved_configs_with_qk_norm_load_unchanged():
    assert config_from_dict({"model": {"qk_norm": True}}).model.qk_norm_scope == "head"
    assert ModelConfig().norm_placement == "pre" and not ModelConfig().norm_unit_offset


def test_export_refuses_what_the_class_cannot_hold():
    gemma3 = apply_preset(Config(), "gemma-3-1b").model
    assert hf_family(gemma3) == "gemma3" and hf_family(apply_preset(Config(), "gemma-2-2b").model) == "gemma2"
    assert hf_family(apply_preset(Config(), "olmo-2-1b").model) == "olmo2"
    llama = apply_preset(Config(), "llama-60m").model
    for change, message in [
        (dict(logit_softcap=30.0), "LlamaForCausalLM needs model.logit_softcap=None"),
        (dict(norm_unit_offset=True), "LlamaForCausalLM needs model.norm_unit_offset=False"),
    ]:
        with pytest.raises(ConversionError, match=message):
            hf_family(dataclasses.replace(llama, **change))
    for change, message in [
        (dict(attn_softcap=50.0), "Gemma3ForCausalLM needs model.attn_softcap=None"),
        (dict(embed_scale=1.0), "needs model.embed_scale=33.94"),
        (dict(attn_scalar=100.5), "query_pre_attn_scalar is an integer"),
        (dict(mlp="swiglu"), "Gemma3ForCausalLM needs model.mlp='geglu'"),
        (dict(qk_norm=False, rope_local_theta=None, sliding_window=None, embed_scale=1152 ** 0.5, attn_softcap=None,
              logit_softcap=None, qk_norm_scope="head", norm_placement="post"), "Olmo2ForCausalLM needs model.mlp"),
    ]:
        with pytest.raises(ConversionError, match=message):
            hf_family(dataclasses.replace(gemma3, **change))
    with pytest.raises(ConversionError, match="Gemma2ForCausalLM needs model.rope_local_theta=None"):
        hf_family(dataclasses.replace(gemma3, qk_norm=False))


@pytest.mark.parametrize("preset, edit, message", [
    ("gemma-3-1b", dict(model_type="gemma3"), "Gemma3ForConditionalGeneration"),
    ("gemma-3-1b", dict(layer_types=["sliding_attention", "full_attention"] * 13 + []), None),
    ("gemma-3-1b", dict(layer_types=["full_attention"] + ["sliding_attention"] * 25), "layer_types"),
    ("gemma-3-1b", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "plain RoPE"),
    ("gemma-3-1b", dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), "rope_type='yarn'"),
    ("gemma-3-1b", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma-2-2b", dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
    ("olmo-2-1b", dict(attention_bias=True), "attention_bias=True"),
])
def test_unsupported_configs_are_clear_errors(preset, edit, message):
    hf = dict(PUBLISHED[preset], **edit)
    if message is None:  # Gemma 2's pattern in a Gemma 3 config: a pattern of 2 imports
        assert model_config_from_hf(hf).sliding_window_pattern == 2
        return
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf(hf)
