"""Hugging Face configs <-> ``ModelConfig``, both ways: which HF class holds a scalelm model
(:func:`hf_family`) and its ``config.json`` (:func:`hf_config_dict`), and the ``ModelConfig`` of an
HF ``config.json`` (:func:`model_config_from_hf`), with one :class:`ConversionError` naming the key
for anything scalelm cannot run exactly (a RoPE type, an irregular window pattern, an activation).
The families and what each needs are listed in :mod:`scalelm.model.hf`; the encoders' (BERT,
ModernBERT) at the end here, their weights in :mod:`scalelm.model.hf_encoder`.
"""


from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from ..checkpoint.names import HF_CONFIG
from ..config import ConfigError, ModelConfig, _coerce, _field_types
from ..errors import CheckpointError
from .gpt import layer_is_local


class ConversionError(CheckpointError):
    """A model that the other side cannot represent, or an HF directory we cannot read."""


ENCODER_FAMILIES = ("bert", "modernbert")  # masked-LM encoders (scalelm/model/hf_encoder.py)


# ----------------------------------------------------------------------------- configs

def _check(cfg: ModelConfig, family: str, field: str, want: Any, why: str) -> None:
    got = getattr(cfg, field)
    if got != want:
        raise ConversionError(
            f"model.{field}={got!r} cannot be exported to Hugging Face: {family} needs "
            f"model.{field}={want!r} ({why})")


def hf_family(cfg: ModelConfig, prefer: Optional[str] = None) -> str:
    """'gpt2', 'llama', 'qwen2', 'qwen3', 'mistral' or 'phi3', or a ConversionError naming the first
    field HF cannot represent. ``prefer`` (the ``model_type`` an import came from) wins where that
    family holds the model: a Mistral or Phi-3 import goes back to its own class. An encoder
    (``arch = "encoder"``) is 'bert' or 'modernbert' (:mod:`scalelm.model.hf_encoder`)."""
    if cfg.arch == "encoder":
        return encoder_family(cfg)
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
        _check_switches(cfg, "GPT2LMHeadModel")
        return "gpt2"
    if cfg.norm_placement != "pre":  # norms on the sub-layers' outputs: OLMo 2 or Gemma 2/3
        return _post_norm_family(cfg)
    why = "RoPE means Llama, Qwen2 or Qwen3"
    _check(cfg, "LlamaForCausalLM", "norm", "rmsnorm", why)
    _check(cfg, "LlamaForCausalLM", "mlp", "swiglu", why)
    _check_switches(cfg, "LlamaForCausalLM")
    if cfg.qk_norm:  # Qwen3's attention_bias would put biases on o as well, and its MLP has none
        _check(cfg, "Qwen3ForCausalLM", "bias", False, "qk_norm means Qwen3, whose MLP has no biases")
        _check(cfg, "Qwen3ForCausalLM", "qkv_bias", False, "Qwen3 has no q/k/v-only biases")
        return "qwen3"
    return "qwen2" if cfg.qkv_bias else _llama_shaped_family(cfg, prefer)


def _llama_shaped_family(cfg: ModelConfig, prefer: Optional[str]) -> str:
    """Llama, Mistral or Phi-3 for the plain Llama shape. A sliding window needs Mistral or Phi-3,
    whose layers all attend within it (Qwen2/Qwen3 take any layer pattern, but have q/k/v biases
    or q/k norms); without a window all three compute the same, and the import's family is kept."""
    local = [layer_is_local(cfg, i) for i in range(cfg.n_layer)]
    if any(local) and not all(local):
        raise ConversionError(
            f"model.sliding_window_pattern={cfg.sliding_window_pattern} cannot be exported to Hugging Face: "
            f"MistralForCausalLM and Phi3ForCausalLM attend within the window on every layer (pattern 1)")
    if prefer == "phi3" and not cfg.bias and cfg.rope_scaling == "none" and cfg.head_dim * cfg.n_head == cfg.n_embd:
        return "phi3"
    if cfg.sliding_window is None and (prefer != "mistral" or cfg.bias):
        return "llama"
    _check(cfg, "MistralForCausalLM", "bias", False, "a sliding window means Mistral, which has no biases")
    return "mistral"


# OLMo 2's and Gemma's switches, and the classes that have each (every other class needs its default)
_SWITCH_OWNERS = {
    "qk_norm_scope": "Olmo2ForCausalLM", "norm_placement": "Olmo2ForCausalLM and Gemma2/3ForCausalLM",
    "norm_unit_offset": "Gemma2/3ForCausalLM", "embed_scale": "Gemma2/3ForCausalLM",
    "attn_scalar": "Gemma2/3ForCausalLM", "attn_softcap": "Gemma2ForCausalLM", "logit_softcap": "Gemma2/3ForCausalLM",
    "rope_local_theta": "Gemma3ForCausalLM",
}
_SWITCH_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in _SWITCH_OWNERS}


def _check_switches(cfg: ModelConfig, cls: str, allowed: tuple[str, ...] = ()) -> None:
    """Every OLMo 2 / Gemma switch but ``allowed`` at its default, as ``cls`` has no such switch."""
    for name, default in _SWITCH_DEFAULTS.items():
        if name not in allowed:
            _check(cfg, cls, name, default, f"only {_SWITCH_OWNERS[name]} can hold another value")


def _post_norm_family(cfg: ModelConfig) -> str:
    """'olmo2' (norm_placement=post) or 'gemma2' / 'gemma3' (sandwich; Gemma 3 has per-head q/k norms),
    or a ConversionError naming the first field that family cannot hold."""
    if cfg.norm_placement == "post":
        cls, why = "Olmo2ForCausalLM", "norm_placement=post means OLMo 2"
        for field, want in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("bias", False), ("qkv_bias", False),
                            ("qk_norm", True), ("qk_norm_scope", "all"), ("sliding_window", None)):
            _check(cfg, cls, field, want, why)
        _check_switches(cfg, cls, allowed=("norm_placement", "qk_norm_scope"))
        return "olmo2"
    family = "gemma3" if cfg.qk_norm else "gemma2"
    cls = "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
    why = "norm_placement=sandwich means Gemma 2 (or Gemma 3, with qk_norm)"
    for field, want in (("norm", "rmsnorm"), ("mlp", "geglu"), ("bias", False), ("qkv_bias", False),
                        ("norm_unit_offset", True), ("qk_norm_scope", "head"), ("embed_scale", cfg.n_embd ** 0.5)):
        _check(cfg, cls, field, want, why if field != "embed_scale" else "Gemma scales embeddings by sqrt(hidden_size)")
    if cfg.attn_scalar is not None and not float(cfg.attn_scalar).is_integer():
        raise ConversionError(f"model.attn_scalar={cfg.attn_scalar} cannot be exported to Hugging Face: {cls}'s "
                              f"query_pre_attn_scalar is an integer")
    allowed = ("norm_placement", "norm_unit_offset", "embed_scale", "attn_scalar", "logit_softcap")
    # Gemma3ForCausalLM never soft-caps attention scores (its config's attn_logit_softcapping is unused)
    _check_switches(cfg, cls, allowed + (("rope_local_theta",) if family == "gemma3" else ("attn_softcap",)))
    return family


def _post_norm_config(cfg: ModelConfig, family: str, kw: dict) -> dict:
    """OLMo 2's or Gemma's config keywords from the Llama-shaped ones ``kw``."""
    kw = dict(kw, model_type="gemma3_text" if family == "gemma3" else family, attention_bias=False)
    if family == "olmo2":
        if cfg.head_size is None:  # Olmo2Config has no head_dim: hidden / heads unless one is given
            del kw["head_dim"]
        return kw
    del kw["hidden_act"]
    kw.update(hidden_activation="gelu_pytorch_tanh",
              query_pre_attn_scalar=int(cfg.head_dim if cfg.attn_scalar is None else cfg.attn_scalar),
              layer_types=["sliding_attention" if layer_is_local(cfg, i) else "full_attention"
                           for i in range(cfg.n_layer)],
              # without a window every layer is full_attention, but Gemma still builds a sliding mask from it
              sliding_window=cfg.sliding_window or cfg.block_size, final_logit_softcapping=cfg.logit_softcap,
              attn_logit_softcapping=cfg.attn_softcap)
    if family == "gemma3":  # RoPE per layer type: the local layers' own base, unscaled
        rp = kw["rope_parameters"]
        local = rp if cfg.rope_local_theta is None else {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
        kw.update(rope_parameters={"full_attention": rp, "sliding_attention": dict(local)},
                  use_bidirectional_attention=False)
    return kw


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


def hf_config_dict(cfg: ModelConfig, eos_id: Any = None, bos_id: Any = None, prefer: Optional[str] = None) -> dict:
    """The ``transformers`` config (as keyword arguments) that represents ``cfg`` (``prefer``: see
    :func:`hf_family`)."""
    family = hf_family(cfg, prefer)
    tokens = dict(bos_token_id=bos_id, eos_token_id=eos_id)
    if family in ENCODER_FAMILIES:
        return encoder_hf_config(cfg, family, tokens)
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
    if family in ("olmo2", "gemma2", "gemma3"):
        return _post_norm_config(cfg, family, kw)
    if family == "llama":
        kw.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif family == "qwen3":
        kw.update(attention_bias=False)
    if family in ("qwen2", "qwen3"):  # Qwen's configs default to a sliding window on some layers
        kw.update(use_sliding_window=False)
        if cfg.sliding_window is not None:  # their layer_types name each layer's kind: any pattern
            kw.update(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=0,
                      layer_types=["sliding_attention" if layer_is_local(cfg, i) else "full_attention"
                                   for i in range(cfg.n_layer)])
    if family in ("mistral", "phi3"):  # None is written as null: Mistral's config would default to 4096
        kw.update(sliding_window=cfg.sliding_window)
    if family == "phi3":  # head_dim is hidden / heads; pad_token_id defaults to 32000, past a small vocabulary
        del kw["head_dim"]
        kw.update(original_max_position_embeddings=cfg.block_size, resid_pdrop=cfg.dropout,
                  embd_pdrop=cfg.dropout, pad_token_id=None)
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
                              "'llama', 'qwen2', 'qwen3', 'mistral', 'phi3', 'olmo2', 'gemma2', "
                              "'gemma3_text', 'bert' and 'modernbert' configs as save_pretrained writes them")
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
    elif mt in ("llama", "qwen2", "qwen3", "mistral", "phi3"):
        hf = {**_HF_DEFAULTS.get(mt, {}), **hf}  # the keys a config.json leaves out mean the class's defaults
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
        window = _window_from_hf(mt, hf)
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
            qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3", **_rope_from_hf(mt, hf), **window)
    elif mt in ("olmo2", "gemma2", "gemma3_text"):
        cfg = _post_norm_model_config(mt, hf)
    elif mt in ENCODER_FAMILIES:
        cfg = encoder_config_from_hf(mt, hf)
    elif mt == "gemma3":
        raise ConversionError("Hugging Face model_type 'gemma3' (Gemma3ForConditionalGeneration, text and vision) "
                              "is not supported: scalelm imports the text-only Gemma 3 models, model_type "
                              "'gemma3_text' (Gemma3ForCausalLM: gemma-3-1b and gemma-3-270m)")
    else:
        raise ConversionError(f"Hugging Face model_type {mt!r} is not supported: scalelm converts "
                              "'gpt2' (GPT2LMHeadModel), 'llama' (LlamaForCausalLM), 'qwen2' "
                              "(Qwen2ForCausalLM), 'qwen3' (Qwen3ForCausalLM), 'mistral' "
                              "(MistralForCausalLM), 'phi3' (Phi3ForCausalLM), 'olmo2' (Olmo2ForCausalLM), "
                              "'gemma2' (Gemma2ForCausalLM), 'gemma3_text' (Gemma3ForCausalLM), 'bert' "
                              "(BertForMaskedLM) and 'modernbert' (ModernBertForMaskedLM)")
    return cfg


# the config classes' defaults for keys a config.json leaves out (OLMo 2's are Llama's fallbacks)
_POST_NORM_DEFAULTS = {
    "olmo2": dict(vocab_size=50304, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None),
}


def _post_norm_model_config(mt: str, hf: dict) -> ModelConfig:
    """OLMo 2 (norms after attention and MLP, q/k norms over the whole projections) or Gemma 2/3
    (norms before and after, 1 + w RMSNorm, GeGLU, scaled embeddings, soft-capping, local and
    global layers; Gemma 3: per-head q/k norms and the local layers' own RoPE base)."""
    hf = {**_POST_NORM_DEFAULTS[mt], **hf}
    if hf.get("attention_bias", False):  # biases on q/k/v/o but none in the MLP: no switch of ours does that
        raise _unsupported(mt, "attention_bias", hf["attention_bias"], "attention_bias=false (as every release)")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")  # OLMo 2 reads one only where its config.json has it
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
        raise _unsupported(mt, "head_dim", head_dim, "a positive integer head_dim")
    common = dict(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
        n_head=h, n_kv_head=hf.get("num_key_value_heads") or h, n_embd=d, intermediate_size=hf["intermediate_size"],
        pos_embedding="rope", norm="rmsnorm", norm_eps=hf["rms_norm_eps"], bias=False, dropout=0.0,
        tie_embeddings=hf["tie_word_embeddings"], init_std=hf.get("initializer_range", 0.02),
        head_size=None if head_dim in (None, d // h) and d % h == 0 else head_dim)
    if mt == "olmo2":
        if hf.get("hidden_act", "silu") != "silu":
            raise _unsupported(mt, "hidden_act", hf["hidden_act"], "silu (SwiGLU)")
        return ModelConfig(**common, mlp="swiglu", norm_placement="post", qk_norm=True, qk_norm_scope="all",
                           **_rope_from_hf(mt, hf))
    act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise _unsupported(mt, "hidden_activation", act, "the tanh GELU (gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise _unsupported(mt, "use_bidirectional_attention", True, "causal attention (false)")
    n = hf["num_hidden_layers"]
    p = 2 if mt == "gemma2" else hf.get("sliding_window_pattern", 6)  # as the config classes derive layer_types
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
    window = window_from_layer_types(mt, types, hf.get("sliding_window"), n)
    rope = _rope_from_hf(mt, hf) if mt == "gemma2" else _gemma3_rope(hf, bool(window))
    scalar = hf["query_pre_attn_scalar"]
    return ModelConfig(
        **common, mlp="geglu", norm_placement="sandwich", norm_unit_offset=True, embed_scale=d ** 0.5,
        attn_scalar=None if scalar == (head_dim or d // h) else scalar,
        # Gemma3ForCausalLM ignores attn_logit_softcapping: so does the import
        attn_softcap=hf.get("attn_logit_softcapping") if mt == "gemma2" else None,
        logit_softcap=hf.get("final_logit_softcapping"), qk_norm=mt == "gemma3_text", **window, **rope)


def _gemma3_rope(hf: dict, local_layers: bool) -> dict:
    """Gemma 3's RoPE: ``rope_parameters`` per layer type (transformers 5), or the older top-level
    ``rope_theta`` + ``rope_scaling`` (global layers) and ``rope_local_base_freq`` (local layers)."""
    mt, rp = "gemma3_text", hf.get("rope_parameters")
    if isinstance(rp, dict) and ({"full_attention", "sliding_attention"} & set(rp)):
        full, local = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
    else:
        full = dict(rp or hf.get("rope_scaling") or {})
        local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    if not isinstance(full, dict) or not isinstance(local, dict):
        raise _unsupported(mt, "rope_parameters", rp, "a dict per layer type of RoPE parameters")
    full.setdefault("rope_theta", hf.get("rope_theta", 1000000.0))
    out = _rope_from_hf(mt, {"rope_parameters": full, "max_position_embeddings": hf.get("max_position_embeddings")})
    if local_layers:
        kind = local.get("rope_type", local.get("type", "default"))
        if kind != "default" or local.get("partial_rotary_factor", 1.0) != 1.0:
            raise _unsupported(mt, "rope_parameters.sliding_attention", local,
                               "plain RoPE ('default') on the sliding-window layers")
        out["rope_local_theta"] = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
    return out


def _rope_from_hf(mt: str, hf: dict) -> dict:
    """ModelConfig's RoPE fields from ``rope_parameters`` (transformers 5) or the older
    ``rope_scaling`` + top-level ``rope_theta``; a RoPE variant we do not compute is an error."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))  # Phi-3/4: either place
    if partial != 1.0:
        raise _unsupported(mt, "partial_rotary_factor", partial, "RoPE on the whole head (1.0)")
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


# what the config classes assume for keys a config.json leaves out, where Llama's defaults (the
# fallbacks in _model_config_from_hf) differ; MistralConfig's sliding_window is 4096 unless null
_HF_DEFAULTS = {
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, sliding_window=4096),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None),
}


def _window_from_hf(mt: str, hf: dict) -> dict:
    """ModelConfig's sliding-window fields from an HF config. Mistral and Phi-3 apply
    ``sliding_window`` (null: none) on every layer; Qwen2/Qwen3 on the layers ``layer_types`` marks
    ``sliding_attention`` (derived as transformers does when absent: use_sliding_window, then the
    layers from max_window_layers on), imported where those layers form our pattern."""
    if mt in ("mistral", "phi3"):
        return {"sliding_window": hf.get("sliding_window")}
    if mt not in ("qwen2", "qwen3"):
        return {}
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    n = hf.get("num_hidden_layers", 32)
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n)]
    return window_from_layer_types(mt, types, window, n)


def window_from_layer_types(mt: str, types: Any, window: Any, n_layer: int) -> dict:
    """``sliding_window`` / ``sliding_window_pattern`` for HF's ``layer_types`` (each layer's
    ``full_attention`` or ``sliding_attention``) and window: {} when every layer is full, else the
    window with pattern 1 (every layer local) or p (layer i global exactly when (i + 1) % p == 0,
    as Gemma's); another arrangement is an error naming ``layer_types``."""
    if not isinstance(types, list) or len(types) != n_layer or \
            not set(types) <= {"full_attention", "sliding_attention"}:
        raise _unsupported(mt, "layer_types", types, f"{n_layer} entries of 'full_attention' or 'sliding_attention'")
    local = [t == "sliding_attention" for t in types]
    if not any(local):
        return {}
    if window is None:
        raise _unsupported(mt, "sliding_window", None, "a window for the sliding_attention layers of layer_types "
                           "(use_sliding_window=true)")
    p = 1 if all(local) else local.index(False) + 1
    if local != [p == 1 or (i + 1) % p != 0 for i in range(n_layer)]:
        raise _unsupported(mt, "layer_types", types, "all layers sliding, or every p-th layer full "
                           "(sliding_window_pattern=p)")
    return {"sliding_window": window, "sliding_window_pattern": p}




# ----------------------------------------------------------------------------- encoders

# transformers' activation names -> ModelConfig.gelu
_GELUS = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def encoder_family(cfg: ModelConfig) -> str:
    """'bert' (post-LN, learned positions, GELU MLP, biases) or 'modernbert' (pre-norm, RoPE, GeGLU, no
    token types) for an ``arch = "encoder"`` config, or a ConversionError naming the first field
    neither holds."""
    if cfg.kv_heads != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.n_embd:
        raise ConversionError(f"model.n_kv_head / model.head_size cannot be exported: BertForMaskedLM and "
                              f"ModernBertForMaskedLM have n_head heads of n_embd / n_head = "
                              f"{cfg.n_embd / cfg.n_head:g} (no grouped-query attention)")
    _check(cfg, "BertForMaskedLM / ModernBertForMaskedLM", "norm", "layernorm", "both use LayerNorm")
    if cfg.norm_placement == "post_add":
        why = "post-LN (norm_placement=post_add) means BERT"
        for field, want in (("pos_embedding", "learned"), ("mlp", "gelu"), ("bias", True), ("sliding_window", None)):
            _check(cfg, "BertForMaskedLM", field, want, why)
        return "bert"
    why = "pre-norm means ModernBERT"
    for field, want in (("pos_embedding", "rope"), ("mlp", "geglu"), ("type_vocab_size", 0)):
        _check(cfg, "ModernBertForMaskedLM", field, want, why)
    return "modernbert"


def encoder_hf_config(cfg: ModelConfig, family: str, tokens: dict) -> dict:
    """The ``transformers`` config keywords of an encoder config in ``family``."""
    common = dict(model_type=family, vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                  intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  max_position_embeddings=cfg.block_size, initializer_range=cfg.init_std,
                  tie_word_embeddings=cfg.tie_embeddings)
    pad, eos = tokens.get("pad_token_id"), tokens.get("eos_token_id")
    act = "gelu" if cfg.gelu == "erf" else "gelu_new"  # transformers' names of the exact and the tanh GELU
    if family == "bert":
        return dict(common, hidden_act=act, layer_norm_eps=cfg.norm_eps, type_vocab_size=cfg.type_vocab_size,
                    hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad,
                    position_embedding_type="absolute", is_decoder=False)
    local_theta = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    return dict(common, hidden_activation=act, classifier_activation=act, norm_eps=cfg.norm_eps,
                norm_bias=cfg.bias, attention_bias=cfg.bias, mlp_bias=cfg.bias, classifier_bias=cfg.bias,
                decoder_bias=True,
                layer_types=["sliding_attention" if layer_is_local(cfg, i) else "full_attention"
                             for i in range(cfg.n_layer)],
                local_attention=cfg.sliding_window or 128,  # (unused without local layers: the class's default)
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
                attention_dropout=cfg.dropout, embedding_dropout=cfg.dropout, mlp_dropout=cfg.dropout,
                # ModernBertConfig defaults its special ids past a small vocabulary: ours, or none
                pad_token_id=pad, eos_token_id=eos, bos_token_id=tokens.get("bos_token_id"),
                cls_token_id=tokens.get("bos_token_id"), sep_token_id=eos)


def encoder_config_from_hf(mt: str, hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of a BERT or ModernBERT ``config.json`` (missing keys: the classes' defaults).
    ModernBERT's local layers (``layer_types`` ``sliding_attention``: a bidirectional window of
    ``local_attention`` with its own RoPE base) are ``sliding_window`` + ``sliding_window_pattern`` +
    ``rope_local_theta``: layer 0 global, then every p-th, or every layer local; another arrangement
    is refused by name."""
    if mt == "bert":
        act = hf.get("hidden_act", "gelu")
        if act not in _GELUS:
            raise _unsupported(mt, "hidden_act", act, "GELU ('gelu', or the tanh 'gelu_new')")
        for key, want in (("position_embedding_type", "absolute"), ("is_decoder", False),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise _unsupported(mt, key, hf[key], f"{key}={want!r}")
        return ModelConfig(
            arch="encoder", vocab_size=hf.get("vocab_size", 30522), block_size=hf.get("max_position_embeddings", 512),
            n_layer=hf.get("num_hidden_layers", 12), n_head=hf.get("num_attention_heads", 12),
            n_embd=hf.get("hidden_size", 768), intermediate_size=hf.get("intermediate_size", 3072),
            pos_embedding="learned", norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12), mlp="gelu",
            gelu=_GELUS[act], bias=True, dropout=0.0, norm_placement="post_add",
            type_vocab_size=hf.get("type_vocab_size", 2), tie_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("initializer_range", 0.02))
    n = hf.get("num_hidden_layers", 22)
    every = hf.get("global_attn_every_n_layers", 3)
    types = hf.get("layer_types") or ["sliding_attention" if i % every else "full_attention" for i in range(n)]
    window = _modernbert_window(types, n, hf)
    acts = {key: hf.get(key, "gelu") for key in ("hidden_activation", "classifier_activation")}
    for key, act in acts.items():
        if act not in _GELUS:
            raise _unsupported(mt, key, act, "GELU ('gelu', or the tanh 'gelu_new')")
    if _GELUS[acts["hidden_activation"]] != _GELUS[acts["classifier_activation"]]:
        raise _unsupported(mt, "classifier_activation", acts["classifier_activation"],
                           f"the GELU of hidden_activation ({acts['hidden_activation']!r})")
    biases = {k: bool(hf.get(k, False)) for k in ("norm_bias", "attention_bias", "mlp_bias", "classifier_bias")}
    if len(set(biases.values())) > 1:
        raise _unsupported(mt, "norm_bias/attention_bias/mlp_bias/classifier_bias", biases, "all four equal")
    if not hf.get("decoder_bias", True):
        raise _unsupported(mt, "decoder_bias", False, "decoder_bias=true")
    rp = hf.get("rope_parameters") or {}
    full = rp.get("full_attention", rp) if isinstance(rp, dict) else {}
    local = rp.get("sliding_attention", {}) if isinstance(rp, dict) else {}
    for key, part in (("full_attention", full), ("sliding_attention", local)):
        if part.get("rope_type", "default") != "default":
            raise _unsupported(mt, f"rope_parameters.{key}.rope_type", part["rope_type"], "'default'")
    if window:
        window["rope_local_theta"] = float(local.get("rope_theta", hf.get("local_rope_theta", 10000.0)))
    return ModelConfig(
        arch="encoder", vocab_size=hf.get("vocab_size", 50368), block_size=hf.get("max_position_embeddings", 8192),
        n_layer=n, n_head=hf.get("num_attention_heads", 12), n_embd=hf.get("hidden_size", 768),
        intermediate_size=hf.get("intermediate_size", 1152), pos_embedding="rope",
        rope_theta=float(full.get("rope_theta", hf.get("global_rope_theta", 160000.0))), norm="layernorm",
        norm_eps=hf.get("norm_eps", 1e-5), mlp="geglu", gelu=_GELUS[acts["hidden_activation"]],
        bias=biases["norm_bias"], dropout=0.0, norm_placement="pre", tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02), **window)


def _modernbert_window(types: Any, n_layer: int, hf: dict) -> dict:
    """``sliding_window`` and ``sliding_window_pattern`` of ModernBERT's ``layer_types``: {} when every
    layer is global; p = 1 when every layer is local; else layer 0 global and then every p-th."""
    mt = "modernbert"
    if not isinstance(types, list) or len(types) != n_layer or \
            not set(types) <= {"full_attention", "sliding_attention"}:
        raise _unsupported(mt, "layer_types", types, f"{n_layer} entries of 'full_attention' or 'sliding_attention'")
    local = [t == "sliding_attention" for t in types]
    if not any(local):
        return {}
    glob = [i for i, x in enumerate(local) if not x]
    p = 1 if not glob else (glob[1] if len(glob) > 1 else max(2, n_layer))
    if local != [not (p > 1 and i % p == 0) for i in range(n_layer)]:
        raise _unsupported(mt, "layer_types", types, "all layers sliding, or layer 0 and every p-th after it "
                           "full (global_attn_every_n_layers=p)")
    window = hf.get("local_attention", 128)
    if not isinstance(window, int) or window < 1:
        raise _unsupported(mt, "local_attention", window, "a positive window")
    return {"sliding_window": window, "sliding_window_pattern": p}
