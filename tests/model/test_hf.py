"""Hugging Face interop: logits parity both ways, both families, and clear errors."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import run_cli  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from scalelm import cli  # noqa: E402
from scalelm.config import ModelConfig  # noqa: E402
from scalelm.model import GPT  # noqa: E402
from scalelm.model.hf import (  # noqa: E402
    ConversionError,
    export_hf_dir,
    from_hf,
    import_hf_dir,
    to_hf,
)
from scalelm.model.io import load_model_dir, save_model_dir  # noqa: E402

V = 300  # the vocabulary of the `tiny_tokenizer_json` fixture
HF_CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                               bos_token_id=None, eos_token_id=None),
    # non-default shape: custom MLP width, epsilon, untied head, odd head count
    "gpt2-odd": lambda: GPT2Config(vocab_size=V, n_positions=40, n_embd=48, n_layer=3, n_head=3,
                                   n_inner=80, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                                   bos_token_id=None, eos_token_id=None),
    "llama-gqa": lambda: LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=64, rope_theta=5000.0,
                                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=None),
    "llama-untied-bias": lambda: LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=80,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=64, rms_norm_eps=1e-5,
                                             attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                             bos_token_id=None, eos_token_id=None),
}


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # a module-wide fixture (conftest)


def random_hf(name: str):
    """A random-init HF model with every parameter perturbed (norms and biases non-trivial)."""
    torch.manual_seed(0)
    cfg = HF_CONFIGS[name]()
    m = (GPT2LMHeadModel if cfg.model_type == "gpt2" else LlamaForCausalLM)(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def hf_logits(m, idx):
    with torch.no_grad():
        return m(idx).logits


def our_logits(m, idx):
    with torch.no_grad():
        return m.eval()(idx)[0]


IDX = torch.randint(0, V, (2, 33), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_import_matches_hf_logits(name):
    hf = random_hf(name)
    ours = from_hf(hf)
    diff = (hf_logits(hf, IDX) - our_logits(ours, IDX)).abs().max().item()
    assert diff <= 1e-4
    assert ours.cfg.tie_embeddings == hf.config.tie_word_embeddings
    if name == "llama-gqa":
        assert ours.cfg.n_kv_head == 2 and ours.cfg.rope_theta == 5000.0


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_export_matches_and_round_trips_exactly(name):
    ours = from_hf(random_hf(name))
    back = to_hf(ours)
    assert (hf_logits(back, IDX) - our_logits(ours, IDX)).abs().max().item() <= 1e-4
    again = from_hf(back)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def scalelm_shapes():
    return {
        "gpt2": ModelConfig(vocab_size=V, block_size=48, n_layer=2, n_head=4, n_embd=64),
        "llama": ModelConfig(vocab_size=V, block_size=48, n_layer=2, n_head=4, n_kv_head=1, n_embd=64,
                             pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                             tie_embeddings=False, rope_theta=500000.0),
    }


def convert(capsys, *args):
    """`scalelm convert ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main(["convert", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cli_export_then_import(tmp_path, family, tiny_tokenizer_json, capsys):
    """scalelm dir -> `convert --to-hf` -> AutoModelForCausalLM -> `convert --from-hf` -> same weights."""
    torch.manual_seed(0)
    m = GPT(scalelm_shapes()[family]).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save_model_dir(m, tmp_path / "ckpt", tokenizer_json=tiny_tokenizer_json)
    if family == "gpt2":  # the real console entry once; in-process otherwise (start-up is slow)
        run_cli("convert", tmp_path / "ckpt", "--to-hf", tmp_path / "hf")
    else:
        assert convert(capsys, tmp_path / "ckpt", "--to-hf", tmp_path / "hf")[0] == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if family == "gpt2" else "LlamaForCausalLM")
    assert (hf_logits(hf, IDX) - our_logits(m, IDX)).abs().max().item() <= 1e-4
    # the tokenizer travels and HF can load it; <|endoftext|> becomes bos/eos
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    from tokenizers import Tokenizer
    ours_tok = Tokenizer.from_str(tiny_tokenizer_json)
    assert tok("To be, or not")["input_ids"] == ours_tok.encode("To be, or not").ids
    assert hf.config.eos_token_id == ours_tok.token_to_id("<|endoftext|>")

    rc, out, _ = convert(capsys, "--from-hf", tmp_path / "hf", "--out", tmp_path / "back")
    assert rc == 0 and json.loads(out)["out"] == str(tmp_path / "back")
    back = load_model_dir(tmp_path / "back")
    for (k, a), b in zip(m.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "back" / "tokenizer.json").read_text() == tiny_tokenizer_json


def test_import_keeps_chat_template_and_eos(tmp_path, tiny_tokenizer_json):
    hf = random_hf("llama-gqa")
    hf.config.eos_token_id = 7
    hf.save_pretrained(tmp_path / "hf")
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (tmp_path / "hf" / "tokenizer.json").write_text(tiny_tokenizer_json)
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    # a chat model's end-of-turn tokens are listed in generation_config.json
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    out = import_hf_dir(tmp_path / "hf", tmp_path / "ckpt")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert json.loads((out / "config.json").read_text())["hf"]["eos_token_id"] == [7, 9]
    from scalelm.generate.generator import Generator
    gen = Generator.from_checkpoint(out)
    assert gen.eos_ids == {7, 9} and gen.chat_template == template
    # and back out again: the template and the end tokens survive the export
    export_hf_dir(out, tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "tokenizer_config.json").read_text())["chat_template"] == template
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").config.eos_token_id == [7, 9]


def test_import_sharded_safetensors_and_weights_only_bin(tmp_path):
    hf = random_hf("gpt2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ref = hf_logits(hf, IDX)
    assert (our_logits(from_hf(tmp_path / "sharded"), IDX) - ref).abs().max().item() <= 1e-4
    # an old-style pytorch_model.bin with the unprefixed GPT-2 keys and its attn.bias buffers
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text(hf.config.to_json_string())
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    torch.save(sd, d / "pytorch_model.bin")
    assert (our_logits(from_hf(d), IDX) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("change, field", [
    (dict(norm="rmsnorm"), "model.norm"),  # learned positions + RMSNorm
    (dict(bias=False), "model.bias"),  # GPT-2 without biases
    (dict(n_shared_blocks=1), "model.n_shared_blocks"),  # cross-layer sharing
    (dict(n_kv_head=2), "model.n_kv_head"),  # GPT-2 with GQA
    (dict(pos_embedding="rope"), "model.norm"),  # RoPE + LayerNorm is neither family
    (dict(pos_embedding="rope", norm="rmsnorm"), "model.mlp"),  # RoPE + GELU
])
def test_unrepresentable_config_is_a_clear_error(change, field):
    cfg = ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, **change)
    with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
        to_hf(GPT(cfg))


def test_cli_unrepresentable_export_writes_nothing(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, norm="rmsnorm")
    save_model_dir(GPT(cfg), tmp_path / "ckpt")
    rc, _, err = convert(capsys, tmp_path / "ckpt", "--to-hf", tmp_path / "hf")
    assert rc == 2 and "model.norm='rmsnorm'" in err
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    rc, _, err = convert(capsys, tmp_path / "ckpt")
    assert rc == 2 and "--from-hf" in err


@pytest.mark.parametrize("edit, message", [
    (dict(model_type="roberta"), "model_type 'roberta' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}), "rope_type='yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_hf_config_is_a_clear_error(tmp_path, edit, message):
    hf = random_hf("llama-gqa")
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(edit)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_hf(tmp_path / "hf")


def test_missing_hf_tensor_and_missing_dir_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = random_hf("llama-gqa")
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ConversionError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        from_hf(tmp_path / "hf")
    with pytest.raises(ConversionError, match="not found"):
        import_hf_dir(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
