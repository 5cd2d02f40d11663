"""New special tokens (a template's ``<|im_start|>`` ...): added to the tokenizer, rows to the model.

A new token's embedding (and, when untied, LM-head row) starts at the mean of the existing
rows rather than at random: its first logits are then average instead of arbitrary, the usual
choice for added tokens (Hewitt 2021, "Initializing new word embeddings for pretrained LMs").
"""

from __future__ import annotations

import torch

from ...config import ModelConfig


def extend_tokenizer(tokenizer_json: str, tokens: list[str]) -> tuple[str, list[int]]:
    """``(tokenizer.json with ``tokens`` added as special tokens, the ids of the ones that were new)``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    vocab = tok.get_vocab(with_added_tokens=True)
    new = [t for t in tokens if t not in vocab]
    if not new:
        return tokenizer_json, []
    tok.add_special_tokens(new)
    return tok.to_str(), [tok.token_to_id(t) for t in new]


def mean_rows(weight: torch.Tensor, new_ids: list[int], n_old: int, new_vocab: int) -> torch.Tensor:
    """``weight`` (V, C) grown to ``new_vocab`` rows, rows ``new_ids`` set to the mean of rows [0, n_old)."""
    out = torch.zeros(new_vocab, weight.shape[1], dtype=weight.dtype)
    keep = min(weight.shape[0], new_vocab)
    out[:keep] = weight[:keep]
    mean = weight[:n_old].double().mean(0).to(weight.dtype)
    out[new_ids] = mean
    return out


def grow_vocab(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, new_vocab: int, new_ids: list[int],
               n_old: int | None = None) -> dict[str, torch.Tensor]:
    """A GPT state dict with ``new_vocab`` rows in the embedding and an untied head; ``n_old`` is the
    number of rows the old tokenizer uses (a padded vocabulary's spare rows do not count in the mean)."""
    n_old = min(n_old or cfg.vocab_size, cfg.vocab_size)
    sd = dict(state_dict)
    sd["tok_emb.weight"] = mean_rows(sd["tok_emb.weight"], new_ids, n_old, new_vocab)
    if not cfg.tie_embeddings and "lm_head.weight" in sd:
        sd["lm_head.weight"] = mean_rows(sd["lm_head.weight"], new_ids, n_old, new_vocab)
    elif cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    return sd
