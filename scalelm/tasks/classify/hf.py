"""A classifier as ``GPT2ForSequenceClassification`` / ``LlamaForSequenceClassification``.

HF's heads pool the rightmost token that is not ``pad_token_id``: our last-token pooling. The
head becomes ``score.weight`` (bias-free in both); labels go to ``id2label``/``label2id``. When
the model ends each text with the end-of-text token, the exported ``tokenizer.json`` does too (a
``TemplateProcessing`` post-processor, which also drops any special tokens our encoding does not
add), and ``pad_token_id`` is the pad token, never that end token (HF would skip it). Padding is
on the right: HF's positions count from slot 0, so left padding would shift them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...checkpoint import staged_dir
from ...checkpoint.model_dir import write_json
from ...checkpoint.names import TOKENIZER, TOKENIZER_CONFIG
from ...model.hf import ConversionError, hf_config_dict, hf_family, scalelm_to_hf_state_dict
from ...model.io import model_state_dict
from .files import load_classifier, resolve_model_dir

ARCH = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
        "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
        "mistral": "MistralForSequenceClassification", "olmo2": "Olmo2ForSequenceClassification",
        "gemma2": "Gemma2ForSequenceClassification", "gemma3_text": "Gemma3TextForSequenceClassification"}


def is_classifier_dir(path) -> bool:
    """Does ``path`` (a model directory or RUN_DIR) hold a classifier?"""
    from ...errors import UserError
    from .files import read_task

    try:
        read_task(resolve_model_dir(path))
    except UserError:
        return False
    return True


def exported_tokenizer_json(tokenizer_json: str, task: dict) -> str:
    """The tokenizer HF uses: ours, whose post-processor appends the end token when the model does."""
    from tokenizers import Tokenizer, normalizers, processors

    tok = Tokenizer.from_str(tokenizer_json)
    if task.get("lowercase"):  # the classifier lowercases its input: so does the exported tokenizer
        tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([tok.normalizer] if tok.normalizer else []))
    if task.get("append_eos", True):
        eos = tok.id_to_token(task["eos_id"])
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                                           special_tokens=[(eos, task["eos_id"])])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    return tok.to_str()


def to_hf_classifier(model, task: dict):
    """The equivalent ``transformers`` sequence-classification model (same weights, eval mode)."""
    try:
        from transformers import AutoConfig, AutoModelForSequenceClassification
    except ImportError:
        raise ConversionError("exporting needs transformers: pip install 'scalelm[hf]'") from None
    if model.pooling != "last":
        raise ConversionError(f"a classifier with --pooling {model.pooling} cannot be exported: Hugging Face's "
                              f"*ForSequenceClassification reads the last token (train with --pooling last)")
    names = task["labels"]
    eos, pad = task.get("eos_id"), task.get("pad_id")
    if pad is None or (task.get("append_eos", True) and pad == eos):
        if task.get("append_eos", True):
            raise ConversionError("the tokenizer has no pad token distinct from the end-of-text token every text "
                                  "ends with: Hugging Face would take that end token for padding (train with a "
                                  "tokenizer that has a pad token, e.g. <|pad|>)")
        pad = eos if eos is not None else 0  # nothing ends a text: any id outside the text works
    kw = hf_config_dict(model.cfg, eos_id=eos, bos_id=eos)
    family = kw["model_type"]
    kw.update(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
              pad_token_id=pad, architectures=[ARCH[family]])
    hf = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**kw))
    sd = scalelm_to_hf_state_dict(model_state_dict(model.gpt), model.cfg)
    sd.pop("lm_head.weight")  # the classifier has no LM head; the GPT's stays in the scalelm directory
    sd["score.weight"] = model.head.weight.detach().cpu()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConversionError(f"internal mapping error: missing {missing}, unexpected {unexpected}")
    return hf.to(next(model.parameters()).dtype).eval()


def export_hf_classifier(src, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """A classifier's model directory (or RUN_DIR) -> a directory ``AutoModelForSequenceClassification``
    and ``AutoTokenizer`` load."""
    from ...model.io import read_model_config

    d = resolve_model_dir(src)
    hf_family(read_model_config(d))  # fail on an unrepresentable shape before loading weights
    model, task, d = load_classifier(d)
    hf = to_hf_classifier(model.to(dtype), task)
    out = Path(out_dir)
    with staged_dir(out, manifest=False) as tmp:  # Hugging Face's format: no manifest of ours
        hf.save_pretrained(tmp, safe_serialization=True)
        if (d / TOKENIZER).is_file():
            from tokenizers import Tokenizer

            tok_json = exported_tokenizer_json((d / TOKENIZER).read_text(), task)
            (tmp / TOKENIZER).write_text(tok_json)
            tok = Tokenizer.from_str(tok_json)
            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "right",
                  "model_max_length": task.get("max_length") or model.cfg.block_size}
            if task.get("eos_id") is not None:
                tc["eos_token"] = tok.id_to_token(task["eos_id"])
            tc["pad_token"] = tok.id_to_token(hf.config.pad_token_id)
            write_json(tmp / TOKENIZER_CONFIG, tc)
    return out
