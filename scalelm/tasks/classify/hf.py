"""A classifier as ``GPT2ForSequenceClassification`` / ``LlamaForSequenceClassification``.

HF's heads pool the rightmost token that is not ``pad_token_id``: our last-token pooling. The
head becomes ``score.weight`` (bias-free in both); labels go to ``id2label``/``label2id``. When
the model ends each text with the end-of-text token, the exported ``tokenizer.json`` does too (a
``TemplateProcessing`` post-processor, which also drops any special tokens our encoding does not
add), and ``pad_token_id`` is the pad token, never that end token (HF would skip it). Padding is
on the right: HF's positions count from slot 0, so left padding would shift them.

An encoder classifier (``--pooling first`` on a BERT-shaped encoder) is ``BertForSequenceClassification``:
HF's BERT always runs its pooler (dense + tanh on the first token) before the classifier, so the
scalelm classifier carries that pooler in its head (:class:`~.model.PoolerHead`) and the export
copies it; mean pooling, or a ModernBERT-shaped encoder (whose HF head is dense + GELU + norm), is
refused by name. The exported tokenizer keeps its own ``[CLS] ... [SEP]`` post-processor.
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


def backbone_hf_state_dict(backbone, family: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors under the HF task model's names: the LM export's, LM head dropped."""
    sd = scalelm_to_hf_state_dict(model_state_dict(backbone), backbone.cfg)
    if family == "bert":
        return {k: v for k, v in sd.items() if not k.startswith("cls.")}  # the masked-LM head
    if family == "modernbert":
        return {k: v for k, v in sd.items() if k.startswith("model.")}  # not the MLM head and decoder
    sd.pop("lm_head.weight")
    return sd


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
    if task.get("special_tokens"):  # an encoder's: the tokenizer's own [CLS] ... [SEP], as in training
        return tok.to_str()
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
    if getattr(model.cfg, "arch", "gpt") == "encoder":
        return _to_hf_encoder_classifier(model, task, AutoConfig, AutoModelForSequenceClassification)
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


def head_hf_state_dict(head, linear_name: str) -> dict[str, torch.Tensor]:
    """A task head's tensors under Hugging Face's names: a plain ``Linear`` as ``linear_name``
    (``score`` / ``classifier``), BERT's pooler + classifier (:class:`PoolerHead`), ModernBERT's
    head + classifier (:class:`TransformHead`)."""
    from .model import PoolerHead, TransformHead

    sd = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    if isinstance(head, TransformHead):
        return {("classifier." + k[4:]) if k.startswith("out.") else f"head.{k}": v for k, v in sd.items()}
    if isinstance(head, PoolerHead):
        return {("classifier." + k[4:]) if k.startswith("out.") else "bert.pooler.dense." + k[5:]: v
                for k, v in sd.items()}
    return {f"{linear_name}.{k}": v for k, v in sd.items()}


def encoder_task_config(model, family: str, names: list[str], arch: str) -> dict:
    """The HF config keywords of an encoder task model: labels, no classifier dropout, and (ModernBERT)
    the head's bias and activation as the scalelm head has them."""
    kw = hf_config_dict(model.cfg)
    kw.update(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
              architectures=[arch], classifier_dropout=0.0)
    if family == "modernbert":
        kw.update(classifier_bias=model.cfg.bias, classifier_activation="gelu")
    return kw


def load_hf_task(hf, sd: dict):
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConversionError(f"internal mapping error: missing {missing}, unexpected {unexpected}")
    return hf


def _to_hf_encoder_classifier(model, task: dict, AutoConfig, AutoModelForSequenceClassification):
    """``BertForSequenceClassification`` (first-token pooling through BERT's pooler, which the
    classifier's head holds) or ``ModernBertForSequenceClassification`` (first or mean pooling, then
    ModernBERT's head): the encoder and the head, all the model's own tensors."""
    family = hf_config_dict(model.cfg)["model_type"]
    ok = {"bert": ("first",), "modernbert": ("first", "mean")}
    if model.pooling not in ok.get(family, ()):
        raise ConversionError(
            f"an encoder classifier exports as BertForSequenceClassification (--pooling first: BERT's pooler on the "
            f"first token) or ModernBertForSequenceClassification (--pooling first or mean); this one is {family} "
            f"with --pooling {model.pooling}")
    arch = "BertForSequenceClassification" if family == "bert" else "ModernBertForSequenceClassification"
    kw = encoder_task_config(model, family, task["labels"], arch)
    if family == "modernbert":
        kw["classifier_pooling"] = "cls" if model.pooling == "first" else "mean"
    if task.get("pad_id") is not None:
        kw["pad_token_id"] = task["pad_id"]
    hf = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**kw))
    sd = {**backbone_hf_state_dict(model.gpt, family), **head_hf_state_dict(model.head, "classifier")}
    return load_hf_task(hf, sd).to(next(model.parameters()).dtype).eval()


def export_hf_task(src, out_dir, dtype: torch.dtype, load, to_hf, tokenizer_files) -> Path:
    """A task model's directory (or RUN_DIR) -> a Hugging Face directory: ``load(dir)`` gives
    ``(model, task, dir)``, ``to_hf(model, task)`` the transformers model, ``tokenizer_files(tokenizer.json
    text, task, hf)`` the exported tokenizer.json and its tokenizer_config.json entries."""
    from ...model.io import read_model_config

    d = resolve_model_dir(src)
    hf_family(read_model_config(d))  # fail on an unrepresentable shape before loading weights
    model, task, d = load(d)
    hf = to_hf(model.to(dtype), task)
    out = Path(out_dir)
    with staged_dir(out, manifest=False) as tmp:  # Hugging Face's format: no manifest of ours
        hf.save_pretrained(tmp, safe_serialization=True)
        if (d / TOKENIZER).is_file():
            tok_json, extra = tokenizer_files((d / TOKENIZER).read_text(), task, hf)
            (tmp / TOKENIZER).write_text(tok_json)
            write_json(tmp / TOKENIZER_CONFIG, {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "right",
                                                "model_max_length": task.get("max_length") or model.cfg.block_size,
                                                **extra})
    return out


def _classifier_tokenizer(tokenizer_json: str, task: dict, hf) -> tuple[str, dict]:
    from tokenizers import Tokenizer

    tok_json = exported_tokenizer_json(tokenizer_json, task)
    tok = Tokenizer.from_str(tok_json)
    extra = {}
    if task.get("eos_id") is not None:
        extra["eos_token"] = tok.id_to_token(task["eos_id"])
    extra["pad_token"] = tok.id_to_token(hf.config.pad_token_id)
    return tok_json, extra


def export_hf_classifier(src, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """A classifier's model directory (or RUN_DIR) -> a directory ``AutoModelForSequenceClassification``
    and ``AutoTokenizer`` load."""
    return export_hf_task(src, out_dir, dtype, load_classifier, to_hf_classifier, _classifier_tokenizer)
