"""The model directory format: safetensors weights, ``config.json`` and the tokenizer.

A model directory holds ``model.safetensors`` (weights; a tied LM head is stored once, as the
embedding), ``config.json`` (``{"format": "scalelm", "model": {...}}``) and, when known,
``tokenizer.json``, and ``manifest.json`` (sha256 of each file, checked on load). No pickle is
involved in weights. Every file is written to a temporary name, fsynced and renamed, so a kill at
any moment leaves the previous file intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import ConfigError, ModelConfig, _coerce, _field_types
from ..errors import CheckpointError
from ..fileio import publish_dir
from ..runs import ADAPTER, CONFIG, DCP_METADATA, TOKENIZER, WEIGHTS, resolve_checkpoint
from .adapters import check_base, dcp_trainable, lora_entry, merge_adapters
from .build import build_model
from .gpt import GPT
from .manifest import verify_manifest, write_manifest
from .quant import QuantizedModelError, check_quantized_state, prepare_kernels, quantized_gpt, read_quantization

FORMAT = "scalelm"
MAX_BLOCK_SIZE = 1 << 20  # a config above these is refused before anything is built
MAX_VOCAB = 1 << 24


# ----------------------------------------------------------------------------- model dirs

def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Weights to store: contiguous CPU tensors, a tied head stored once (as the embedding)."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def model_config_from_dict(d: dict, where: str = "config.json") -> ModelConfig:
    types = _field_types(ModelConfig)
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise CheckpointError(f"{where}: unknown model keys {unknown} (written by a newer scalelm?)")
    cfg = ModelConfig(**{k: _coerce(v, types[k], f"model.{k}") for k, v in d.items()})
    cfg.validate()
    return cfg


def save_model_dir(model: GPT, out_dir: str | Path, tokenizer_json: Optional[str] = None,
                   extra: Optional[dict] = None, manifest: bool = True) -> Path:
    """Write ``out_dir`` as a model directory (atomically: a partial one is never visible).

    ``manifest=False`` is for a caller that adds files and writes the manifest itself."""
    return save_state_dir(model.cfg, model.state_dict(), out_dir, tokenizer_json, extra, manifest)


def save_state_dir(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                   tokenizer_json: Optional[str] = None, extra: Optional[dict] = None,
                   manifest: bool = True) -> Path:
    """:func:`save_model_dir` from a GPT's config and state dict (e.g. one gathered from shards)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sd = {k: v for k, v in state_dict.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        meta = {"format": FORMAT, "model": dataclasses.asdict(cfg)}
        if extra:
            meta.update(extra)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_json is not None:
            (tmp / TOKENIZER).write_text(tokenizer_json)
        if manifest:
            write_manifest(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    d = Path(ckpt_dir)
    if not d.exists():
        raise CheckpointError(f"checkpoint not found: {d}")
    p = d / CONFIG
    if not p.is_file():
        raise CheckpointError(f"{d} is not a scalelm checkpoint: {CONFIG} is missing")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is corrupt: {e}") from None
    if not isinstance(meta, dict):  # e.g. [] or 3: valid JSON, but no config
        raise CheckpointError(f"{p} is not a scalelm model config (it holds a JSON {type(meta).__name__}, "
                              f"not an object): copy config.json from the checkpoint it came from again")
    if meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        hint = " (a Hugging Face model? import it with `scalelm convert --from-hf`)" if "model_type" in meta else ""
        raise CheckpointError(f"{p} is not a scalelm model config{hint}")
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


def check_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    """NaN or inf in a weight means a diverged or damaged file: refuse it, naming the tensor."""
    for k, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor '{k}' holds {n} non-finite value(s) (NaN or inf): the "
                                  f"weights are corrupt or come from a diverged run; use an earlier checkpoint")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights not found: {p}")
    try:
        sd = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is corrupt or not a safetensors file: {e}") from None
    check_finite(sd, str(p))
    return sd


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
    try:
        with safe_open(str(p), "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is corrupt or not a safetensors file: {e}") from None
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
        verify_manifest(d, only=(CONFIG, WEIGHTS, TOKENIZER), optional=(TOKENIZER,))
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
    import torch.distributed.checkpoint as dcp  # torch's reader: no process group, nothing from scalelm.distributed

    ckpt = Path(ckpt)
    if verify:
        verify_manifest(ckpt)
    cfg = read_model_config(ckpt)
    check_config_sizes(cfg, str(ckpt / CONFIG))
    lora = lora_entry(ckpt)  # a LoRA run's checkpoint: the base and the adapters, merged below
    pre = str(lora.get("prefix", "")) if lora else ""
    try:
        meta = dcp.FileSystemReader(str(ckpt / DCP_METADATA.parent)).read_metadata().state_dict_metadata
        if not lora and "model.tok_emb.weight" not in meta:  # a model inside a training wrapper (e.g. "gpt.")
            found = [k[len("model."):-len("tok_emb.weight")] for k in meta
                     if k.startswith("model.") and k.endswith(".tok_emb.weight")]
            pre = found[0] if len(found) == 1 else pre
        saved_dtype = meta[f"model.{pre}tok_emb.weight"].properties.dtype  # build the model as it was saved
    except Exception as e:
        raise CheckpointError(f"{ckpt / DCP_METADATA.parent} is corrupt or incomplete: {str(e).splitlines()[0][:300]}") from None
    wrong = [k for k, shape in expected_shapes(cfg).items()  # before to_empty allocates what the config asks
             if tuple(getattr(meta.get(f"model.{pre}{k}"), "size", ()) or ()) != shape]
    if wrong:
        raise CheckpointError(f"{ckpt / CONFIG} does not match the weights in {ckpt / DCP_METADATA.parent} (a damaged "
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
    try:
        dcp.load({"model": sd}, checkpoint_id=str(ckpt / DCP_METADATA.parent), no_dist=True)
    except Exception as e:
        raise CheckpointError(f"could not read the weights in {ckpt / DCP_METADATA.parent}: {str(e).splitlines()[0][:400]}") from None
    if lora:
        merge_adapters(model, read_adapters(ckpt, verify=False)[1], lora, str(ckpt))
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


# ----------------------------------------------------------------------------- LoRA dirs (format: adapters.py)

def read_adapters(ckpt_dir: str | Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(lora entry, trained tensors)`` of a LoRA directory or of a LoRA run's sharded checkpoint."""
    d = Path(ckpt_dir)
    entry = lora_entry(d)
    if entry is None:
        raise CheckpointError(f"{d} is not a LoRA checkpoint ({CONFIG} has no lora entry)")
    if (d / ADAPTER).is_file():
        if verify:
            verify_manifest(d, only=(CONFIG, ADAPTER, TOKENIZER), optional=(TOKENIZER,))
        return entry, load_weights(d / ADAPTER)
    if not (d / DCP_METADATA).is_file():
        raise CheckpointError(f"{d} has neither {ADAPTER} nor a sharded checkpoint ({DCP_METADATA})")
    import torch.distributed.checkpoint as dcp

    if verify:
        verify_manifest(d)
    tensors = dcp_trainable(d, str(entry.get("prefix", "")))
    try:
        dcp.load({"model": tensors}, checkpoint_id=str(d / DCP_METADATA.parent), no_dist=True)
    except Exception as e:  # DCP wraps read failures in CheckpointException
        raise CheckpointError(f"could not read the adapters in {d / DCP_METADATA.parent}: "
                              f"{str(e).splitlines()[0][:400]}") from None
    return entry, tensors


def load_lora_dir(ckpt_dir: str | Path, device="cpu", dtype: Optional[torch.dtype] = None,
                  verify: bool = True) -> GPT:
    """The plain ``GPT`` of a LoRA directory: its base (hash checked) with the adapters merged."""
    d = Path(ckpt_dir)
    cfg = read_model_config(d)
    entry, tensors = read_adapters(d, verify=verify)
    base = check_base(entry, d)
    model = load_model_dir(base, model_cfg=cfg, verify=verify, allow_quantized=False)  # the run's config
    merge_adapters(model, tensors, entry, str(d / ADAPTER))
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def read_tokenizer_json(ckpt_dir: str | Path) -> Optional[str]:
    p = Path(ckpt_dir) / TOKENIZER
    return p.read_text() if p.is_file() else None




def load_model(path: str | Path, device="cpu", dtype: Optional[torch.dtype] = None, verify: bool = True) -> GPT:
    """The ``GPT`` of a model directory, or of a RUN_DIR's latest checkpoint."""
    return load_model_dir(resolve_checkpoint(path), device=device, dtype=dtype, verify=verify)


save_model = save_model_dir
