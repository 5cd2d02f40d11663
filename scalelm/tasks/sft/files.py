"""An instruction-tuned model's directory: a model directory plus its chat template.

    MODEL_DIR/model.safetensors       the GPT, vocabulary grown by the template's special tokens
              (or adapter.safetensors, for a LoRA run)
              tokenizer.json          the extended tokenizer
              chat_template.jinja     the template training rendered conversations with
              tokenizer_config.json   bos/eos strings the template is rendered with, the added tokens
              config.json             {"model": ..., "task": {"name": "sft", ...}, "hf": {"eos_token_id": [...]}}

``scalelm chat``, ``generate`` and ``serve`` read the template from ``chat_template.jinja`` and
stop at every id of ``hf.eos_token_id`` (end-of-text and the template's end of turn).
:class:`TemplateFiles` wraps whatever writes the weights (a GPT directory, or LoRA's adapter
files), so every checkpoint and ``best/`` carries the template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...checkpoint import staged_dir
from ...checkpoint.model_dir import write_text_files
from ...checkpoint.names import TEMPLATE_FILE, TOKENIZER_CONFIG


def tokenizer_config(bos: str, eos: str, specials: list[str], block_size: int, pad: str | None = None) -> dict:
    """What Hugging Face's ``AutoTokenizer`` and ``scalelm chat`` read next to tokenizer.json."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "model_max_length": block_size}
    if pad:
        cfg["pad_token"] = pad
    if specials:
        cfg["additional_special_tokens"] = list(specials)
    return cfg


def template_files(template: str, tok_config: dict) -> dict[str, str]:
    return {TEMPLATE_FILE: template, TOKENIZER_CONFIG: json.dumps(tok_config, indent=2) + "\n"}


def write_files(d: Path, files: dict[str, str]) -> None:
    write_text_files(d, files)


class TemplateFiles:
    """A ``ModelIO`` around another: its files, plus ``files`` (the template) and ``meta`` in config.json."""

    def __init__(self, inner, files: dict[str, str], meta: dict):
        self.inner, self.files, self.meta = inner, dict(files), dict(meta)

    @property
    def partial(self) -> bool:
        return getattr(self.inner, "partial", False)

    def metadata(self, model: nn.Module) -> dict:
        return {**self.inner.metadata(model), **self.meta}

    def save(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path,
             tokenizer_json: str | None, extra: dict, manifest: bool = True) -> None:
        with staged_dir(out_dir, manifest=manifest) as d:
            self.inner.save(model, state_dict, d, tokenizer_json, {**self.meta, **extra}, manifest=False)
            write_files(d, self.files)

    def weights(self, ckpt: Path) -> dict[str, torch.Tensor]:
        return self.inner.weights(ckpt)

    def load(self, model: nn.Module, ckpt: Path) -> None:
        self.inner.load(model, ckpt)
