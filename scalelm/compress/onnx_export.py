"""``scalelm export MODEL_DIR --format onnx --out DIR``: one ONNX graph for prefill and decode.

The graph is the model's own forward (``torch.onnx.export(..., dynamo=True)``) with a cache that
concatenates past keys/values of any length P >= 0 to the new ones instead of writing into a
pre-allocated buffer, so one graph serves the prefill (P = 0) and every decode step; batch,
sequence, past and logit counts are dynamic. Inputs and outputs are listed in
:mod:`scalelm.generate.onnx_backend`, which runs the graph (``generate --backend onnxruntime``).
The export checks onnxruntime against PyTorch on a short prompt and a few decode steps before
publishing, and records the largest logit difference in ``config.json``.
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import UserError
from ..generate.cpu_layout import shallow_copy
from ..generate.onnx_backend import FORMAT, INPUTS, ONNX_FILE, OUTPUTS, OrtCache, OrtModel, is_onnx_dir
from ..model.gpt import GPT, softcap
from ..model.kv_cache import LayerKVCache, local_layers
from ..model.masks import window_mask

PARITY_LIMIT = 1e-3  # an export whose logits differ more from PyTorch's is refused (1e-5 is typical)


class ConcatCache(LayerKVCache):
    """A :class:`~scalelm.model.kv_cache.LayerKVCache` for one traced forward: past keys/values
    come in as the graph's inputs (any length P >= 0), new ones are concatenated to them (and
    collected as its outputs), the mask follows ``attention_mask`` and positions are
    ``position_ids``. No capacity: the caller (onnxruntime's :class:`OrtCache`) holds the past.
    With ``cfg``'s sliding window, local layers get the band over slots (kv_cache.py), built into
    the graph for any past length."""

    def __init__(self, past_key, past_value, attention_mask, position_ids, cfg: Optional[ModelConfig] = None):
        self.k, self.v = past_key, past_value  # (n_layer, B, kv_heads, P, head_dim)
        self.attention_mask, self.position_ids = attention_mask, position_ids
        self.keys, self.values, self.mask, self.band = [], [], None, None
        self.window = cfg.sliding_window if cfg is not None else None
        self.local = local_layers(cfg) if cfg is not None else None

    def prepare(self, T: int) -> torch.Tensor:
        P = self.k.shape[3]
        q = torch.arange(T, device=self.k.device) + P
        s = torch.arange(P + T, device=self.k.device)
        causal = s[None, :] <= q[:, None]
        own = s[None, :] == q[:, None]  # a padding query sees its own slot: no row is fully masked
        self.mask = ((causal[None] & self.attention_mask.bool()[:, None, :]) | own[None])[:, None]
        if self.window is not None:  # no shortcut on P: it is a dynamic dim of the graph
            self.band = self.mask & window_mask(q, s, self.window)
        return self.position_ids

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        k = torch.cat([self.k[layer], k.to(self.k.dtype)], dim=2)
        v = torch.cat([self.v[layer], v.to(self.v.dtype)], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return k, v, self.band if self.band is not None and self.local[layer] else self.mask

    def advance(self, T: int) -> None:
        pass  # one forward per cache: the next step's past comes back in as the graph's inputs


class DecodeGraph(nn.Module):
    """``(input_ids, position_ids, attention_mask, past_key, past_value, logit_positions) ->
    (logits, present_key, present_value)`` around a GPT; the LM head runs only where asked."""

    def __init__(self, model: GPT):
        super().__init__()
        body = shallow_copy(model).eval()
        self.head, body.lm_head = body.lm_head, nn.Identity()  # the body returns the final-norm states
        self.body = body

    def forward(self, input_ids, position_ids, attention_mask, past_key, past_value, logit_positions):
        cache = ConcatCache(past_key, past_value, attention_mask, position_ids, self.body.cfg)
        h = self.body.hidden_states(input_ids, kv_cache=cache)
        logits = softcap(self.head(h.index_select(1, logit_positions)), self.body.cfg.logit_softcap)  # Gemma 2
        return logits, torch.stack(cache.keys), torch.stack(cache.values)


def example_inputs(model: GPT, B: int = 3, T: int = 7, P: int = 5, N: int = 2) -> tuple[torch.Tensor, ...]:
    """Distinct sizes (tracing unifies dims that happen to be equal), none of them 0 or 1."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    past = (cfg.n_layer, B, cfg.kv_heads, P, cfg.head_dim)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=g), (torch.arange(T) + P)[None].repeat(B, 1),
            torch.ones(B, P + T, dtype=torch.int64), torch.randn(past, generator=g), torch.randn(past, generator=g),
            torch.tensor([T - 2, T - 1]))


def _rename_dims(model_proto, names: dict[str, str]) -> None:
    """Give the exporter's symbolic dims (s12, s12 + s34) readable names in every shape."""
    pat = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None
    infos = list(model_proto.graph.input) + list(model_proto.graph.output) + list(model_proto.graph.value_info)
    for vi in infos:
        for d in vi.type.tensor_type.shape.dim:
            if pat is not None and d.dim_param:
                d.dim_param = pat.sub(lambda m: names[m.group(1)], d.dim_param)


def export_onnx(model: GPT, path: Path) -> Path:
    """Write the decode graph of ``model`` (float32, eval) to ``path`` (+ external data if > 2 GB)."""
    import onnx

    step = DecodeGraph(model.float().eval())
    args = example_inputs(model)
    auto = torch.export.Dim.AUTO
    shapes = {"input_ids": {0: auto, 1: auto}, "position_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto},
              "past_key": {1: auto, 3: auto}, "past_value": {1: auto, 3: auto}, "logit_positions": {0: auto}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(step, args, dynamo=True, dynamic_shapes=shapes, input_names=list(INPUTS),
                                        output_names=list(OUTPUTS), verbose=False, optimize=True)
        except Exception as e:  # the exporter's errors are many and internal: name the step that failed
            raise UserError(f"torch.onnx.export failed for this model: {str(e).splitlines()[0][:400]}") from None
    proto = program.model_proto
    dims = {}
    for i, want in ((0, ["batch", "seq"]), (2, [None, "total"]), (3, [None, None, None, "past"]),
                    (4, [None, None, None, "past"]), (5, ["n_logits"])):
        for d, name in zip(proto.graph.input[i].type.tensor_type.shape.dim, want, strict=False):
            if name and d.dim_param and re.fullmatch(r"s\d+", d.dim_param):
                dims.setdefault(d.dim_param, name)
    _rename_dims(proto, dims)
    big = proto.ByteSize() > (1 << 31) - (1 << 26)  # protobuf's 2 GiB limit: weights go to a side file
    onnx.save_model(proto, str(path), save_as_external_data=big, location=path.name + ".data")
    return path


def parity(model: GPT, ort: OrtModel, prompt_len: int = 8, steps: int = 3) -> float:
    """Largest |logit| difference, onnxruntime vs PyTorch, over a prefill and a few decode steps."""
    cfg = model.cfg
    n = min(prompt_len + steps, cfg.block_size)
    ids = torch.randint(0, cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))
    p = max(1, n - steps)
    with torch.no_grad():
        ref = model(ids)[0].float().numpy()
    cache = OrtCache(cfg, 2, n)
    worst = float(np.abs(ort(ids[:, :p], kv_cache=cache)[0].numpy() - ref[:, :p]).max())
    for t in range(p, n):
        worst = max(worst, float(np.abs(ort(ids[:, t:t + 1], kv_cache=cache)[0].numpy()[:, 0] - ref[:, t]).max()))
    return worst


def run_onnx_export(args) -> int:
    from ..checkpoint import staged_dir
    from ..checkpoint.model_dir import copy_files, read_config, write_json
    from ..checkpoint.names import CONFIG, TOKENIZER_FILES
    from ..checkpoint.quantized import read_quantization
    from ..model.io import load_model_dir
    from ..runs import resolve_checkpoint

    if args.dtype not in (None, "fp32"):
        raise UserError(f"--format onnx writes float32 (onnxruntime's CPU kernels); leave out --dtype {args.dtype}")
    src = resolve_checkpoint(args.model)
    q = read_quantization(src)
    if q is not None:
        raise UserError(f"{src} is {q['scheme']}-quantized: its packed kernels have no ONNX form; export the float "
                        f"model it was made from")
    out = Path(args.out)
    from ..runs import check_output_dir

    check_output_dir(out, "ONNX export directory", is_onnx_dir, sources=[args.model, src],
                     overwrite=args.overwrite)
    model = load_model_dir(src, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    with staged_dir(out) as staging:  # the graph, config and tokenizer files, manifest last, published at once
        print(f"exporting {src} to ONNX (torch.onnx.export, dynamo)", file=sys.stderr)
        export_onnx(model, staging / ONNX_FILE)
        diff = parity(model, OrtModel(staging / ONNX_FILE, model.cfg))
        if not diff <= PARITY_LIMIT:
            raise UserError(f"the exported graph's logits differ from PyTorch's by {diff:.3g} (> {PARITY_LIMIT}): "
                            f"the export is wrong for this model; please report it")
        src_meta = read_config(src)
        import onnx
        import onnxruntime

        meta = {"format": FORMAT, "model": src_meta["model"],
                "onnx": {"file": ONNX_FILE, "inputs": list(INPUTS), "outputs": list(OUTPUTS), "dtype": "float32",
                         "params": model.num_params(), "max_abs_logit_diff_vs_torch": diff,
                         "source": str(Path(src).resolve()), "torch": torch.__version__,
                         "onnx_version": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                         "opset": next((o.version for o in onnx.load(str(staging / ONNX_FILE), load_external_data=False)
                                        .opset_import if o.domain in ("", "ai.onnx")), None)}}
        meta.update({k: src_meta[k] for k in ("step", "hf") if k in src_meta})
        write_json(staging / CONFIG, meta)
        copy_files(src, staging, TOKENIZER_FILES)
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith(ONNX_FILE))
    print(json.dumps({"checkpoint": str(src), "out": str(out), "format": "onnx", "params": model.num_params(),
                      "bytes": size, "max_abs_logit_diff_vs_torch": diff,
                      "seconds": round(time.perf_counter() - t0, 2)}))
    return 0
