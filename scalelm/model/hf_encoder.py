"""Hugging Face weights of the encoder (``arch = "encoder"``): ``BertForMaskedLM`` and ``ModernBertForMaskedLM``.

The encoder families' tensor names both ways, for :mod:`scalelm.model.hf_weights` (their configs are
in :mod:`scalelm.model.hf_config`):

* BERT: post-LN blocks (``norm_placement = "post_add"``), learned positions, token types, GELU
  (exact, or the tanh form as ``gelu_new``), biases everywhere, LayerNorm; the MLM head's transform
  (dense, GELU, LayerNorm) and a decoder tied to the word embeddings with its own bias. Checkpoints
  saved as ``BertForPreTraining`` (the Hub's ``bert-base-uncased``) import too: the pooler and
  next-sentence head are dropped, old ``gamma``/``beta`` names read as ``weight``/``bias``.
* ModernBERT: pre-norm (the embedding norm serves as layer 0's attention norm), RoPE, GeGLU, no biases
  (all four of its bias switches equal), a final norm, fused ``Wqkv`` and ``Wi``; its local layers
  (``layer_types``, ``local_attention`` and their RoPE base) are configuration only
  (:func:`scalelm.model.hf_config.encoder_config_from_hf`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from .hf_config import ConversionError


# ----------------------------------------------------------------------------- weights

def encoder_layer_map(cfg: ModelConfig, family: str) -> list[tuple[str, str]]:
    """(scalelm name, HF name) pairs of the tensors that copy unchanged (ModernBERT's fused Wqkv and
    Wi are split by :func:`encoder_to_hf` / :func:`encoder_from_hf`)."""
    ps = ["weight", "bias"] if cfg.bias else ["weight"]
    if family == "bert":
        e, pairs = "bert.embeddings.", []
        pairs += [("tok_emb.weight", e + "word_embeddings.weight"), ("pos_emb.weight", e + "position_embeddings.weight")]
        if cfg.type_vocab_size:
            pairs.append(("type_emb.weight", e + "token_type_embeddings.weight"))
        pairs += [(f"emb_norm.{p}", f"{e}LayerNorm.{p}") for p in ps]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
            names = [("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
                     ("attn.v_proj", "attention.self.value"), ("attn.o_proj", "attention.output.dense"),
                     ("attn_post_norm", "attention.output.LayerNorm"), ("mlp.up", "intermediate.dense"),
                     ("mlp.down", "output.dense"), ("mlp_post_norm", "output.LayerNorm")]
            pairs += [(b + s + "." + p, h + t + "." + p) for s, t in names for p in ps]
        c = "cls.predictions."
        pairs += [(f"head_dense.{p}", f"{c}transform.dense.{p}") for p in ps]
        pairs += [(f"head_norm.{p}", f"{c}transform.LayerNorm.{p}") for p in ps]
        pairs.append(("lm_head.bias", c + "bias"))
        return pairs
    pairs = [("tok_emb.weight", "model.embeddings.tok_embeddings.weight")]
    pairs += [(f"emb_norm.{p}", f"model.embeddings.norm.{p}") for p in ps]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        names = ([] if i == 0 else [("attn_norm", "attn_norm")]) + [
            ("attn.o_proj", "attn.Wo"), ("mlp_norm", "mlp_norm"), ("mlp.down", "mlp.Wo")]
        pairs += [(b + s + "." + p, h + t + "." + p) for s, t in names for p in ps]
    pairs += [(f"norm_f.{p}", f"model.final_norm.{p}") for p in ps]
    pairs += [(f"head_dense.{p}", f"head.dense.{p}") for p in ps]
    pairs += [(f"head_norm.{p}", f"head.norm.{p}") for p in ps]
    pairs.append(("lm_head.bias", "decoder.bias"))
    return pairs


def _decoder_key(family: str) -> str:
    return "cls.predictions.decoder.weight" if family == "bert" else "decoder.weight"


def _embedding_key(family: str) -> str:
    return "bert.embeddings.word_embeddings.weight" if family == "bert" else "model.embeddings.tok_embeddings.weight"


def encoder_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, family: str) -> dict[str, torch.Tensor]:
    out = {hf: sd[ours] for ours, hf in encoder_layer_map(cfg, family)}
    if family == "modernbert":  # rows [q; k; v] and [gate; up]: ModernBERT applies the GELU to Wi's first half
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            for fused, parts in (("attn.Wqkv", ["attn.q_proj", "attn.k_proj", "attn.v_proj"]),
                                 ("mlp.Wi", ["mlp.gate", "mlp.up"])):
                for p in (["weight", "bias"] if cfg.bias else ["weight"]):
                    out[f"{h}{fused}.{p}"] = torch.cat([sd[f"{b}{x}.{p}"] for x in parts])
    if family == "bert":
        out["cls.predictions.decoder.bias"] = sd["lm_head.bias"]  # the same tensor as cls.predictions.bias
    out[_decoder_key(family)] = out[_embedding_key(family)] if cfg.tie_embeddings else sd["lm_head.weight"]
    return out


def normalize_encoder_keys(sd: dict[str, Any], family: str) -> dict[str, Any]:
    """Drop what a masked-LM model does not hold (BERT's pooler and next-sentence head, position-id
    buffers) and read old BERT checkpoints' LayerNorm ``gamma``/``beta`` as ``weight``/``bias``."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("bert.pooler.", "cls.seq_relationship.")) or k.endswith(("position_ids", "inv_freq")):
            continue
        if family == "bert":
            k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    # the decoder's bias is what BERT's forward adds: tied, it is cls.predictions.bias; untied (transformers
    # ties the two only with the embeddings) predictions.bias is left unused. Old checkpoints hold only that
    if family == "bert" and "cls.predictions.decoder.bias" in out:
        out["cls.predictions.bias"] = out.pop("cls.predictions.decoder.bias")
    return out


def encoder_from_hf(take, cfg: ModelConfig, family: str) -> dict[str, torch.Tensor]:
    """scalelm tensors from an HF state dict read through ``take(name)`` (which marks it used)."""
    out = {ours: take(theirs) for ours, theirs in encoder_layer_map(cfg, family)}
    if family == "modernbert":
        d, f = cfg.n_embd, cfg.ffn_dim
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            for fused, rows, parts in (("attn.Wqkv", [d, d, d], ["attn.q_proj", "attn.k_proj", "attn.v_proj"]),
                                       ("mlp.Wi", [f, f], ["mlp.gate", "mlp.up"])):
                for p in (["weight", "bias"] if cfg.bias else ["weight"]):
                    w = take(f"{h}{fused}.{p}")
                    if w.shape[0] != sum(rows):
                        raise ConversionError(f"'{h}{fused}.{p}' has {w.shape[0]} rows, expected {sum(rows)}")
                    for name, part in zip(parts, w.split(rows)):
                        out[f"{b}{name}.{p}"] = part.contiguous()
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take(_decoder_key(family))
    return out


def decoder_key(family: str) -> str:
    """The HF name of the tied decoder weight (optional in a checkpoint when tied)."""
    return _decoder_key(family)
