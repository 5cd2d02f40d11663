"""Hugging Face interop, both ways: GPT-2 (``GPT2LMHeadModel``), Llama 2/3.x (``LlamaForCausalLM``,
RoPE scaling ``linear`` and ``llama3``), Qwen2/2.5 (``Qwen2ForCausalLM``: biases on q/k/v only) and
Qwen3 (``Qwen3ForCausalLM``: an RMSNorm per head on q and k). The Llama-shaped families are one
scalelm model with switches (``qkv_bias``, ``qk_norm``, ``rope_scaling``), not copies.

Importing reads an HF directory directly (``config.json`` + safetensors, sharded or not, one shard
in memory at a time; a ``pytorch_model.bin`` only through ``torch.load(weights_only=True)``), so it
needs no ``transformers``; exporting builds the ``transformers`` model and uses its ``save_pretrained``.
Weight names map one-to-one except GPT-2's ``Conv1D`` (stored transposed, q/k/v fused in
``c_attn``). scalelm's RoPE uses HF Llama's rotate-half layout, so q/k weights copy unchanged.
Tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with its chat template,
``chat_template.jinja``) are carried across in both directions.

CLI (in ``scalelm.convert``): ``scalelm convert --from-hf HF_DIR --out CKPT_DIR`` and
``scalelm convert MODEL --to-hf OUT``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Union

import torch

from ..checkpoint import staged_dir
from ..checkpoint.model_dir import copy_files, read_json, write_json, write_model_files
from ..checkpoint.names import (  # noqa: F401 (TOKENIZER_FILES: re-exported)
    FORMAT,
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_PICKLE_WEIGHTS,
    HF_WEIGHTS,
    HF_WEIGHTS_INDEX,
    TOKENIZER,
    TOKENIZER_CONFIG,
    TOKENIZER_FILES,
)
from ..config import ConfigError, ModelConfig, _coerce, _field_types
from ..errors import CheckpointError
from ..runs import resolve_checkpoint
from .gpt import GPT
from .io import (
    load_model_dir,
    load_state_dict_into,
    model_state_dict,
    read_model_config,
)
EOT = "<|endoftext|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ConversionError(CheckpointError):
    """A model that the other side cannot represent, or an HF directory we cannot read."""


# ----------------------------------------------------------------------------- configs

def _check(cfg: ModelConfig, family: str, field: str, want: Any, why: str) -> None:
    got = getattr(cfg, field)
    if got != want:
        raise ConversionError(
            f"model.{field}={got!r} cannot be exported to Hugging Face: {family} needs "
            f"model.{field}={want!r} ({why})")


def hf_family(cfg: ModelConfig) -> str:
    """'gpt2', 'llama', 'qwen2' or 'qwen3', or a ConversionError naming the first field HF cannot
    represent."""
    if cfg.n_shared_blocks is not None and cfg.n_shared_blocks != cfg.n_layer:
        raise ConversionError(
            f"model.n_shared_blocks={cfg.n_shared_blocks} (cross-layer sharing) cannot be exported: "
            "neither GPT2LMHeadModel nor LlamaForCausalLM shares blocks across layers")
    if cfg.pos_embedding == "learned":  # GPT-2 is the only HF family here with learned positions
        why = "learned positions mean GPT-2"
        _check(cfg, "GPT2LMHeadModel", "norm", "layernorm", why)
        _check(cfg, "GPT2LMHeadModel", "mlp", "gelu", why)
        _check(cfg, "GPT2LMHeadModel", "bias", True, "GPT-2's Conv1D and LayerNorm always have biases")
        if cfg.kv_heads != cfg.n_head:
            raise ConversionError(
                f"model.n_kv_head={cfg.n_kv_head} cannot be exported: GPT2LMHeadModel has no "
                f"grouped-query attention (needs n_kv_head = n_head = {cfg.n_head})")
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            raise ConversionError(
                f"model.head_size={cfg.head_size} cannot be exported: GPT2LMHeadModel's heads are n_embd / n_head "
                f"= {cfg.n_embd / cfg.n_head:g} wide")
        return "gpt2"
    why = "RoPE means Llama, Qwen2 or Qwen3"
    _check(cfg, "LlamaForCausalLM", "norm", "rmsnorm", why)
    _check(cfg, "LlamaForCausalLM", "mlp", "swiglu", why)
    if cfg.qk_norm:  # Qwen3's attention_bias would put biases on o as well, and its MLP has none
        _check(cfg, "Qwen3ForCausalLM", "bias", False, "qk_norm means Qwen3, whose MLP has no biases")
        _check(cfg, "Qwen3ForCausalLM", "qkv_bias", False, "Qwen3 has no q/k/v-only biases")
        return "qwen3"
    return "qwen2" if cfg.qkv_bias else "llama"


def _hf_rope_parameters(cfg: ModelConfig) -> dict:
    """``rope_parameters`` as transformers writes them (theta inside; the scaling keys by type)."""
    rp: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rp.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        rp.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                  high_freq_factor=cfg.rope_high_freq_factor,
                  original_max_position_embeddings=cfg.rope_original_block_size)
    return rp


def hf_config_dict(cfg: ModelConfig, eos_id: Any = None, bos_id: Any = None) -> dict:
    """The ``transformers`` config (as keyword arguments) that represents ``cfg``."""
    family = hf_family(cfg)
    tokens = dict(bos_token_id=bos_id, eos_token_id=eos_id)
    if family == "gpt2":
        return dict(model_type="gpt2", vocab_size=cfg.vocab_size, n_positions=cfg.block_size,
                    n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_inner=None if cfg.ffn_dim == 4 * cfg.n_embd else cfg.ffn_dim,
                    activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                    initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings, **tokens)
    kw = dict(model_type=family, vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
              intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layer,
              num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
              head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size,
              rms_norm_eps=cfg.norm_eps, hidden_act="silu", rope_parameters=_hf_rope_parameters(cfg),
              attention_dropout=cfg.dropout, initializer_range=cfg.init_std,
              tie_word_embeddings=cfg.tie_embeddings, **tokens)
    if family == "llama":
        kw.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif family == "qwen3":
        kw.update(attention_bias=False)
    if family != "llama":  # Qwen's configs default to a sliding window on some layers
        kw.update(use_sliding_window=False)
    return kw


def _unsupported(model_type: str, key: str, value: Any, need: str) -> ConversionError:
    return ConversionError(f"Hugging Face {model_type} config has {key}={value!r}; scalelm "
                           f"can import only {need}")


def read_hf_json(path: Path, what: str = HF_CONFIG) -> dict:
    """An HF JSON file as a dict, or a ConversionError saying what is wrong with it."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}): the {what} of a Hugging Face model directory "
                              f"is a JSON object; download or save it again (save_pretrained)") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path} holds a JSON {type(d).__name__}, not an object: not a Hugging Face "
                              f"{what}; download or save it again (save_pretrained)")
    return d


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Translate an HF ``config.json`` dict; anything scalelm cannot run exactly is an error."""
    if not isinstance(hf, dict):
        raise ConversionError(f"a Hugging Face config is a JSON object, got a {type(hf).__name__}")
    if "model_type" not in hf:
        raise ConversionError("the Hugging Face config.json has no model_type: scalelm converts 'gpt2', "
                              "'llama', 'qwen2' and 'qwen3' configs as save_pretrained writes them")
    try:
        cfg = _model_config_from_hf(hf)
        types = _field_types(ModelConfig)  # HF values of the wrong JSON type, named by our field
        for f in dataclasses.fields(ModelConfig):
            setattr(cfg, f.name, _coerce(getattr(cfg, f.name), types[f.name], f"model.{f.name}"))
        cfg.validate()
    except ConfigError as e:
        raise ConversionError(f"the Hugging Face config does not give a valid scalelm model: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # e.g. a string where a number goes
        raise ConversionError(f"the Hugging Face config.json has a value of the wrong type ({type(e).__name__}: "
                              f"{e}): compare it with the model's original config.json") from None
    return cfg


def _model_config_from_hf(hf: dict) -> ModelConfig:
    mt = hf.get("model_type")
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _unsupported(mt, "activation_function", act, "the tanh GELU (gelu_new)")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise _unsupported(mt, key, hf[key], f"{key}={want}")
        d = hf.get("n_embd", hf.get("hidden_size", 768))
        cfg = ModelConfig(
            vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
            n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=d,
            intermediate_size=hf.get("n_inner") or 4 * d, pos_embedding="learned",
            norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", bias=True,
            dropout=0.0, tie_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("initializer_range", 0.02))
    elif mt in ("llama", "qwen2", "qwen3"):
        if hf.get("hidden_act", "silu") != "silu":
            raise _unsupported(mt, "hidden_act", hf["hidden_act"], "silu (SwiGLU)")
        d, h = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
        # Qwen3's config class defaults head_dim to 128 (not hidden / heads), as its 0.6B uses
        head_dim = hf.get("head_dim", 128 if mt == "qwen3" else None)
        if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
            raise _unsupported(mt, "head_dim", head_dim, "a positive integer head_dim")
        attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if mt == "llama" and attn_bias != mlp_bias:
            raise _unsupported(mt, "mlp_bias", mlp_bias, f"mlp_bias equal to attention_bias={attn_bias}")
        if mt == "qwen3" and attn_bias:
            raise _unsupported(mt, "attention_bias", attn_bias, "attention_bias=false (as every Qwen3)")
        if mt != "llama":
            _check_full_attention(mt, hf)
        cfg = ModelConfig(
            vocab_size=hf.get("vocab_size", 32000), block_size=hf.get("max_position_embeddings", 2048),
            n_layer=hf.get("num_hidden_layers", 32), n_head=h,
            n_kv_head=hf.get("num_key_value_heads") or h, n_embd=d,
            intermediate_size=hf.get("intermediate_size", 11008), pos_embedding="rope",
            norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp="swiglu", bias=mt == "llama" and bool(attn_bias), dropout=0.0,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
            head_size=None if head_dim in (None, d // h) and d % h == 0 else head_dim,
            qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3", **_rope_from_hf(mt, hf))
    else:
        raise ConversionError(f"Hugging Face model_type {mt!r} is not supported: scalelm converts "
                              "'gpt2' (GPT2LMHeadModel), 'llama' (LlamaForCausalLM), 'qwen2' "
                              "(Qwen2ForCausalLM) and 'qwen3' (Qwen3ForCausalLM)")
    return cfg


def _rope_from_hf(mt: str, hf: dict) -> dict:
    """ModelConfig's RoPE fields from ``rope_parameters`` (transformers 5) or the older
    ``rope_scaling`` + top-level ``rope_theta``; a RoPE variant we do not compute is an error."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(mt, "partial_rotary_factor", rope["partial_rotary_factor"], "RoPE on the whole head (1.0)")
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type == "linear":
        out.update(rope_scaling="linear", rope_factor=float(rope["factor"]))
    elif rope_type == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                   rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                   rope_original_block_size=rope.get("original_max_position_embeddings",
                                                     hf.get("max_position_embeddings", 8192)))
    elif rope_type != "default":  # dynamic, yarn, longrope, ...: other tables (and attention scales)
        raise _unsupported(mt, "rope_type", rope_type, "rope_type 'default', 'linear' or 'llama3'")
    return out


def _check_full_attention(mt: str, hf: dict) -> None:
    """Qwen's sliding-window layers attend differently from ours: only all-full attention imports."""
    if hf.get("use_sliding_window", False):
        raise _unsupported(mt, "use_sliding_window", True, "full attention (use_sliding_window=false)")
    other = sorted({t for t in hf.get("layer_types") or [] if t != "full_attention"})
    if other:
        raise _unsupported(mt, "layer_types", other, "full_attention layers")


# ----------------------------------------------------------------------------- weights

def _layer_map(cfg: ModelConfig, family: str) -> list[tuple[str, str]]:
    """(scalelm name, HF name) pairs for tensors that copy unchanged."""
    pairs = []
    norms = ["weight", "bias"] if cfg.norm == "layernorm" else ["weight"]
    if family == "gpt2":
        pairs += [("tok_emb.weight", "transformer.wte.weight"), ("pos_emb.weight", "transformer.wpe.weight")]
        pairs += [(f"norm_f.{w}", f"transformer.ln_f.{w}") for w in norms]
        for i in range(cfg.n_layer):
            pairs += [(f"blocks.{i}.attn_norm.{w}", f"transformer.h.{i}.ln_1.{w}") for w in norms]
            pairs += [(f"blocks.{i}.mlp_norm.{w}", f"transformer.h.{i}.ln_2.{w}") for w in norms]
        return pairs
    pairs += [("tok_emb.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
    names = [("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
             ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.o_proj"),
             ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj")]
    params = ["weight", "bias"] if cfg.bias else ["weight"]
    for i in range(cfg.n_layer):
        pairs += [(f"blocks.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight"),
                  (f"blocks.{i}.mlp_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")]
        pairs += [(f"blocks.{i}.{s}.{p}", f"model.layers.{i}.{h}.{p}") for s, h in names for p in params]
        if cfg.qkv_bias:  # Qwen2
            pairs += [(f"blocks.{i}.attn.{x}_proj.bias", f"model.layers.{i}.self_attn.{x}_proj.bias") for x in "qkv"]
        if cfg.qk_norm:  # Qwen3
            pairs += [(f"blocks.{i}.attn.{x}_norm.weight", f"model.layers.{i}.self_attn.{x}_norm.weight") for x in "qk"]
    return pairs


# GPT-2 Conv1D modules: scalelm Linear(s) <- HF Conv1D (weight stored (in, out), i.e. transposed)
_GPT2_CONV = [("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]


def scalelm_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    family = hf_family(cfg)
    out = {hf: sd[ours] for ours, hf in _layer_map(cfg, family)}
    if family == "gpt2":
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            out[h + "attn.c_attn.weight"] = torch.cat(
                [sd[b + f"attn.{x}_proj.weight"] for x in "qkv"], dim=0).t().contiguous()
            out[h + "attn.c_attn.bias"] = torch.cat([sd[b + f"attn.{x}_proj.bias"] for x in "qkv"])
            for ours, theirs in _GPT2_CONV:
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"].t().contiguous()
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
    emb = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    out["lm_head.weight"] = out[emb] if cfg.tie_embeddings else sd["lm_head.weight"]
    return out


def _normalize_hf_keys(sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Give every key the ``*ForCausalLM`` prefix and drop buffers older checkpoints carry."""
    base = "transformer." if family == "gpt2" else "model."
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # GPT-2's causal-mask buffers, old Llama's RoPE table: recomputed, not weights
        out[k if k.startswith(base) or k == "lm_head.weight" else base + k] = v
    return out


def hf_to_scalelm_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    family = hf_family(cfg)
    sd = _normalize_hf_keys(hf_sd, family)
    used, out = set(), {}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ConversionError(f"the Hugging Face checkpoint has no tensor '{key}'")
        used.add(key)
        return sd[key]

    for ours, theirs in _layer_map(cfg, family):
        out[ours] = take(theirs)
    if family == "gpt2":
        d = cfg.n_embd
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            w, bias = take(h + "attn.c_attn.weight"), take(h + "attn.c_attn.bias")
            if tuple(w.shape) != (d, 3 * d):
                raise ConversionError(f"'{h}attn.c_attn.weight' has shape {tuple(w.shape)}, expected {(d, 3 * d)}")
            for j, x in enumerate("qkv"):
                out[b + f"attn.{x}_proj.weight"] = w[:, j * d:(j + 1) * d].t().contiguous()
                out[b + f"attn.{x}_proj.bias"] = bias[j * d:(j + 1) * d].contiguous()
            for ours, theirs in _GPT2_CONV:
                out[b + ours + ".weight"] = take(h + theirs + ".weight").t().contiguous()
                out[b + ours + ".bias"] = take(h + theirs + ".bias")
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # tied: HF may or may not store it; the embedding wins, as in HF
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    extra = sorted(set(sd) - used)
    if extra:
        raise ConversionError(f"the Hugging Face checkpoint has tensors scalelm does not know: "
                              f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
    return out


def hf_weight_files(hf_dir: Path, safetensors_only: bool = False) -> list[Path]:
    """The files holding an HF directory's weights: its one safetensors file, the shards its index
    names, or (unless ``safetensors_only``, as for Hub downloads) a weights-only ``pytorch_model.bin``."""
    if (hf_dir / HF_WEIGHTS).is_file():
        return [hf_dir / HF_WEIGHTS]
    index = hf_dir / HF_WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(read_hf_json(index, index.name)["weight_map"].values()))
        except (KeyError, AttributeError, TypeError):
            raise ConversionError(f"{index} has no weight_map of tensor -> shard file names: download or "
                                  f"save the model again") from None
        missing = [s for s in shards if not (hf_dir / s).is_file()]
        if missing or not shards:
            raise ConversionError(f"{index} names shard files that are not there ({missing[:3]}): the download is "
                                  f"incomplete; download or save the model again")
        return [hf_dir / s for s in shards]
    if safetensors_only:
        raise ConversionError(f"{hf_dir} has no {HF_WEIGHTS} or {HF_WEIGHTS_INDEX}: scalelm imports Hub models "
                              f"from safetensors only (pickled .bin weights can run code when loaded)")
    if (hf_dir / HF_PICKLE_WEIGHTS).is_file():
        return [hf_dir / HF_PICKLE_WEIGHTS]
    raise ConversionError(f"{hf_dir} has no {HF_WEIGHTS}, {HF_WEIGHTS_INDEX} or {HF_PICKLE_WEIGHTS}")


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        if path.name == HF_PICKLE_WEIGHTS:  # weights_only: plain tensors, never arbitrary pickled objects
            return torch.load(path, map_location="cpu", weights_only=True)
        return load_file(str(path))
    except Exception as e:
        raise ConversionError(f"{path} could not be read{' safely (weights only)' if path.suffix == '.bin' else ''}: "
                              f"{type(e).__name__}: {str(e)[:200]}") from None


def _tensor_shapes(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files`` as a meta tensor of its shape, from the headers alone."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shapes[k] = torch.empty(h.get_slice(k).get_shape(), device="meta")
        except Exception as e:
            raise ConversionError(f"{f} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}): "
                                  f"download or save the model again") from None
    return shapes


@torch.no_grad()
def _copy_shard(params: dict[str, torch.Tensor], part: dict[str, torch.Tensor], shapes: dict[str, torch.Tensor],
                cfg: ModelConfig) -> set[str]:
    """Convert with ``part``'s tensors real and the rest meta; copy the real outputs into ``params``.
    A function of its own so that the shard's tensors are freed when it returns."""
    done = set()
    for k, v in hf_to_scalelm_state_dict({**shapes, **part}, cfg).items():
        if not v.is_meta:
            params[k].copy_(v)
            done.add(k)
    return done


def load_hf_weights(model: GPT, hf_dir: Path, safetensors_only: bool = False) -> None:
    """Copy an HF directory's weights into ``model``, one weights file (shard) in memory at a time.

    The mapping runs first on meta tensors built from the safetensors headers, so names and shapes
    are checked before any weight is read; then each shard is loaded, the conversion is run with
    that shard's real tensors (the other tensors stay meta, so their outputs are meta and skipped),
    its outputs are copied into the model's parameters, and the shard is dropped. Peak memory is
    the model plus one shard, not the model plus the whole checkpoint converted alongside it.
    """
    cfg, source = model.cfg, "Hugging Face checkpoint"
    files = hf_weight_files(hf_dir, safetensors_only)
    if files[0].name == HF_PICKLE_WEIGHTS:  # one pickle: no header to plan from, and no shards anyway
        load_state_dict_into(model, hf_to_scalelm_state_dict(_read_weights_file(files[0]), cfg), source=source)
        return
    shapes = _tensor_shapes(files)
    plan = hf_to_scalelm_state_dict(shapes, cfg)
    with torch.device("meta"):
        shadow = GPT(cfg)
    load_state_dict_into(shadow, plan, source=source)  # every name and shape, checked on the meta twin
    params, filled = model.state_dict(), set()
    for f in files:
        filled |= _copy_shard(params, _read_weights_file(f), shapes, cfg)
    if filled != set(plan):
        raise ConversionError(f"the {source} left tensors unfilled: {sorted(set(plan) - filled)[:5]}")


# ----------------------------------------------------------------------------- models

def from_hf(src: Union[str, Path, Any], dtype: torch.dtype = torch.float32,
            safetensors_only: bool = False) -> GPT:
    """A scalelm ``GPT`` from a ``transformers`` model or an HF model directory
    (``safetensors_only``: refuse a directory whose weights are only a pickled ``.bin``)."""
    if isinstance(src, (str, Path)):
        d = Path(src)
        if not (d / HF_CONFIG).is_file():
            raise ConversionError(f"{d} is not a Hugging Face model directory (no {HF_CONFIG})")
        cfg = model_config_from_hf(read_hf_json(d / HF_CONFIG))  # a bad config fails before the weights are read
        model = GPT(cfg)
        load_hf_weights(model, d, safetensors_only)
    else:
        cfg = model_config_from_hf(src.config.to_dict())
        model = GPT(cfg)
        load_state_dict_into(model, hf_to_scalelm_state_dict(src.state_dict(), cfg), source="Hugging Face checkpoint")
    return model.to(dtype).eval()


def to_hf(model: GPT, eos_id: Any = None, bos_id: Any = None):
    """The equivalent ``transformers`` model (same weights, same dtype, eval mode)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ConversionError("exporting needs transformers: pip install 'scalelm[hf]'") from None
    kw = hf_config_dict(model.cfg, eos_id, bos_id)
    config = AutoConfig.for_model(**kw)
    hf = AutoModelForCausalLM.from_config(config)
    sd = scalelm_to_hf_state_dict(model_state_dict(model), model.cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]:
        raise ConversionError(f"internal mapping error: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    dtype = next(model.parameters()).dtype
    return hf.to(dtype).eval()


# ----------------------------------------------------------------------------- directories

def special_token_ids(ckpt_dir: Union[str, Path]) -> tuple[Any, Any]:
    """(bos, eos) ids of a model directory: an imported HF model's own config wins; otherwise
    our tokenizers use ``<|endoftext|>`` for both. eos may be a list (Llama 3 has several)."""
    d = Path(ckpt_dir)
    meta = json.loads((d / HF_CONFIG).read_text()).get("hf") or {}
    if meta.get("eos_token_id") is not None:
        return meta.get("bos_token_id"), meta["eos_token_id"]
    if not (d / TOKENIZER).is_file():
        return None, None
    from tokenizers import Tokenizer

    eot = Tokenizer.from_file(str(d / TOKENIZER)).token_to_id(EOT)
    return eot, eot


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    return copy_files(src, dst, TOKENIZER_FILES)


def import_hf_dir(hf_dir: Union[str, Path], out_dir: Union[str, Path],
                  dtype: torch.dtype = torch.float32, source: str | None = None,
                  safetensors_only: bool = False) -> Path:
    """HF directory -> scalelm model directory (weights, config, tokenizer files). ``source`` is
    recorded as where the model came from (default: the directory; a Hub download names its id)."""
    src = Path(hf_dir)
    if not src.is_dir():
        raise ConversionError(f"Hugging Face model directory not found: {src}")
    model = from_hf(src, dtype, safetensors_only=safetensors_only)
    hf_cfg = read_hf_json(src / HF_CONFIG)
    meta = {k: hf_cfg.get(k) for k in ("model_type", "architectures", "bos_token_id", "eos_token_id",
                                        "pad_token_id")}
    gen_cfg = src / HF_GENERATION_CONFIG
    if gen_cfg.is_file():  # chat models list their end-of-turn tokens here (eos may be a list)
        g = read_hf_json(gen_cfg, HF_GENERATION_CONFIG)
        meta.update({k: g[k] for k in ("bos_token_id", "eos_token_id") if g.get(k) is not None})
    extra = {"hf": meta, "source": source or str(src.resolve())}
    with staged_dir(out_dir) as d:  # the weights, config and the copied tokenizer files, published at once
        write_model_files(d, dataclasses.asdict(model.cfg), model.state_dict(), extra=extra)
        _copy_tokenizer_files(src, d)
    return Path(out_dir)


def export_hf_dir(ckpt: Union[str, Path], out_dir: Union[str, Path],
                  dtype: torch.dtype = torch.float32) -> Path:
    """scalelm model directory (or RUN_DIR) -> directory ``AutoModelForCausalLM`` loads."""
    src = resolve_checkpoint(ckpt)
    cfg = read_model_config(src)
    hf_family(cfg)  # fail on an unrepresentable config before loading any weights
    bos, eos = special_token_ids(src)
    hf = to_hf(load_model_dir(src, dtype=dtype, allow_quantized=False).eval(), eos_id=eos, bos_id=bos)
    out = Path(out_dir)
    with staged_dir(out, manifest=False) as tmp:  # Hugging Face's format: no manifest of ours
        hf.save_pretrained(tmp, safe_serialization=True)
        copied = _copy_tokenizer_files(src, tmp)
        if TOKENIZER in copied and TOKENIZER_CONFIG not in copied:
            # lets AutoTokenizer.from_pretrained(out) work on a tokenizer that scalelm trained
            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size}
            from tokenizers import Tokenizer

            if Tokenizer.from_file(str(tmp / TOKENIZER)).token_to_id(EOT) is not None:
                tc.update(eos_token=EOT, bos_token=EOT)
            write_json(tmp / TOKENIZER_CONFIG, tc)
    return out


# ----------------------------------------------------------------------------- output check

def is_hf_model_dir(path: Path) -> bool:
    """A directory ``save_pretrained`` wrote: a config.json with a model_type (and no scalelm format)."""
    cfg = read_json(Path(path) / HF_CONFIG)
    return cfg is not None and "model_type" in cfg and cfg.get("format") != FORMAT
