"""A tagger as Hugging Face ``*ForTokenClassification``: GPT-2, the Llama-style families, BERT, ModernBERT.

The backbone's tensors are the ``*ForCausalLM`` / ``*ForMaskedLM`` export's (:mod:`scalelm.model.hf`)
less the LM head; a linear head becomes ``classifier`` (GPT-2, BERT) or ``score`` (the Llama family's
``GenericForTokenClassification``), weight and bias; a ModernBERT-shaped encoder's head is
ModernBERT's own (``head.dense``, ``head.norm``, ``classifier``). Labels go to ``id2label``/
``label2id``; the classifier dropout is 0 in the config (eval mode ignores it anyway). The tokenizer
is the model's, as it read words in training: words joined by spaces, the tokenizer's special tokens
(``[CLS]``/``[SEP]``) around each window for an encoder, nothing added for a GPT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...model.hf import ConversionError, hf_config_dict
from ..classify.hf import (
    backbone_hf_state_dict,
    encoder_task_config,
    export_hf_task,
    head_hf_state_dict,
    load_hf_task,
)
from .files import load_tagger

ARCH = {"gpt2": "GPT2ForTokenClassification", "llama": "LlamaForTokenClassification",
        "qwen2": "Qwen2ForTokenClassification", "qwen3": "Qwen3ForTokenClassification",
        "mistral": "MistralForTokenClassification", "gemma2": "Gemma2ForTokenClassification",
        "gemma3_text": "Gemma3TextForTokenClassification", "bert": "BertForTokenClassification",
        "modernbert": "ModernBertForTokenClassification"}
# a Linear head's HF name; the others: GenericForTokenClassification's "score" (ModernBERT: a TransformHead)
HEAD_NAME = {"gpt2": "classifier", "bert": "classifier"}


def to_hf_tagger(model, task: dict):
    """The equivalent ``transformers`` token-classification model (same weights, eval mode)."""
    try:
        from transformers import AutoConfig, AutoModelForTokenClassification
    except ImportError:
        raise ConversionError("exporting needs transformers: pip install 'scalelm[hf]'") from None
    family = hf_config_dict(model.cfg)["model_type"]
    if family not in ARCH:
        raise ConversionError(f"a {family} tagger cannot be exported: Hugging Face's token-classification "
                              f"classes are covered for {', '.join(sorted(ARCH))}")
    kw = encoder_task_config(model, family, task["labels"], ARCH[family])
    hf = AutoModelForTokenClassification.from_config(AutoConfig.for_model(**kw))
    sd = {**backbone_hf_state_dict(model.gpt, family), **head_hf_state_dict(model.head, HEAD_NAME.get(family, "score"))}
    return load_hf_task(hf, sd).to(next(model.parameters()).dtype).eval()


def export_hf_tagger(src, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """A tagger's model directory (or RUN_DIR) -> a directory ``AutoModelForTokenClassification``
    and ``AutoTokenizer`` load (the tokenizer as the tagger read words with it)."""
    return export_hf_task(src, out_dir, dtype, load_tagger, to_hf_tagger, lambda tok, task, hf: (tok, {}))
