"""Steering by activation addition: a direction in the residual stream, added while the model runs.

    vec = steering_vector(model, tok, positive=["I loved it"], negative=["I hated it"], layer=3)
    save_vector("love.safetensors", vec, layer=3)
    with steer(gen, vec, layer=3, scale=4.0):      # a model or a Generator
        gen.generate("I think the movie was", 30)

The vector is the difference of the mean residual streams entering layer L (``blocks.L.resid_pre``,
where ActAdd, Turner et al. 2023, injects) over two sets of prompts; each prompt counts once, its
stream averaged over its tokens (``pool="mean"``) or taken at its last token (``pool="last"``, as in
contrastive activation addition, Rimsky et al. 2024). While steering, ``scale * vector`` is added to
that stream at every position, prompt and generated tokens alike. Vectors are safetensors files: one
tensor ``vector`` (n_embd,), with the layer, pool and prompt counts in the metadata.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..errors import UserError
from .hooks import HookError, capture, is_encdec, patch, target_module

POOLS = ("mean", "last")


def site(layer: int) -> str:
    return f"blocks.{layer}.resid_pre"


def check_layer(model, layer: int) -> None:
    m = target_module(model)
    if is_encdec(m):
        raise HookError("steering vectors are for decoder-only GPTs")
    if not 0 <= layer < m.cfg.n_layer:
        raise HookError(f"layer {layer} is outside the model's layers [0, {m.cfg.n_layer})")


@torch.no_grad()
def mean_stream(model, prompts: Sequence[Sequence[int]], layer: int, pool: str = "mean") -> torch.Tensor:
    """The residual stream entering ``layer``, pooled over each prompt's tokens, averaged over prompts (fp32)."""
    check_layer(model, layer)
    if pool not in POOLS:
        raise HookError(f"pool={pool!r}: choose {' or '.join(POOLS)}")
    if not prompts:
        raise HookError("no prompts to average over")
    m = target_module(model)
    dev = next(m.parameters()).device
    rows = []
    for ids in prompts:
        if not ids:
            raise HookError("an empty prompt has no residual stream to average")
        if len(ids) > m.cfg.block_size:
            raise HookError(f"a prompt of {len(ids)} tokens exceeds the model's context {m.cfg.block_size}")
        with capture(m, site(layer)) as cache:
            m(torch.tensor([list(ids)], device=dev))
        r = cache[site(layer)][0].float()  # (T, d)
        rows.append(r.mean(0) if pool == "mean" else r[-1])
    return torch.stack(rows).mean(0).cpu()


def steering_vector(model, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]], layer: int,
                    pool: str = "mean") -> torch.Tensor:
    """mean stream over ``positive`` minus mean stream over ``negative`` (token-id prompts)."""
    return mean_stream(model, positive, layer, pool) - mean_stream(model, negative, layer, pool)


def save_vector(path: Union[str, Path], vector: torch.Tensor, layer: int, **meta) -> None:
    """Write ``vector`` as safetensors (atomically), with ``layer`` and ``meta`` as string metadata."""
    from safetensors.torch import save

    from ..fileio import atomic_write_bytes

    info = {"layer": str(layer), "format": "scalelm-steering-vector", **{k: str(v) for k, v in meta.items()}}
    atomic_write_bytes(Path(path), save({"vector": vector.detach().float().cpu().contiguous()}, metadata=info))


def load_vector(path: Union[str, Path]) -> tuple[torch.Tensor, dict]:
    """``(vector, metadata)`` of a file :func:`save_vector` wrote (``metadata["layer"]`` an int)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise UserError(f"steering vector not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "vector" not in f.keys():
                raise UserError(f"{p} holds no tensor named 'vector': not a steering vector (`scalelm steer` "
                                f"writes them)")
            vec = f.get_tensor("vector")
    except SafetensorError as e:
        raise UserError(f"{p} is not a readable safetensors file ({e})") from None
    if vec.dim() != 1 or not torch.isfinite(vec).all():
        raise UserError(f"{p}: 'vector' must be one finite row of numbers, got shape {tuple(vec.shape)}")
    out = {**meta}
    if "layer" in meta:
        try:
            out["layer"] = int(meta["layer"])
        except ValueError:
            raise UserError(f"{p}: its metadata layer={meta['layer']!r} is not a number") from None
    return vec.float(), out


def check_vector(model, vector: torch.Tensor, layer: int) -> None:
    check_layer(model, layer)
    d = target_module(model).cfg.n_embd
    if vector.shape != (d,):
        raise HookError(f"the steering vector has {tuple(vector.shape)} numbers but the model's stream is {d} wide")


def adder(vector: torch.Tensor, scale: float):
    """A patch function adding ``scale * vector`` at every position (the vector moved once to the stream's
    device and dtype)."""
    cached: dict = {}

    def add(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in cached:
            cached[key] = (vector.float() * scale).to(device=x.device, dtype=x.dtype)
        return x + cached[key]

    return add


@contextmanager
def steer(model, vector: torch.Tensor, layer: int, scale: float = 1.0):
    """Add ``scale * vector`` to ``blocks.layer.resid_pre`` at every position while the block runs."""
    check_vector(model, vector, layer)
    with patch(model, {site(layer): adder(vector, scale)}):
        yield


def read_prompts(value: str) -> list[str]:
    """``--positive``/``--negative``: a file of prompts (one per non-empty line) if it names one, else the text."""
    p = Path(value)
    try:
        is_file = p.is_file()
    except OSError:  # a text too long to be a path
        is_file = False
    if is_file:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        out = [ln for ln in lines if ln]
        if not out:
            raise UserError(f"{p} has no prompts (one per line)")
        return out
    return [value]


def row_steering(vectors: Sequence[Optional[tuple[torch.Tensor, int, float]]]) -> dict:
    """Per-row steering of a batch (serve): ``vectors[i]`` is row i's (vector, layer, scale) or None. Returns
    patch functions ``{name: fn}`` adding each row its own ``scale * vector`` (zero for rows without one)."""
    layers = sorted({v[1] for v in vectors if v is not None})
    fns = {}
    for L in layers:
        rows = [(v[0] * v[2]) if v is not None and v[1] == L else None for v in vectors]
        d = next(r for r in rows if r is not None).shape[0]
        table = torch.stack([r if r is not None else torch.zeros(d) for r in rows])[:, None, :]  # (B, 1, d)

        def add(x: torch.Tensor, table=table) -> torch.Tensor:
            return x + table.to(device=x.device, dtype=x.dtype)

        fns[site(L)] = add
    return fns
