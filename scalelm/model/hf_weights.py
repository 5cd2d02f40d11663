"""Hugging Face weights <-> scalelm state dicts: the name map of every family (GPT-2's transposed
``Conv1D`` with fused q/k/v; Phi-3's fused ``qkv_proj`` and ``gate_up_proj``; the norms each block
placement has) and reading an HF directory's safetensors one shard at a time (names and shapes
checked from the headers first, so memory holds the model plus one shard).
"""


from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.names import HF_PICKLE_WEIGHTS, HF_WEIGHTS, HF_WEIGHTS_INDEX
from ..config import ModelConfig
from .build import build_model
from .gpt import GPT
from .hf_config import ENCODER_FAMILIES, ConversionError, hf_family, read_hf_json
from .hf_encoder import decoder_key, encoder_from_hf, encoder_to_hf, normalize_encoder_keys
from .io import load_state_dict_into


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
    if family == "phi3":  # q/k/v fused in qkv_proj and gate/up in gate_up_proj: split and fused apart
        names = [("attn.o_proj", "self_attn.o_proj"), ("mlp.down", "mlp.down_proj")]
    params = ["weight", "bias"] if cfg.bias else ["weight"]
    for i in range(cfg.n_layer):
        pairs += [(f"blocks.{i}.{s}.weight", f"model.layers.{i}.{h}.weight")
                  for s, h in _BLOCK_NORMS[cfg.norm_placement]]
        pairs += [(f"blocks.{i}.{s}.{p}", f"model.layers.{i}.{h}.{p}") for s, h in names for p in params]
        if cfg.qkv_bias:  # Qwen2
            pairs += [(f"blocks.{i}.attn.{x}_proj.bias", f"model.layers.{i}.self_attn.{x}_proj.bias") for x in "qkv"]
        if cfg.qk_norm:  # Qwen3, Gemma 3 (per head), OLMo 2 (over the whole projection)
            pairs += [(f"blocks.{i}.attn.{x}_norm.weight", f"model.layers.{i}.self_attn.{x}_norm.weight") for x in "qk"]
    return pairs


# a block's norms by norm_placement: (scalelm, HF); HF's post_attention_layernorm is Llama's norm before
# the MLP but OLMo 2's and Gemma's norm on the attention output
_BLOCK_NORMS = {
    "pre": [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")],
    "post": [("attn_post_norm", "post_attention_layernorm"), ("mlp_post_norm", "post_feedforward_layernorm")],
    "sandwich": [("attn_norm", "input_layernorm"), ("attn_post_norm", "post_attention_layernorm"),
                 ("mlp_norm", "pre_feedforward_layernorm"), ("mlp_post_norm", "post_feedforward_layernorm")],
}

# GPT-2 Conv1D modules: scalelm Linear(s) <- HF Conv1D (weight stored (in, out), i.e. transposed)
_GPT2_CONV = [("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]


def scalelm_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig,
                             prefer: Optional[str] = None) -> dict[str, torch.Tensor]:
    family = hf_family(cfg, prefer)
    if family in ENCODER_FAMILIES:
        return encoder_to_hf(sd, cfg, family)
    out = {hf: sd[ours] for ours, hf in _layer_map(cfg, family)}
    if family == "phi3":  # rows [q; k; v] and [gate; up], as Phi3Attention and Phi3MLP split them
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            out[h + "self_attn.qkv_proj.weight"] = torch.cat([sd[b + f"attn.{x}_proj.weight"] for x in "qkv"])
            out[h + "mlp.gate_up_proj.weight"] = torch.cat([sd[b + "mlp.gate.weight"], sd[b + "mlp.up.weight"]])
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
    encoder = family in ENCODER_FAMILIES
    sd = normalize_encoder_keys(hf_sd, family) if encoder else _normalize_hf_keys(hf_sd, family)
    if family in ("llama", "mistral") and "model.layers.0.self_attn.qkv_proj.weight" in sd:
        family = "phi3"  # the same model as Mistral (or Llama, without a window), stored fused
    used, out = set(), {}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ConversionError(f"the Hugging Face checkpoint has no tensor '{key}'")
        used.add(key)
        return sd[key]

    if encoder:
        out = encoder_from_hf(take, cfg, family)
    for ours, theirs in [] if encoder else _layer_map(cfg, family):
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
    if family == "phi3":
        q, kv, f, d = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim, cfg.n_embd
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            for key, rows, ours in (("self_attn.qkv_proj", [q, kv, kv], ["attn.q_proj", "attn.k_proj", "attn.v_proj"]),
                                    ("mlp.gate_up_proj", [f, f], ["mlp.gate", "mlp.up"])):
                w = take(h + key + ".weight")
                if tuple(w.shape) != (sum(rows), d):
                    raise ConversionError(f"'{h}{key}.weight' has shape {tuple(w.shape)}, expected {(sum(rows), d)}")
                for name, part in zip(ours, w.split(rows)):
                    out[b + name + ".weight"] = part.contiguous()
    if cfg.tie_embeddings:  # tied: HF may or may not store it; the embedding wins, as in HF
        used.add(decoder_key(family) if encoder else "lm_head.weight")
    elif not encoder:
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
        shadow = build_model(cfg)
    load_state_dict_into(shadow, plan, source=source)  # every name and shape, checked on the meta twin
    params, filled = model.state_dict(), set()
    for f in files:
        filled |= _copy_shard(params, _read_weights_file(f), shapes, cfg)
    if filled != set(plan):
        raise ConversionError(f"the {source} left tensors unfilled: {sorted(set(plan) - filled)[:5]}")


