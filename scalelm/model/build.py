"""One constructor for every architecture a config can name (``model.arch``)."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """A ``GPT`` (``arch = "gpt"``), an ``EncoderDecoder`` (``arch = "encoder-decoder"``) or an
    ``Encoder`` (``arch = "encoder"``: BERT / ModernBERT with a masked-LM head)."""
    if cfg.arch == "encoder-decoder":
        from .encdec import EncoderDecoder

        return EncoderDecoder(cfg)
    if cfg.arch == "encoder":
        from .encoder import Encoder

        return Encoder(cfg)
    from .gpt import GPT

    return GPT(cfg)
