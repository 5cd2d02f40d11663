"""Hugging Face interop, both ways: GPT-2 (``GPT2LMHeadModel``), Llama 2/3.x (``LlamaForCausalLM``,
RoPE scaling ``linear`` and ``llama3``), Qwen2/2.5 (``Qwen2ForCausalLM``: biases on q/k/v only) and
Qwen3 (``Qwen3ForCausalLM``: an RMSNorm per head on q and k), Mistral (``MistralForCausalLM``: a
sliding window on every layer) and Phi-3 (``Phi3ForCausalLM``: Mistral's computation with q/k/v fused
in ``qkv_proj`` and gate/up in ``gate_up_proj``). The Llama-shaped families are one scalelm model with
switches (``qkv_bias``, ``qk_norm``, ``rope_scaling``, ``sliding_window``), not copies. An export
writes the class an import came from (recorded in its ``config.json``) where that class holds the
model, else the first that does.
OLMo 2 (``Olmo2ForCausalLM``: norms on each sub-layer's output, q/k norms over the whole projections),
Gemma 2 (``Gemma2ForCausalLM``: norms before and after each sub-layer, (1 + w) RMSNorm, GeGLU, scaled
embeddings, attention and logit soft-capping, local and global layers) and Gemma 3 text
(``Gemma3ForCausalLM``: Gemma 2's block with per-head q/k norms and the local layers' own RoPE base)
are the same model with the switches of ``norm_placement`` and the ones after it in ``ModelConfig``.

Importing reads an HF directory directly (``config.json`` + safetensors, sharded or not, one shard
in memory at a time; a ``pytorch_model.bin`` only through ``torch.load(weights_only=True)``), so it
needs no ``transformers``; exporting builds the ``transformers`` model and uses its ``save_pretrained``.
Weight names map one-to-one except GPT-2's ``Conv1D`` (stored transposed, q/k/v fused in
``c_attn``). scalelm's RoPE uses HF Llama's rotate-half layout, so q/k weights copy unchanged.
Tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with its chat template,
``chat_template.jinja``) are carried across in both directions.

CLI (in ``scalelm.convert``): ``scalelm convert --from-hf HF_DIR --out CKPT_DIR`` and
``scalelm convert MODEL --to-hf OUT``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..checkpoint import staged_dir
from ..checkpoint.model_dir import copy_files, read_json, write_json, write_model_files
from ..checkpoint.names import (  # noqa: F401 (TOKENIZER_FILES: re-exported)
    FORMAT,
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    SPECIAL_TOKENS_MAP,
    TOKENIZER,
    TOKENIZER_CONFIG,
    TOKENIZER_FILES,
)
from ..runs import resolve_checkpoint
from .build import build_model
from .gpt import GPT
from .hf_config import (  # noqa: F401 (ENCODER_FAMILIES: re-exported)
    ENCODER_FAMILIES,  # noqa: F401 (the families' config API, re-exported: scalelm.model.hf is the public face)
    ConversionError,
    hf_config_dict,
    hf_family,
    model_config_from_hf,
    read_hf_json,
    window_from_layer_types,  # noqa: F401
)
from .hf_weights import (  # noqa: F401 (re-exported)
    hf_to_scalelm_state_dict,
    hf_weight_files,  # noqa: F401
    load_hf_weights,
    scalelm_to_hf_state_dict,
)
from .io import load_model_dir, load_state_dict_into, model_state_dict, read_model_config

EOT = "<|endoftext|>"
# the special tokens an encoder's exported tokenizer_config.json names where its tokenizer has them
# (Hugging Face's attribute -> the strings, most preferred first): fill-mask needs ``mask_token``.
# ``<|mask|>`` is the one masked-LM training adds to scalelm's tokenizers (scalelm.data.tokenizer.MASK)
ENCODER_SPECIAL_TOKENS = {"mask_token": ("<|mask|>", "[MASK]", "<mask>"), "pad_token": ("<|pad|>", "[PAD]", "<pad>"),
                          "cls_token": ("[CLS]", "<s>", "<cls>"), "sep_token": ("[SEP]", "</s>", "<sep>"),
                          "unk_token": ("<|unk|>", "[UNK]", "<unk>")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- models

def from_hf(src: Union[str, Path, Any], dtype: torch.dtype = torch.float32,
            safetensors_only: bool = False) -> GPT:
    """A scalelm ``GPT`` from a ``transformers`` model or an HF model directory
    (``safetensors_only``: refuse a directory whose weights are only a pickled ``.bin``)."""
    if isinstance(src, (str, Path)):
        d = Path(src)
        if not (d / HF_CONFIG).is_file():
            raise ConversionError(f"{d} is not a Hugging Face model directory (no {HF_CONFIG})")
        cfg = model_config_from_hf(read_hf_json(d / HF_CONFIG))  # a bad config fails before the weights are read
        model = build_model(cfg)
        load_hf_weights(model, d, safetensors_only)
    else:
        cfg = model_config_from_hf(src.config.to_dict())
        model = build_model(cfg)
        load_state_dict_into(model, hf_to_scalelm_state_dict(src.state_dict(), cfg), source="Hugging Face checkpoint")
    return model.to(dtype).eval()


def to_hf(model: GPT, eos_id: Any = None, bos_id: Any = None, prefer: Optional[str] = None):
    """The equivalent ``transformers`` model (same weights, same dtype, eval mode); ``prefer``: the
    family to write where it holds the model (see :func:`hf_family`)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
    except ImportError:
        raise ConversionError("exporting needs transformers: pip install 'scalelm[hf]'") from None
    kw = hf_config_dict(model.cfg, eos_id, bos_id, prefer)
    config = AutoConfig.for_model(**kw)
    encoder = kw["model_type"] in ENCODER_FAMILIES  # BertForMaskedLM / ModernBertForMaskedLM
    hf = (AutoModelForMaskedLM if encoder else AutoModelForCausalLM).from_config(config)
    sd = scalelm_to_hf_state_dict(model_state_dict(model), model.cfg, prefer)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not (k.endswith(("lm_head.weight", "decoder.weight"))
                                                 and model.cfg.tie_embeddings)]:
        raise ConversionError(f"internal mapping error: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    dtype = next(model.parameters()).dtype
    return hf.to(dtype).eval()


# ----------------------------------------------------------------------------- directories

def special_token_ids(ckpt_dir: Union[str, Path]) -> tuple[Any, Any]:
    """(bos, eos) ids of a model directory: an imported HF model's own config wins; otherwise
    our tokenizers use ``<|endoftext|>`` for both. eos may be a list (Llama 3 has several)."""
    d = Path(ckpt_dir)
    meta = json.loads((d / HF_CONFIG).read_text()).get("hf") or {}
    if meta.get("eos_token_id") is not None:
        return meta.get("bos_token_id"), meta["eos_token_id"]
    if not (d / TOKENIZER).is_file():
        return None, None
    from tokenizers import Tokenizer

    eot = Tokenizer.from_file(str(d / TOKENIZER)).token_to_id(EOT)
    return eot, eot


def recorded_hf_type(ckpt_dir: Union[str, Path]) -> Optional[str]:
    """The ``model_type`` a model directory was imported from (None for scalelm's own models)."""
    meta = read_json(Path(ckpt_dir) / HF_CONFIG) or {}
    rec = meta.get("hf") if isinstance(meta, dict) else None
    return rec.get("model_type") if isinstance(rec, dict) else None


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    return copy_files(src, dst, TOKENIZER_FILES)


def import_hf_dir(hf_dir: Union[str, Path], out_dir: Union[str, Path],
                  dtype: torch.dtype = torch.float32, source: str | None = None,
                  safetensors_only: bool = False) -> Path:
    """HF directory -> scalelm model directory (weights, config, tokenizer files). ``source`` is
    recorded as where the model came from (default: the directory; a Hub download names its id)."""
    src = Path(hf_dir)
    if not src.is_dir():
        raise ConversionError(f"Hugging Face model directory not found: {src}")
    model = from_hf(src, dtype, safetensors_only=safetensors_only)
    hf_cfg = read_hf_json(src / HF_CONFIG)
    meta = {k: hf_cfg.get(k) for k in ("model_type", "architectures", "bos_token_id", "eos_token_id",
                                        "pad_token_id")}
    gen_cfg = src / HF_GENERATION_CONFIG
    if gen_cfg.is_file():  # chat models list their end-of-turn tokens here (eos may be a list)
        g = read_hf_json(gen_cfg, HF_GENERATION_CONFIG)
        meta.update({k: g[k] for k in ("bos_token_id", "eos_token_id") if g.get(k) is not None})
    extra = {"hf": meta, "source": source or str(src.resolve())}
    with staged_dir(out_dir) as d:  # the weights, config and the copied tokenizer files, published at once
        write_model_files(d, dataclasses.asdict(model.cfg), model.state_dict(), extra=extra)
        _copy_tokenizer_files(src, d)
    return Path(out_dir)


def export_hf_dir(ckpt: Union[str, Path], out_dir: Union[str, Path],
                  dtype: torch.dtype = torch.float32) -> Path:
    """scalelm model directory (or RUN_DIR) -> directory ``AutoModelForCausalLM`` loads."""
    src = resolve_checkpoint(ckpt)
    cfg = read_model_config(src)
    prefer = recorded_hf_type(src)  # an import goes back to its own class (Phi-3, not Mistral)
    hf_family(cfg, prefer)  # fail on an unrepresentable config before loading any weights
    bos, eos = special_token_ids(src)
    hf = to_hf(load_model_dir(src, dtype=dtype, allow_quantized=False).eval(), eos_id=eos, bos_id=bos, prefer=prefer)
    out = Path(out_dir)
    with staged_dir(out, manifest=False) as tmp:  # Hugging Face's format: no manifest of ours
        hf.save_pretrained(tmp, safe_serialization=True)
        copied = _copy_tokenizer_files(src, tmp)
        if TOKENIZER in copied and TOKENIZER_CONFIG not in copied:
            # lets AutoTokenizer.from_pretrained(out) work on a tokenizer that scalelm trained
            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size}
            from tokenizers import Tokenizer

            vocab = Tokenizer.from_file(str(tmp / TOKENIZER)).get_vocab(with_added_tokens=True)
            specials = {"eos_token": EOT, "bos_token": EOT} if EOT in vocab else {}
            if cfg.arch == "encoder":  # the mask token (pipeline("fill-mask")), padding, BERT's [CLS]/[SEP]
                specials.update({k: t for k, names in ENCODER_SPECIAL_TOKENS.items()
                                 for t in [next((n for n in names if n in vocab), None)] if t is not None})
            write_json(tmp / TOKENIZER_CONFIG, {**tc, **specials})
            if cfg.arch == "encoder" and SPECIAL_TOKENS_MAP not in copied:
                write_json(tmp / SPECIAL_TOKENS_MAP, specials)
    return out


# ----------------------------------------------------------------------------- output check

def is_hf_model_dir(path: Path) -> bool:
    """A directory ``save_pretrained`` wrote: a config.json with a model_type (and no scalelm format)."""
    cfg = read_json(Path(path) / HF_CONFIG)
    return cfg is not None and "model_type" in cfg and cfg.get("format") != FORMAT

