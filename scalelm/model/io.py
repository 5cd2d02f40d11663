"""Models from and to model directories: a ``GPT`` built from ``config.json`` and loaded strictly.

The files themselves (``model.safetensors``, ``config.json``, ``tokenizer.json``,
``manifest.json``; LoRA adapters, a quantized model's tensors, sharded checkpoints) are read
and written by :mod:`scalelm.checkpoint`, at the level of state dicts and JSON; this module adds
what needs the model: its config as a ``ModelConfig``, the shapes it implies, building it and
loading the tensors into it. No pickle is involved in weights, and every directory is written
atomically (a kill at any moment leaves the previous one intact).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.adapters import check_base, lora_entry, merge_adapters, read_adapters  # noqa: F401
from ..checkpoint.dcp import model_entries, read_model_shards
from ..checkpoint.manifest import verify_manifest
from ..checkpoint.model_dir import read_config, read_tensors, save_model_files, stored_weights, tensor_shapes
from ..checkpoint.model_dir import read_tokenizer_json as read_tokenizer_json  # noqa: F401 (re-exported)
from ..checkpoint.model_dir import verify_model_files
from ..checkpoint.names import ADAPTER, CONFIG, DCP_DIR, DCP_METADATA, FORMAT, WEIGHTS  # noqa: F401 (FORMAT: re-exported)
from ..config import ConfigError, ModelConfig, _coerce, _field_types
from ..errors import CheckpointError
from ..runs import resolve_checkpoint
from .build import build_model
from .gpt import GPT
from .quant import QuantizedModelError, check_quantized_state, prepare_kernels, quantized_gpt, read_quantization

MAX_BLOCK_SIZE = 1 << 20  # a config above these is refused before anything is built
MAX_VOCAB = 1 << 24


# ----------------------------------------------------------------------------- model dirs

def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Weights to store: contiguous CPU tensors, a tied head stored once (as the embedding)."""
    sd = stored_weights(model.state_dict(), model.cfg.tie_embeddings)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def model_config_from_dict(d: dict, where: str = CONFIG) -> ModelConfig:
    types = _field_types(ModelConfig)
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise CheckpointError(f"{where}: unknown model keys {unknown} (written by a newer scalelm?)")
    cfg = ModelConfig(**{k: _coerce(v, types[k], f"model.{k}") for k, v in d.items()})
    cfg.validate()
    return cfg


def save_model_dir(model: GPT, out_dir: str | Path, tokenizer_json: Optional[str] = None,
                   extra: Optional[dict] = None, manifest: bool = True,
                   files: Optional[dict[str, str]] = None) -> Path:
    """Write ``out_dir`` as a model directory (atomically: a partial one is never visible).

    ``files``: more text files (name -> text, e.g. a chat template), covered by the manifest.
    ``manifest=False`` is for a caller that stages ``out_dir`` itself and adds files to it."""
    return save_state_dir(model.cfg, model.state_dict(), out_dir, tokenizer_json, extra, manifest, files)


def save_state_dir(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                   tokenizer_json: Optional[str] = None, extra: Optional[dict] = None,
                   manifest: bool = True, files: Optional[dict[str, str]] = None) -> Path:
    """:func:`save_model_dir` from a GPT's config and state dict (e.g. one gathered from shards)."""
    return save_model_files(out_dir, dataclasses.asdict(cfg), state_dict, tokenizer_json, extra, files, manifest)


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    p = Path(ckpt_dir) / CONFIG
    meta = read_config(ckpt_dir)
    try:
        return model_config_from_dict(meta["model"], str(p))
    except ConfigError as e:
        raise CheckpointError(f"{p}: {e}") from None


def load_state_dict_into(model: GPT, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load ``sd`` into ``model``: every mismatch is named with both shapes."""
    expected = {k: v for k, v in model.state_dict().items()
                if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    problems = []
    for k, v in expected.items():
        if k not in sd:
            problems.append(f"missing tensor '{k}' (model expects shape {tuple(v.shape)})")
        elif tuple(sd[k].shape) != tuple(v.shape):
            problems.append(f"tensor '{k}' has shape {tuple(sd[k].shape)} in the {source} "
                            f"but the model expects {tuple(v.shape)}")
    for k in sd:
        if k not in expected:
            problems.append(f"unexpected tensor '{k}' {tuple(sd[k].shape)} in the {source}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems[:5]) + more)
    model.load_state_dict(sd, strict=False)  # the tied head is absent from sd by design


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (a damaged file, or NaN/inf in one, is a CheckpointError)."""
    return read_tensors(path)


def check_config_sizes(cfg: ModelConfig, where: str) -> None:
    if cfg.block_size > MAX_BLOCK_SIZE or cfg.vocab_size > MAX_VOCAB:
        raise CheckpointError(f"{where}: block_size={cfg.block_size} / vocab_size={cfg.vocab_size} is beyond what "
                              f"scalelm loads ({MAX_BLOCK_SIZE} / {MAX_VOCAB}): the config is damaged or tampered")


def expected_shapes(cfg: ModelConfig, quant: Optional[dict] = None) -> dict[str, tuple]:
    """The stored tensors' shapes ``cfg`` (and a ``quantization`` entry) implies, from a model on the
    meta device (no memory)."""
    if quant is not None:
        model = quantized_gpt(cfg, quant, device="meta")
    else:
        with torch.device("meta"):
            model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not (cfg.tie_embeddings and k == "lm_head.weight")}


def check_weights_header(path: str | Path, cfg: ModelConfig, where: str = CONFIG,
                         quant: Optional[dict] = None) -> None:
    """Compare ``cfg`` with the safetensors header of ``path`` before anything is allocated, so a
    damaged or tampered config is an error rather than a huge allocation."""
    p = Path(path)
    check_config_sizes(cfg, where)
    saved = tensor_shapes(p)
    expected = expected_shapes(cfg, quant)
    problems = [f"'{k}' is {saved[k]} in the weights but {shape} by the config" if k in saved else
                f"'{k}' {shape} is missing from the weights" for k, shape in expected.items() if saved.get(k) != shape]
    problems += [f"unexpected tensor '{k}' {saved[k]} in the weights" for k in saved if k not in expected]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        n_cfg, n_file = (sum(math.prod(s) for s in shapes.values()) for shapes in (expected, saved))
        raise CheckpointError(f"{where} does not match the weights in {p} (a damaged or edited config? it implies "
                              f"{n_cfg:,} parameters, the file holds {n_file:,}): " + "; ".join(problems[:5]) + more)


def load_model_dir(ckpt_dir: str | Path, device="cpu", dtype: Optional[torch.dtype] = None,
                   model_cfg: Optional[ModelConfig] = None, verify: bool = True,
                   allow_quantized: bool = True) -> GPT:
    """Build the model from ``config.json`` (or ``model_cfg``) and load its weights strictly.

    ``verify`` checks the files against ``manifest.json`` (when there is one) first. A quantized
    directory (``scalelm quantize``) gives a GPT with :class:`~scalelm.model.quant.QuantLinear` s,
    their kernels chosen for ``device``; ``allow_quantized=False`` refuses one (callers that need
    float weights: training, conversion, pruning).
    """
    d = Path(ckpt_dir)
    if not (d / WEIGHTS).is_file() and (d / DCP_METADATA).is_file():  # a sharded training checkpoint (torchrun)
        return consolidated_model(d, device=device, dtype=dtype or torch.get_default_dtype(), verify=verify)
    if not (d / WEIGHTS).is_file() and (d / ADAPTER).is_file():  # a LoRA run's: its base, adapters merged
        return load_lora_dir(d, device=device, dtype=dtype, verify=verify)
    if verify and d.is_dir():  # what is read here and by its callers, not the optimizer state of a checkpoint
        verify_model_files(d)
    cfg = model_cfg or read_model_config(d)
    quant = read_quantization(d)
    if quant is not None and not allow_quantized:
        raise QuantizedModelError(f"{d} is {quant['scheme']}-quantized (`scalelm quantize`): this needs float weights; "
                                  f"use the float model it was made from")
    if (d / WEIGHTS).is_file():
        check_weights_header(d / WEIGHTS, cfg, str(d / CONFIG) if model_cfg is None else "the model config", quant)
    sd = load_weights(d / WEIGHTS)
    model = build_model(cfg) if quant is None else quantized_gpt(cfg, quant)
    if quant is not None:
        check_quantized_state(model, sd, str(d / WEIGHTS))
    load_state_dict_into(model, sd, source=str(d / WEIGHTS))
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    if quant is not None:
        prepare_kernels(model)
    return model


def consolidated_model(ckpt: str | Path, device="cpu", dtype: Optional[torch.dtype] = None, verify: bool = True):
    """Build the plain ``GPT`` of a sharded checkpoint in this process (no process group needed)."""
    ckpt = Path(ckpt)
    if verify:
        verify_manifest(ckpt)
    cfg = read_model_config(ckpt)
    check_config_sizes(cfg, str(ckpt / CONFIG))
    lora = lora_entry(ckpt)  # a LoRA run's checkpoint: the base and the adapters, merged below
    pre = str(lora.get("prefix", "")) if lora else ""
    entries = model_entries(ckpt)
    if not lora and "tok_emb.weight" not in entries:  # a model inside a training wrapper (e.g. "gpt.")
        found = [k[:-len("tok_emb.weight")] for k in entries if k.endswith(".tok_emb.weight")]
        pre = found[0] if len(found) == 1 else pre
    if f"{pre}tok_emb.weight" not in entries:
        raise CheckpointError(f"{ckpt / DCP_DIR} is corrupt or incomplete: it holds no '{pre}tok_emb.weight'")
    saved_dtype = entries[f"{pre}tok_emb.weight"][1]  # build the model as it was saved
    wrong = [k for k, shape in expected_shapes(cfg).items()  # before to_empty allocates what the config asks
             if entries.get(f"{pre}{k}", ((),))[0] != shape]
    if wrong:
        raise CheckpointError(f"{ckpt / CONFIG} does not match the weights in {ckpt / DCP_DIR} (a damaged "
                              f"or edited config?): tensors {wrong[:5]} differ in shape or are missing")
    with torch.device("meta"):
        model = build_model(cfg).to(saved_dtype)  # a GPT or an encoder-decoder
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.reset_parameters()  # recomputes the non-persistent RoPE tables; weights are loaded next
        if getattr(model, "rope_cos", None) is not None and not isinstance(model, GPT):
            # the encoder-decoder builds its tables in __init__ only
            from .gpt import rope_tables

            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            model.rope_cos.copy_(cos)
            model.rope_sin.copy_(sin)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    sd = {pre + k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    read_model_shards(ckpt, sd)
    if lora:
        merge_adapters(model.state_dict(), read_adapters(ckpt, verify=False)[1], lora, str(ckpt))
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


# ----------------------------------------------------------------------------- LoRA dirs (format: scalelm.checkpoint.adapters)

def load_lora_dir(ckpt_dir: str | Path, device="cpu", dtype: Optional[torch.dtype] = None,
                  verify: bool = True) -> GPT:
    """The plain ``GPT`` of a LoRA directory: its base (hash checked) with the adapters merged."""
    d = Path(ckpt_dir)
    cfg = read_model_config(d)
    entry, tensors = read_adapters(d, verify=verify)
    base = check_base(entry, d)
    model = load_model_dir(base, model_cfg=cfg, verify=verify, allow_quantized=False)  # the run's config
    merge_adapters(model.state_dict(), tensors, entry, str(d / ADAPTER))
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def load_model(path: str | Path, device="cpu", dtype: Optional[torch.dtype] = None, verify: bool = True) -> GPT:
    """The ``GPT`` of a model directory, or of a RUN_DIR's latest checkpoint."""
    return load_model_dir(resolve_checkpoint(path), device=device, dtype=dtype, verify=verify)


save_model = save_model_dir
