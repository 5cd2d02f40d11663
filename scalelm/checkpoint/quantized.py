"""A quantized model directory (``scalelm quantize``): a model directory whose
``model.safetensors`` holds, for each quantized Linear ``P``, ``P.qweight`` / ``P.scale``
(/ ``P.zero``) beside the float tensors (the layout is described in :mod:`scalelm.model.quant`),
and whose ``config.json`` records ``"quantization": {"scheme", "group_size", "method",
"modules", ...}``. The source's tokenizer files are carried over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

from ..errors import CheckpointError
from .model_dir import copy_files, read_json, write_model_files
from .names import CONFIG, TOKENIZER, TOKENIZER_FILES
from .staging import staged_dir

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


def quant_meta(scheme: str, group_size: int, method: str, modules: Iterable[str]) -> dict:
    """The ``"quantization"`` entry of config.json."""
    return {"scheme": scheme, "group_size": group_size if scheme == "int4" else None, "method": method,
            "modules": sorted(modules)}


def read_quantization(ckpt_dir: str | Path) -> Optional[dict]:
    """The ``quantization`` entry of a model directory's config.json (None: a float model), checked."""
    p = Path(ckpt_dir) / CONFIG
    meta = read_json(p)
    if meta is None:
        return None  # read_config reports a missing or broken config.json
    q = meta.get("quantization")
    if q is None:
        return None
    bad = f"{p}: the \"quantization\" entry is damaged"
    if not isinstance(q, dict) or q.get("scheme") not in SCHEMES or not isinstance(q.get("modules"), list) \
            or not all(isinstance(m, str) for m in q["modules"]):
        raise CheckpointError(f"{bad} (it needs scheme int8|int4 and a list of modules); quantize the float model "
                              f"again")
    if q["scheme"] == "int4" and q.get("group_size") not in GROUP_SIZES:
        raise CheckpointError(f"{bad}: int4 group_size {q.get('group_size')!r} is not one of {GROUP_SIZES}")
    return q


def save_quantized_dir(out: str | Path, model: dict, state_dict: dict[str, torch.Tensor],
                       tokenizer_json: Optional[str], extra: dict, src: Optional[str | Path] = None) -> Path:
    """Write a quantized model directory atomically (``extra`` holds the ``"quantization"`` entry);
    the other tokenizer files of ``src`` (its chat template, ...) are copied along."""
    if not isinstance(extra.get("quantization"), dict):
        raise ValueError("a quantized model directory needs its \"quantization\" entry")
    with staged_dir(out) as d:  # the whole directory, manifest last, published at once
        write_model_files(d, model, state_dict, tokenizer_json, extra)
        if src is not None:
            copy_files(src, d, [n for n in TOKENIZER_FILES if n != TOKENIZER])
    return Path(out)
