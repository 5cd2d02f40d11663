"""Generation with onnxruntime on a graph from ``scalelm export --format onnx``.

The export directory holds ``model.onnx`` (one graph for prefill and decode), ``config.json``
(``{"format": "scalelm-onnx", "model": {...}, "onnx": {...}}``), the tokenizer files and a
manifest. The graph's inputs and outputs (B rows, T new tokens, P cached positions, N logits):

    input_ids (B, T) int64, position_ids (B, T) int64, attention_mask (B, P+T) int64 (0 = padding),
    past_key / past_value (n_layer, B, n_kv_head, P, head_dim) float32 (P may be 0),
    logit_positions (N,) int64 (which of the T positions get logits)
    -> logits (B, N, vocab), present_key / present_value (n_layer, B, n_kv_head, P+T, head_dim)

:class:`OrtModel` is called like the GPT and brings its own cache, so a
:class:`~scalelm.generate.generator.Generator` runs on it unchanged
(``Generator.from_checkpoint(DIR, backend="onnxruntime")``): batching, left padding, sampling,
stop strings and the sliding window are the same code, and its greedy output equals PyTorch's
token for token (tests/compress/test_onnx.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoint.manifest import verify_manifest
from ..checkpoint.names import CONFIG, ONNX_FILE, WEIGHTS
from ..config import ModelConfig
from ..errors import CheckpointError
from ..model.kv_cache import GeneratorKVCache
from .outputs import GenerationError

FORMAT = "scalelm-onnx"
INPUTS = ("input_ids", "position_ids", "attention_mask", "past_key", "past_value", "logit_positions")
OUTPUTS = ("logits", "present_key", "present_value")


def is_onnx_dir(path) -> bool:
    p = Path(path)
    if not ((p / CONFIG).is_file() and (p / ONNX_FILE).is_file()):
        return False
    try:
        return json.loads((p / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_onnx_config(d: Path) -> tuple[ModelConfig, dict]:
    from ..model.io import model_config_from_dict

    if not is_onnx_dir(d):
        hint = (" (a model directory: export it first with `scalelm export DIR --format onnx --out ONNX_DIR`)"
                if (d / WEIGHTS).is_file() else "")
        raise CheckpointError(f"{d} is not an ONNX export directory ({ONNX_FILE} + a {FORMAT} {CONFIG}){hint}")
    meta = json.loads((d / CONFIG).read_text())
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{d / CONFIG} has no model config: export the model again")
    return model_config_from_dict(meta["model"], str(d / CONFIG)), meta


class OrtCache(GeneratorKVCache):
    """The past keys and values of onnxruntime's graph, fed back in at the next step (its
    ``present_key``/``present_value`` outputs). A :class:`~scalelm.model.kv_cache.GeneratorKVCache`,
    so ``Generator`` drives it as it drives the GPT's cache: fill position, left padding, and rows
    reordered for beam search. The graph writes keys/values inside itself (no per-layer ``update``)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int):
        self.max_len, self.batch_size = max_len, batch_size
        self._dims = (cfg.n_layer, cfg.kv_heads, cfg.head_dim)
        self.mask: Optional[np.ndarray] = None
        self.reset()

    def reset(self, start: Optional[torch.Tensor] = None) -> None:
        self.pos = 0
        self.start = np.zeros(self.batch_size, np.int64) if start is None else start.cpu().numpy().astype(np.int64)
        L, H, D = self._dims
        self.k = self.v = np.zeros((L, self.batch_size, H, 0, D), np.float32)

    def prepare(self, T: int) -> np.ndarray:
        """The graph's ``position_ids`` for ``T`` new tokens; sets ``mask`` (its ``attention_mask``)."""
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens exceed its {self.max_len} slots")
        slots = np.arange(self.pos, self.pos + T, dtype=np.int64)
        self.mask = (np.arange(self.pos + T, dtype=np.int64)[None, :] >= self.start[:, None]).astype(np.int64)
        return np.clip(slots[None, :] - self.start[:, None], 0, None)

    def advance(self, T: int) -> None:
        self.pos += T

    def index_rows(self, order: torch.Tensor) -> None:
        o = order.cpu().numpy()
        self.k, self.v, self.start = self.k[:, o], self.v[:, o], self.start[o]  # (copies: contiguous for the graph)
        self.batch_size = len(o)


class OrtModel:
    """An onnxruntime session called like the GPT: ``model(idx, kv_cache=cache, last_only=True)``
    returns ``(logits, None)`` and advances the cache, as ``GPT.forward`` does."""

    def __init__(self, onnx_path: Path, cfg: ModelConfig, n_params: int = 0, threads: Optional[int] = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a bad or truncated file
            raise CheckpointError(f"onnxruntime cannot load {onnx_path}: {str(e).splitlines()[0][:300]}") from None
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(INPUTS):
            raise CheckpointError(f"{onnx_path} has inputs {names}, not scalelm's decode graph {list(INPUTS)}: "
                                  f"export the model again with `scalelm export --format onnx`")
        self.cfg, self.n_params, self.path = cfg, n_params, onnx_path
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if sorted(outputs) != sorted(OUTPUTS):
            raise CheckpointError(f"{onnx_path} has outputs {sorted(outputs)}, not scalelm's decode graph "
                                  f"{list(OUTPUTS)}: export the model again with `scalelm export --format onnx`")
        width = (outputs["logits"] or [None])[-1]
        if isinstance(width, int):  # a fixed width (as exported) is checked now; a symbolic one at the first run
            self._check_width(width)

    def _check_width(self, width: int) -> None:
        """Logits over another vocabulary than the config's would be sampled into ids the tokenizer
        does not have (or never give ids it does): the graph and its config.json do not belong together."""
        if width != self.cfg.vocab_size:
            raise CheckpointError(f"{self.path} gives logits over {width} tokens but its {CONFIG} says the "
                                  f"vocabulary has {self.cfg.vocab_size}: the graph and the config do not belong "
                                  f"together; export the model again with `scalelm export --format onnx`")

    def parameters(self):
        yield torch.empty(1).expand(self.n_params)  # for counting, device and dtype (the weights live in the session)

    def eval(self) -> "OrtModel":
        return self

    def new_cache(self, batch_size: int, capacity: int) -> "OrtCache":
        return OrtCache(self.cfg, batch_size, capacity)

    def run(self, ids: np.ndarray, cache: OrtCache, positions: np.ndarray) -> np.ndarray:
        T = ids.shape[1]
        position_ids = cache.prepare(T)
        logits, cache.k, cache.v = self.session.run(list(OUTPUTS), {
            "input_ids": ids, "position_ids": position_ids, "attention_mask": cache.mask, "past_key": cache.k,
            "past_value": cache.v, "logit_positions": positions})
        cache.advance(T)
        if logits.shape[-1] != self.cfg.vocab_size:
            self._check_width(logits.shape[-1])
        return logits

    def __call__(self, idx: torch.Tensor, kv_cache: OrtCache, last_only: bool = False, **_):
        if not isinstance(kv_cache, OrtCache):
            raise GenerationError("the onnxruntime backend runs the Generator's decoding (greedy, sampled or beam "
                                  "search), not speculative decoding: use the PyTorch backend for that")
        ids = np.ascontiguousarray(idx.cpu().numpy(), dtype=np.int64)
        T = ids.shape[1]
        positions = np.array([T - 1] if last_only else range(T), dtype=np.int64)
        return torch.from_numpy(self.run(ids, kv_cache, positions)), None

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits at every position of ``idx`` (B, T) from an empty cache (for perplexity)."""
        return self(idx, kv_cache=self.new_cache(idx.shape[0], idx.shape[1]))[0]


def load_onnx_model(path, threads: Optional[int] = None, verify: bool = True) -> OrtModel:
    """The session of an export directory, checked against its manifest first."""
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"ONNX export directory not found: {d}")
    cfg, meta = read_onnx_config(d)
    if verify:
        verify_manifest(d)
    return OrtModel(d / ONNX_FILE, cfg, int(meta.get("onnx", {}).get("params", 0)), threads)


def check_ort_args(args) -> None:
    """``generate --backend onnxruntime``: refuse what only the PyTorch backend does."""
    device, dtype = getattr(args, "device", "auto"), getattr(args, "dtype", "auto")
    unsupported = [o for o, on in (("--compile", getattr(args, "compile", False)),
                                   ("--draft", getattr(args, "draft", None)),
                                   ("--prompt-lookup", getattr(args, "prompt_lookup", 0)),
                                   (f"--device {device}", device not in ("auto", "cpu")),
                                   (f"--dtype {dtype}", dtype not in ("auto", "fp32"))) if on]
    if unsupported:
        raise GenerationError(f"{', '.join(unsupported)}: not available with --backend onnxruntime (CPU, fp32)")
