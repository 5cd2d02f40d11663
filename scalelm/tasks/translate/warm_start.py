"""An encoder-decoder warm-started from a decoder-only base: ``finetune translate|summarize --base
GPT_DIR --model.arch=encoder-decoder``.

Rothe, Narayan and Severyn (2020, "Leveraging Pre-trained Checkpoints for Sequence Generation
Tasks") start both halves of a sequence-to-sequence Transformer from one pretrained checkpoint;
Hugging Face's ``EncoderDecoderModel`` does the same. Here a base GPT of L layers gives an
encoder of L layers and a decoder of L layers: every encoder block is the base's block i (its
attention now sees the whole source: the encoder passes a non-causal mask), every decoder block
takes the base's self-attention, MLP and their norms; the embeddings (and learned positions) are
shared, and both final norms start from the base's. The only new weights are the decoder's
cross-attention and its norm, initialised as a fresh model's are (random, as in the paper).

The encoder-decoder has none of the decoder-only switches (Gemma's softcaps and embedding scale,
QK-norm, post-norms, sliding windows, shared blocks): a base that uses them is refused in one line.
"""

from __future__ import annotations

import dataclasses

import torch

from ...config import ConfigError, ModelConfig
from ...errors import UserError

ARCH = "encoder-decoder"


def asks_encdec(args, saved) -> bool:
    """Did the command line (or, resuming, the run's saved config) ask for an encoder-decoder?"""
    if saved is not None and saved.model.arch == ARCH:
        return True
    overrides = list(getattr(args, "overrides", None) or ())
    for i, a in enumerate(overrides):  # --model.arch=encoder-decoder or --model.arch encoder-decoder
        key, eq, value = a.lstrip("-").partition("=")
        if key.replace("-", "_") == "model.arch":
            value = value if eq else (overrides[i + 1] if i + 1 < len(overrides) else "")
            if value.replace("_", "-") == ARCH:
                return True
    return False


def encdec_config(gpt: ModelConfig, base_dir) -> ModelConfig:
    """The encoder-decoder shape a GPT base warm-starts: L encoder and L decoder layers of its width."""
    if gpt.n_shared_blocks:
        raise UserError(f"the base {base_dir} shares blocks between layers (n_shared_blocks): an encoder-decoder "
                        f"cannot be warm-started from it")
    cfg = dataclasses.replace(gpt, arch=ARCH, n_encoder_layer=gpt.n_layer, n_decoder_layer=gpt.n_layer)
    try:
        cfg.validate()
    except ConfigError as e:
        raise UserError(f"an encoder-decoder cannot be warm-started from the base {base_dir}: {e}") from None
    return cfg


def warm_start(gpt: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """A new :class:`~scalelm.model.encdec.EncoderDecoder` of ``cfg`` holding ``gpt``'s weights (above)."""
    from ...model.encdec import EncoderDecoder

    model = EncoderDecoder(cfg)  # fresh init: what the base has no counterpart for keeps it
    src = gpt.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name in ("tok_emb.weight", "pos_emb.weight", "lm_head.weight"):
        if name in src:
            mapped[name] = src[name]
    for norm in ("enc_norm", "norm_f"):
        mapped.update({f"{norm}.{k.split('.', 1)[1]}": v for k, v in src.items() if k.startswith("norm_f.")})
    for i, key in enumerate(gpt.layer_keys):
        block = {k[len(f"blocks.{key}."):]: v for k, v in src.items() if k.startswith(f"blocks.{key}.")}
        mapped.update({f"blocks.e{i}.{k}": v for k, v in block.items()})
        mapped.update({f"blocks.d{i}.{k}": v for k, v in block.items()
                       if k.split(".")[0] in ("attn_norm", "attn", "mlp_norm", "mlp")})
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    left = [k for k in missing if not (k.startswith("blocks.d") and k.split(".")[2] in ("cross", "cross_norm"))]
    if unexpected or left:  # a layout this mapping does not know
        raise UserError(f"an encoder-decoder cannot be warm-started from this base: unmapped weights "
                        f"{sorted(unexpected)[:3] + left[:3]}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model
