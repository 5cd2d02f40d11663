"""Hugging Face families beyond GPT-2 and plain Llama: Llama 3.x RoPE scaling (llama3, linear),
Qwen2/2.5 (biases on q/k/v only) and Qwen3 (an RMSNorm per head on q and k).

Each family: a random-init HF model from a tiny config, saved with save_pretrained, through
`convert --from-hf`, logits within 1e-4 of HF (fp32); `convert --to-hf` back to the same HF class
and logits again; then one LoRA step and an int8 quantization of the import. The presets of the
published shapes are checked against those models' real config.json.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from scalelm import cli  # noqa: E402
from scalelm.config import Config, ConfigError, LoRAConfig, ModelConfig, apply_preset  # noqa: E402
from scalelm.model.gpt import GPT, rope_tables  # noqa: E402
from scalelm.model.hf import ConversionError, hf_family, model_config_from_hf  # noqa: E402
from scalelm.model.io import load_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

V = 300  # the vocabulary of the `tiny_tokenizer_json` fixture (served chat needs a tokenizer)
_SHAPE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
# original_max_position_embeddings=16 puts this 16-wide head's wavelengths (6 to 5e4 tokens) in
# all three llama3 bands: kept (< 4), blended (4..16) and divided by the factor (> 16)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama3": (LlamaForCausalLM, lambda: LlamaConfig(**_SHAPE, rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "llama-linear": (LlamaForCausalLM, lambda: LlamaConfig(
        **_SHAPE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        tie_word_embeddings=False)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(
        **_SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)),
    # 4 heads x 32 > 64 wide, as Qwen3 0.6B's 16 x 128 > 1024; untied head
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**_SHAPE, head_dim=32, tie_word_embeddings=False)),
}
IDX = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))


def random_hf(name: str):
    """A random-init HF model with every parameter perturbed (norms and biases non-trivial)."""
    torch.manual_seed(0)
    cls, make = FAMILIES[name]
    m = cls(make())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def convert(capsys, *args):
    capsys.readouterr()
    rc = cli.main(["convert", *map(str, args)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def logits(m, idx=IDX):
    with torch.no_grad():
        out = m(idx)
        return out.logits if hasattr(out, "logits") else out[0]


TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory, tiny_tokenizer_json):
    """(family, HF model, scalelm model dir) with the HF model saved (with a tokenizer and a chat
    template) and imported through the CLI."""
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
    assert (logits(hf) - logits(ours)).abs().max().item() <= 1e-4
    cfg = ours.cfg
    assert cfg.qkv_bias == (name == "qwen2") and cfg.qk_norm == (name == "qwen3")
    assert cfg.rope_scaling == {"llama3": "llama3", "llama-linear": "linear"}.get(name, "none")
    convert(capsys, ckpt, "--to-hf", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(hf)
    assert back.config.rope_parameters == hf.config.rope_parameters
    assert (logits(back) - logits(hf)).abs().max().item() <= 1e-4
    hf_sd, back_sd = hf.state_dict(), back.state_dict()
    assert set(hf_sd) == set(back_sd) and all(torch.equal(hf_sd[k], back_sd[k]) for k in hf_sd)


@pytest.mark.parametrize("name", ["llama3", "llama-linear"])
def test_scaled_rope_frequencies_are_hf_s(name):
    """Our tables against HF's own rotary embedding (the parity test alone could miss a band that
    the 40-token batch hardly exercises)."""
    hf = random_hf(name)
    cfg = model_config_from_hf(hf.config.to_dict())
    ours, _ = rope_tables(cfg.head_dim, 64, cfg.rope_theta, cfg)
    pos = torch.arange(64)[None]
    cos, _ = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    assert (ours - cos[0]).abs().max().item() < 1e-5
    plain, _ = rope_tables(cfg.head_dim, 64, cfg.rope_theta)
    assert (plain - ours).abs().max().item() > 0.1  # the scaling changes the table


def test_lora_step_on_the_import(imported):
    from scalelm.config import OptimConfig
    from scalelm.lora import apply_lora
    from scalelm.train.optim import build_optimizer

    _, _, ckpt = imported
    gpt = load_model_dir(ckpt)
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    names = apply_lora(gpt, LoRAConfig(r=2, targets="all"))
    assert len(names) == 2 * 7
    opt = build_optimizer(gpt, OptimConfig(lr=1e-2))
    gpt.train()
    loss = gpt(IDX[:, :-1], IDX[:, 1:])[1]
    loss.backward()
    assert torch.isfinite(loss)
    opt.step()
    sd = gpt.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base.items())  # the base (biases, q/k norms) is frozen
    assert all(sd[f"{n}.lora_B"].abs().sum() > 0 for n in names)


def test_lora_run_exports_as_a_peft_adapter_of_the_hf_family(imported, tmp_path, capsys):
    """`convert --to-peft` of a LoRA run on the import: PEFT on the `--to-hf` base gives our logits."""
    pytest.importorskip("peft")
    from peft import PeftModel

    from scalelm.lora import LoRAFiles, apply_lora
    from scalelm.train.model_io import ModelIO

    _, hf, ckpt = imported
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
    assert (got - logits(hf)).abs().max().item() > 1e-3  # the adapters were applied


def test_int8_quantized_import_loads_and_generates(imported, tmp_path, capsys):
    from scalelm.generate.generator import Generator
    from scalelm.generate.sampling import SamplingParams
    from scalelm.model.quant import is_quantized

    _, _, ckpt = imported
    capsys.readouterr()
    assert cli.main(["quantize", str(ckpt), "--scheme", "int8", "--out", str(tmp_path / "q")]) == 0
    q = load_model_dir(tmp_path / "q").eval()
    assert is_quantized(q)
    ref = logits(load_model_dir(ckpt).eval())
    assert float((logits(q) - ref).norm() / ref.norm()) < 0.02
    gen = Generator.from_checkpoint(tmp_path / "q")
    out = gen.generate([1, 2, 3], max_new_tokens=6, sampling=SamplingParams(temperature=0.0), ignore_eos=True)
    assert len(out[0].tokens) == 6


# ----------------------------------------------------------------------------- presets = published shapes

# the published config.json of each model (the fields that shape it)
PUBLISHED = {
    "llama-1b": {  # meta-llama/Llama-3.2-1B
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "tie_word_embeddings": True},
    "smollm2-135m": {  # HuggingFaceTB/SmolLM2-135M
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000, "rope_scaling": None,
        "hidden_act": "silu", "tie_word_embeddings": True},
    "qwen2.5-0.5b": {  # Qwen/Qwen2.5-0.5B
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 24,
        "hidden_act": "silu", "tie_word_embeddings": True},
    "qwen3-0.6b": {  # Qwen/Qwen3-0.6B
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
        "rope_scaling": None, "attention_bias": False, "use_sliding_window": False,
        "hidden_act": "silu", "tie_word_embeddings": True},
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_is_the_published_shape(preset):
    ours = apply_preset(Config(), preset).model
    theirs = model_config_from_hf(PUBLISHED[preset])
    theirs.block_size, theirs.init_std = ours.block_size, ours.init_std  # the context to train at differs
    assert ours == theirs
    with torch.device("meta"):
        assert set(GPT(ours).state_dict()) == set(GPT(theirs).state_dict())


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling="llama3", rope_factor=8.0), "needs pos_embedding=rope"),
    (dict(pos_embedding="rope", rope_scaling="linear", rope_factor=0.0), "rope_factor must be positive"),
    (dict(pos_embedding="rope", rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0),
     "0 < low < high"),
    (dict(qkv_bias=True), "qkv_bias=true is for bias=false"),
    (dict(qk_norm=True), "needs norm=rmsnorm"),
])
def test_bad_family_switches_are_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**change).validate()


def test_export_refuses_what_no_hf_class_holds():
    llama = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, vocab_size=V, n_layer=1,
                 n_head=2, n_embd=32)
    assert hf_family(ModelConfig(**llama, qk_norm=True)) == "qwen3"
    assert hf_family(ModelConfig(**llama, qkv_bias=True)) == "qwen2"
    with pytest.raises(ConversionError, match="Qwen3ForCausalLM needs model.qkv_bias=False"):
        hf_family(ModelConfig(**llama, qk_norm=True, qkv_bias=True))
    with pytest.raises(ConversionError, match="Qwen3ForCausalLM needs model.bias=False"):
        hf_family(ModelConfig(**dict(llama, bias=True), qk_norm=True))


@pytest.mark.parametrize("edit, message", [
    # layers 4.. sliding, 0..3 full: no sliding_window_pattern says that (all sliding, or every p-th full)
    (dict(use_sliding_window=True, max_window_layers=4), "layer_types"),
    (dict(layer_types=["sliding_attention"] * 28), "sliding_window=None"),  # sliding layers, no window
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e6}), "rope_type='longrope'"),
])
def test_unsupported_qwen_configs_are_clear_errors(edit, message):
    hf = dict(PUBLISHED["qwen3-0.6b"], **edit)
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf(hf)


def test_structured_pruning_keeps_the_qk_norms_and_biases(imported):
    """Pruning heads of a Qwen import copies the per-head q/k norms and the kept q/k/v biases
    (a missing copy would leave uninitialised memory, not an error)."""
    from scalelm.compress.structured import prune_structured

    name, _, ckpt = imported
    if name not in ("qwen2", "qwen3"):
        pytest.skip("the Qwen switches only")
    model = load_model_dir(ckpt).eval()
    small, _ = prune_structured(model, IDX[:, :16], heads=2)
    assert small.cfg.n_head == 2 and small.cfg.qk_norm == model.cfg.qk_norm
    sd, big = small.state_dict(), model.state_dict()
    for i in range(2):
        for x in ("q_norm", "k_norm") if name == "qwen3" else ():
            assert torch.equal(sd[f"blocks.{i}.attn.{x}.weight"], big[f"blocks.{i}.attn.{x}.weight"])
        if name == "qwen2":  # the kept kv group's bias rows (4 q heads / 2 kv heads -> 1 group of 2)
            b = sd[f"blocks.{i}.attn.k_proj.bias"]
            assert any(torch.equal(b, big[f"blocks.{i}.attn.k_proj.bias"][g * 16:(g + 1) * 16]) for g in range(2))
    assert torch.isfinite(logits(small)).all()


def test_served_chat_completion_on_the_import(imported):
    """The OpenAI-compatible server answers a chat completion with the imported model and its
    carried-over chat template."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from serve_helpers import Live

    _, _, ckpt = imported
    s = Live(ckpt, max_batch=2, max_queue=4)
    try:
        r = s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "To be"}],
                                               max_tokens=5, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop") and 1 <= r.usage.completion_tokens <= 5
        assert isinstance(r.choices[0].message.content, str) and r.usage.prompt_tokens > 2
    finally:
        s.close()


def test_tensor_parallelism_refuses_qk_norm():
    from scalelm.config import ParallelConfig
    from scalelm.distributed.mesh import LayoutError, resolve_layout

    qwen3 = apply_preset(Config(), "qwen3-0.6b").model
    assert resolve_layout(ParallelConfig(tp=1), qwen3, 2).dp_shard == 2
    with pytest.raises(LayoutError, match="qk_norm .* tensor parallelism"):
        resolve_layout(ParallelConfig(tp=2), qwen3, 2)
