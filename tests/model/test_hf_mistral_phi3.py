"""Mistral and Phi-3, and the sliding-window attention they need (``model.sliding_window``).

Each family as in test_hf_families.py: a random-init HF model from a tiny config (a window of 8,
shorter than the 40-token test batch, so the window changes the logits), saved with save_pretrained,
through `convert --from-hf`, logits within 1e-4 of HF (fp32); `convert --to-hf` back to the same
class (Phi-3's q/k/v and gate/up fused again) and logits again; then a LoRA step, a PEFT export,
int8 quantization and a served chat completion on the import. Then the window in generation:
cached decoding (plain and left-padded), beam search and the serving engine's continuous batching
each equal the uncached forward, and speculative decoding equals plain greedy. The presets of the
published shapes are checked against those models' real config.json, and what no class holds is
refused.
"""

import dataclasses
import itertools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_hf_families import (  # noqa: E402  (the per-import tests run here on this file's `imported`)
    IDX,
    TEMPLATE,
    V,
    _SHAPE,
    convert,
    logits,
    test_lora_step_on_the_import,  # noqa: F401
    test_served_chat_completion_on_the_import,  # noqa: F401
)
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from scalelm import cli  # noqa: E402
from scalelm.config import Config, ConfigError, LoRAConfig, ModelConfig, apply_preset  # noqa: E402
from scalelm.generate.generator import Generator  # noqa: E402
from scalelm.generate.sampling import SamplingParams  # noqa: E402
from scalelm.model.gpt import GPT, layer_is_local  # noqa: E402
from scalelm.model.hf import ConversionError, hf_family, model_config_from_hf, to_hf  # noqa: E402
from scalelm.model.io import load_model_dir  # noqa: E402
from scalelm.model.kv_cache import PreallocatedKVCache  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

W = 8  # the window: IDX's 40 tokens see 5 windows' worth
GREEDY = SamplingParams(temperature=0.0)
FAMILIES = {
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**_SHAPE, sliding_window=W, tie_word_embeddings=False)),
    # sliding_window null: full attention (MistralConfig's default would be 4096)
    "mistral-full": (MistralForCausalLM,
                     lambda: MistralConfig(**_SHAPE, sliding_window=None, tie_word_embeddings=True)),
    # GQA 4/2, as Phi-3-medium (mini is MHA): the fused rows are q 64, k 32, v 32
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**_SHAPE, sliding_window=W, pad_token_id=None,
                                                 tie_word_embeddings=False)),
}


def random_hf(name: str):
    torch.manual_seed(0)
    cls, make = FAMILIES[name]
    m = cls(make())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory, tiny_tokenizer_json):
    name, root = request.param, tmp_path_factory.mktemp(request.param)
    hf = random_hf(name)
    hf.save_pretrained(root / "hf", safe_serialization=True)
    (root / "hf" / "tokenizer.json").write_text(tiny_tokenizer_json)
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    assert cli.main(["convert", "--from-hf", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    return name, hf, root / "ckpt"


@pytest.fixture(scope="module")
def mistral_ckpt(tmp_path_factory):
    """The windowed Mistral import alone (for the generation tests)."""
    root = tmp_path_factory.mktemp("mistral-gen")
    random_hf("mistral").save_pretrained(root / "hf", safe_serialization=True)
    assert cli.main(["convert", "--from-hf", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    return root / "ckpt"


def without_window(model: GPT) -> GPT:
    full = GPT(dataclasses.replace(model.cfg, sliding_window=None)).eval()
    full.load_state_dict(model.state_dict())
    return full


# ----------------------------------------------------------------------------- parity both ways

def test_import_then_export_match_hf_logits(imported, tmp_path, capsys):
    name, hf, ckpt = imported
    ours = load_model_dir(ckpt).eval()
    assert ours.cfg.sliding_window == hf.config.sliding_window
    assert (logits(hf) - logits(ours)).abs().max().item() <= 1e-4
    if hf.config.sliding_window is not None:  # the window matters on this batch: parity checked it
        assert (logits(without_window(ours)) - logits(hf)).abs().max().item() > 1e-3
    convert(capsys, ckpt, "--to-hf", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(hf) and back.config.sliding_window == hf.config.sliding_window
    assert (logits(back) - logits(hf)).abs().max().item() <= 1e-4
    hf_sd, back_sd = hf.state_dict(), back.state_dict()
    assert set(hf_sd) == set(back_sd) and all(torch.equal(hf_sd[k], back_sd[k]) for k in hf_sd)
    if name == "phi3":  # split on import, fused again on export
        assert "model.layers.0.self_attn.qkv_proj.weight" in back_sd
        assert "blocks.0.attn.k_proj.weight" in ours.state_dict()


def test_a_windowed_scalelm_model_exports_as_mistral_and_qwen2_keeps_its_layer_pattern():
    llama = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, vocab_size=V, n_layer=4, n_head=4,
                 n_kv_head=2, n_embd=32, block_size=64, tie_embeddings=False, init_std=0.2)
    torch.manual_seed(3)
    mistral = GPT(ModelConfig(**llama, sliding_window=5)).eval()
    hf = to_hf(mistral)
    assert type(hf) is MistralForCausalLM and hf.config.sliding_window == 5
    assert (logits(hf) - logits(mistral)).abs().max().item() <= 1e-4
    # Qwen2's layer_types take a pattern: layers 1 and 3 full (pattern 2), 0 and 2 within the window
    qwen = GPT(ModelConfig(**llama, qkv_bias=True, sliding_window=5, sliding_window_pattern=2)).eval()
    hf = to_hf(qwen)
    assert type(hf) is Qwen2ForCausalLM
    assert hf.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert (logits(hf) - logits(qwen)).abs().max().item() <= 1e-4
    back = model_config_from_hf(hf.config.to_dict())  # and the import reads the pattern back
    assert (back.sliding_window, back.sliding_window_pattern, back.qkv_bias) == (5, 2, True)


def test_qwen2_sliding_layers_import_when_they_form_a_pattern():
    torch.manual_seed(4)
    hf = Qwen2ForCausalLM(Qwen2Config(**_SHAPE, use_sliding_window=True, sliding_window=W, max_window_layers=0)).eval()
    cfg = model_config_from_hf(hf.config.to_dict())
    assert (cfg.sliding_window, cfg.sliding_window_pattern) == (W, 1)
    from scalelm.model.hf import from_hf

    assert (logits(hf) - logits(from_hf(hf))).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- the rest of scalelm on the import

def test_lora_run_exports_as_a_peft_adapter_of_the_hf_family(imported, tmp_path, capsys):
    """Phi-3: the q/k/v adapters become one on qkv_proj, gate/up one on gate_up_proj."""
    pytest.importorskip("peft")
    from peft import PeftModel

    from scalelm.lora import LoRAFiles, apply_lora
    from scalelm.train.model_io import ModelIO

    name, hf, ckpt = imported
    if name == "mistral-full":
        pytest.skip("the same mapping as windowed Mistral")
    gpt = load_model_dir(ckpt)
    apply_lora(gpt, LoRAConfig(r=2, alpha=4.0, targets="all"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in gpt.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    LoRAFiles(ModelIO(), gpt, ckpt).save(gpt, gpt.state_dict(), tmp_path / "lora", None, {})
    want = logits(load_model_dir(tmp_path / "lora").eval())
    convert(capsys, ckpt, "--to-hf", tmp_path / "hf")
    convert(capsys, tmp_path / "lora", "--to-peft", tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(base) is type(hf)
    got = logits(PeftModel.from_pretrained(base, tmp_path / "peft").eval())
    assert (got - want).abs().max().item() < 1e-4
    assert (got - logits(hf)).abs().max().item() > 1e-3


def test_int8_quantized_import_loads_and_generates(imported, tmp_path, capsys):
    from scalelm.model.quant import is_quantized

    _, _, ckpt = imported
    capsys.readouterr()
    assert cli.main(["quantize", str(ckpt), "--scheme", "int8", "--out", str(tmp_path / "q")]) == 0
    q = load_model_dir(tmp_path / "q").eval()
    assert is_quantized(q) and q.cfg.sliding_window == load_model_dir(ckpt).cfg.sliding_window
    ref = logits(load_model_dir(ckpt).eval())
    assert float((logits(q) - ref).norm() / ref.norm()) < 0.02
    gen = Generator.from_checkpoint(tmp_path / "q")
    out = gen.generate([1, 2, 3], max_new_tokens=6, sampling=GREEDY, ignore_eos=True)
    assert len(out[0].tokens) == 6


# ----------------------------------------------------------------------------- the window in generation

@torch.no_grad()
def test_cached_decoding_past_the_window_equals_the_uncached_forward(mistral_ckpt):
    """Prefill 5 tokens, then one token at a time to 30 (the window is 8): every step's logits are
    the full forward's at that position; so are a left-padded batch's rows of different lengths."""
    m = load_model_dir(mistral_ckpt).eval()
    seq = IDX[:, :30]
    ref = m(seq)[0]
    cache = PreallocatedKVCache(m.cfg, 2, max_len=30)
    got = [m(seq[:, :5], kv_cache=cache)[0]] + [m(seq[:, t:t + 1], kv_cache=cache)[0] for t in range(5, 30)]
    torch.testing.assert_close(torch.cat(got, 1), ref, rtol=1e-4, atol=1e-4)
    assert (without_window(m)(seq)[0] - ref).abs().max() > 1e-3
    gen = Generator(m, None, [])
    rows = [IDX[0, :13].tolist(), IDX[1, :3].tolist()]  # left-padded to one length, then decoded together
    outs = gen.generate(rows, max_new_tokens=14, sampling=GREEDY)
    for r, c in zip(rows, outs):
        alone = torch.tensor([r + c.tokens])
        want = m(alone)[0][0, len(r) - 1:-1].argmax(-1).tolist()  # greedy = the forward's argmax at each step
        assert c.tokens == want


@torch.no_grad()
def test_speculative_decoding_with_a_window_equals_plain_greedy(mistral_ckpt):
    """Rows accepting different numbers of drafts are realigned in the cache: the band still holds."""
    m = load_model_dir(mistral_ckpt).eval()
    draft = load_model_dir(mistral_ckpt).eval()
    g = torch.Generator().manual_seed(3)
    for p in draft.parameters():  # a draft that agrees often, not always
        p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std())
    prompts = [IDX[0, :12].tolist(), IDX[1, :3].tolist(), IDX[1, 5:11].tolist()]
    want = [c.tokens for c in Generator(m, None, []).generate(prompts, max_new_tokens=16, sampling=GREEDY)]
    out = Generator(m, None, [], draft=draft, speculate_k=3).generate(prompts, max_new_tokens=16, sampling=GREEDY)
    assert [c.tokens for c in out] == want
    assert len({c.accepted for c in out}) > 1  # the rows did realign


def test_beam_search_with_a_window_finds_the_brute_force_best_sequence():
    """Beam rows reordered in the cache keep the band: enough beams find the best continuation as
    scored by the uncached forward, with the prompt longer than the window."""
    V_, n = 6, 3
    torch.manual_seed(5)
    m = GPT(ModelConfig(vocab_size=V_, block_size=32, n_layer=2, n_head=2, n_embd=32, pos_embedding="rope",
                        norm="rmsnorm", mlp="swiglu", bias=False, sliding_window=3, init_std=0.3)).eval()
    prompt = [1, 4, 2, 5, 3, 0, 2]

    def score(cont):
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([prompt + list(cont)]))[0], -1)[0]
        return sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))

    best = max(itertools.product(range(V_), repeat=n), key=score)
    out = Generator(m, eos_ids=[]).beam_search([prompt], num_beams=V_ * V_, max_new_tokens=n)[0]
    assert out.tokens == list(best)


def test_serving_engine_with_a_window_decodes_each_row_as_alone(mistral_ckpt):
    """Continuous batching: rows of different lengths (some past the window, one joining a running
    batch) give the Generator's greedy tokens for each prompt alone."""
    from scalelm.serve.engine import Engine, Seq, SeqParams

    g = Generator(load_model_dir(mistral_ckpt).eval(), None, [])
    eng = Engine(g, max_batch=3, max_queue=8)  # stepped by hand: no thread
    got: dict[int, list] = {}

    def push(evs):
        for e in evs:
            got.setdefault(e.index, []).append(e)

    prompts = [IDX[0, :3].tolist(), IDX[1, :11].tolist(), IDX[0, 20:26].tolist()]
    seqs = [Seq(i, p, SeqParams(max_tokens=12, sampling=GREEDY, ignore_eos=True), push) for i, p in enumerate(prompts)]
    eng.submit(seqs[:2])
    with torch.inference_mode():
        eng.step()
        eng.step()
        eng.submit(seqs[2:])
        while eng.rows or eng.waiting:
            eng.step()
    for i, p in enumerate(prompts):
        want = g.generate([p], max_new_tokens=12, sampling=GREEDY, ignore_eos=True)[0]
        assert [e.token for e in got[i] if e.token is not None] == want.tokens, i


# ----------------------------------------------------------------------------- presets = published shapes

PUBLISHED = {
    "mistral-7b": {  # mistralai/Mistral-7B-v0.1
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "phi-3-mini": {  # microsoft/Phi-3-mini-4k-instruct
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": 32064, "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": 2047, "hidden_act": "silu",
        "attention_bias": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000},
}


@pytest.mark.parametrize("preset, params", [("mistral-7b", 7_241_732_096), ("phi-3-mini", 3_821_079_552)])
def test_preset_is_the_published_shape(preset, params):
    ours = apply_preset(Config(), preset).model
    theirs = model_config_from_hf(PUBLISHED[preset])
    theirs.block_size, theirs.init_std = ours.block_size, ours.init_std  # the context to train at differs
    assert ours == theirs
    with torch.device("meta"):
        assert GPT(ours).num_params() == params  # the published parameter counts


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("edit, message", [
    (dict(partial_rotary_factor=0.75), "partial_rotary_factor=0.75"),  # Phi-4-mini style, top level
    (dict(rope_scaling={"type": "su", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}), "rope_type='su'"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48,
                        "rope_theta": 10000.0}), "rope_type='longrope'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(sliding_window=0), "sliding_window must be at least 1"),
])
def test_unsupported_phi3_configs_are_clear_errors(edit, message):
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf(dict(PUBLISHED["phi-3-mini"], **edit))


def test_mistral_without_a_sliding_window_key_takes_the_class_default():
    hf = {k: v for k, v in PUBLISHED["mistral-7b"].items() if k != "sliding_window"}
    assert model_config_from_hf(hf).sliding_window == 4096  # as MistralConfig: 4096 unless null
    assert model_config_from_hf(dict(hf, sliding_window=None)).sliding_window is None


def test_export_refuses_a_window_no_class_holds():
    llama = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, vocab_size=V, n_layer=4,
                 n_head=2, n_embd=32, sliding_window=4)
    assert hf_family(ModelConfig(**llama)) == "mistral"
    assert hf_family(ModelConfig(**llama), prefer="phi3") == "phi3"
    assert hf_family(ModelConfig(**dict(llama, sliding_window=None)), prefer="mistral") == "mistral"
    assert hf_family(ModelConfig(**dict(llama, sliding_window=None))) == "llama"
    with pytest.raises(ConversionError, match="sliding_window_pattern=2 cannot be exported"):
        hf_family(ModelConfig(**llama, sliding_window_pattern=2))
    with pytest.raises(ConversionError, match="MistralForCausalLM needs model.bias=False"):
        hf_family(ModelConfig(**dict(llama, bias=True)))


@pytest.mark.parametrize("change, message", [
    (dict(sliding_window=0), "sliding_window must be at least 1"),
    (dict(sliding_window=4, sliding_window_pattern=0), "sliding_window_pattern must be at least 1"),
    (dict(sliding_window=4, arch="encoder-decoder"), "is for arch=gpt"),
    (dict(sliding_window=4, sliding_window_pattern=2, n_layer=4, n_shared_blocks=1), "n_shared_blocks=1"),
])
def test_bad_window_switches_are_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**change).validate()


def test_layer_kinds_follow_the_pattern():
    cfg = ModelConfig(n_layer=6, n_head=2, n_embd=32, sliding_window=4, sliding_window_pattern=3)
    assert [layer_is_local(cfg, i) for i in range(6)] == [True, True, False, True, True, False]
    m = GPT(dataclasses.replace(cfg, vocab_size=V))
    assert [m.blocks[str(i)].attn.window for i in range(6)] == [4, 4, None, 4, 4, None]
    assert not any(layer_is_local(dataclasses.replace(cfg, sliding_window=None), i) for i in range(6))
