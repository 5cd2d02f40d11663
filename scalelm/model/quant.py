"""Weight-only int8/int4 quantization of a GPT's block Linears: the stored form and the kernels.

Stored (portable) form, in ``model.safetensors`` beside the float tensors, for a Linear ``P``
(e.g. ``blocks.0.attn.q_proj``); no layout of any one kernel is stored:

* int8: ``P.qweight`` int8 (out, in) and ``P.scale`` float16 (out,): ``w = qweight * scale``
  (symmetric, one scale per output channel).
* int4: ``P.qweight`` uint8 (out, in/2), two 4-bit values per byte (the even input column in
  the low nibble), ``P.scale`` float16 and ``P.zero`` uint8 (out, in/G): ``w = (q - zero) * scale``
  (asymmetric, one scale and zero point per group of G inputs).
* ``P.bias`` as in the float model. ``config.json`` gains ``"quantization": {"scheme",
  "group_size", "method", "modules"}``.

Embeddings, norms and the LM head stay float (an untied head can be quantized too). At load each
:class:`QuantLinear` repacks its weight for the fastest kernel that runs here, and checks that
kernel against the dequantized product on the layer itself before using it:

* ``int8_mm``: ``torch._weight_int8pack_mm`` (CPU; CUDA where torch has it);
* ``int4_cpu``: ``torch._convert_weight_to_int4pack_for_cpu`` + ``torch._weight_int4pack_mm_for_cpu``;
* ``int4_cuda``: ``torch._convert_weight_to_int4pack`` + ``torch._weight_int4pack_mm`` (tinygemm, bf16);
* ``dequant``: dequantize, then a float matmul (always works, slowest).

The packed kernels run in bf16 where the hardware multiplies bf16 natively (they are several times
faster than in fp32 on such CPUs), else in fp32; inputs are cast to that and outputs back. torchao's
weight-only tensors were measured and not used: see the README's quantization section.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint.quantized import GROUP_SIZES, SCHEMES, quant_meta, read_quantization  # noqa: F401 (the format)
from ..config import ModelConfig
from ..errors import CheckpointError, UserError
from .gpt import GPT

METHODS = ("rtn", "gptq")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down")
MIN_SCALE = 2.0 ** -14  # float16's smallest normal: a zero row or group gets a usable scale
KERNELS = ("int8_mm", "int4_cpu", "int4_cuda", "dequant")


class QuantizedModelError(CheckpointError):
    """A float weight was asked of a quantized model (e.g. to train or convert it)."""


# ----------------------------------------------------------------------------- the arithmetic

def int8_params(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric scales (float16) of a (out, in) weight."""
    return (w.float().abs().amax(dim=1) / 127).clamp(min=MIN_SCALE).half()


def int4_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale float16, zero uint8) per group of ``group_size`` inputs, each (out, in/G).
    The range always includes 0 (as GPTQ's reference quantizer does) so the zero point is in [0, 15]."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=MIN_SCALE).half()
    zero = torch.round(-lo / scale.float()).clamp(0, 15).to(torch.uint8)
    return scale, zero


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    """Integer values of ``w`` (..., K) with scales/zeros (..., K/G) or (...,) for int8 (zero None)."""
    w = w.float()
    if zero is None:
        return torch.round(w / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    g = w.reshape(*w.shape[:-1], zero.shape[-1], -1)
    q = torch.round(g / scale.float()[..., None]) + zero.float()[..., None]
    return q.clamp(0, 15).to(torch.uint8).reshape(w.shape)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 weight from integer values (int8, or unpacked int4 in uint8) and their scales/zeros."""
    if zero is None:
        return q.float() * scale.float()[..., None]
    g = q.float().reshape(*q.shape[:-1], zero.shape[-1], -1)
    return ((g - zero.float()[..., None]) * scale.float()[..., None]).reshape(q.shape)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    """Round ``w`` to the grid it will be stored on (what GPTQ measures its error against)."""
    return dequantize_values(quantize_values(w, scale, zero), scale, zero)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 -> (out, in/2) uint8, even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2], out[:, 1::2] = packed & 0xF, packed >> 4
    return out


# ----------------------------------------------------------------------------- the module

def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is native (the int kernels are 3x faster in bf16 there), else fp32 (fp16 on GPUs without bf16)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from ..hardware import cpu_has_bf16

    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32


class QuantLinear(nn.Module):
    """A Linear whose weight is int8 (per channel) or int4 (grouped): same call as ``nn.Linear``.

    Persistent buffers are the stored form (``state_dict`` writes exactly the file's tensors);
    the kernel's repacked copies are non-persistent and rebuilt by :meth:`select_kernel` (on
    load and on a device move). ``.to(dtype)`` casts only the bias: the stored values and scales
    keep their precision, and the kernel's compute dtype is chosen by :meth:`select_kernel`.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = 0,
                 bias: bool = False, device=None):
        super().__init__()
        if scheme not in SCHEMES:
            raise UserError(f"unknown quantization scheme {scheme!r}: choose {' or '.join(SCHEMES)}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group_size = group_size if scheme == "int4" else 0
        if scheme == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.ones(out_features, dtype=torch.float16, device=device))
            self.zero = None
        else:
            if in_features % group_size or group_size % 2:
                raise UserError(f"--group-size {group_size} does not divide the input width {in_features}")
            n_groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16, device=device))
            self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.kernel, self.compute_dtype = "dequant", torch.float32
        self._kernel_device: Optional[torch.device] = None

    @classmethod
    def from_float(cls, lin: nn.Linear, scheme: str, group_size: int = 0,
                   weight: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Round-to-nearest quantization of ``lin`` (or of ``weight``, e.g. GPTQ's updated copy
        with its own scales passed through :meth:`set_values`)."""
        w = (lin.weight if weight is None else weight).detach()
        m = cls(lin.in_features, lin.out_features, scheme, group_size, lin.bias is not None, device=w.device)
        scale, zero = (int8_params(w), None) if scheme == "int8" else int4_params(w, group_size)
        m.set_values(quantize_values(w, scale, zero), scale, zero)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        return m

    def set_values(self, q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> None:
        """Integer values (int8, or unpacked int4 as uint8 0..15) with their scales and zeros."""
        self.qweight.copy_(q if self.scheme == "int8" else pack_int4(q))
        self.scale.copy_(scale)
        if zero is not None:
            self.zero.copy_(zero)
        self._kernel_device = None  # repack on next use

    def values(self) -> torch.Tensor:
        """Integer values (out, in): int8, or int4 unpacked into uint8."""
        return self.qweight if self.scheme == "int8" else unpack_int4(self.qweight)

    def dequantized(self) -> torch.Tensor:
        """The fp32 (out, in) weight the integers stand for: the reference every kernel must match."""
        return dequantize_values(self.values(), self.scale, self.zero)

    # ------------------------------------------------------------------ kernels
    def _candidates(self, device: torch.device) -> list[tuple[str, torch.dtype]]:
        fast = default_compute_dtype(device)
        if device.type == "cuda":
            packed = [("int8_mm", fast)] if self.scheme == "int8" else [("int4_cuda", torch.bfloat16)]
            return packed + [("dequant", fast)]
        kernel = "int8_mm" if self.scheme == "int8" else "int4_cpu"
        return [(kernel, dt) for dt in dict.fromkeys([fast, torch.float32])] + [("dequant", torch.float32)]

    def _pack(self, kernel: str, dtype: torch.dtype) -> None:
        """Build the kernel's copies of the weight (non-persistent buffers)."""
        for name in ("k_weight", "k_scale"):
            self._buffers.pop(name, None)
        if kernel == "int8_mm":
            self.register_buffer("k_weight", self.qweight, persistent=False)  # the stored tensor itself
            self.register_buffer("k_scale", self.scale.to(dtype), persistent=False)
        elif kernel in ("int4_cpu", "int4_cuda"):
            s, z = self.scale.float(), self.zero.float()
            # tinygemm dequantizes (q - 8) * scale + zero_offset: our (q - zero) * scale has offset (8 - zero) * scale
            sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (in/G, out, 2)
            if kernel == "int4_cpu":
                w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.values().to(torch.int32), 1)
            else:
                q = self.values()
                tiles = next((t for t in (8, 4, 2) if self.in_features % (t * 16) == 0), None)
                if tiles is None or self.out_features % 8:
                    raise RuntimeError("shape not supported by the tinygemm kernel")
                w = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).contiguous(), tiles)
            self.register_buffer("k_weight", w, persistent=False)
            self.register_buffer("k_scale", sz, persistent=False)
        self.kernel, self.compute_dtype = kernel, dtype

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8_mm":
            return torch._weight_int8pack_mm(x, self.k_weight, self.k_scale)
        if self.kernel == "int4_cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.k_weight, self.group_size, self.k_scale)
        if self.kernel == "int4_cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.k_weight, self.group_size, self.k_scale)
        return F.linear(x, self.dequantized().to(x.dtype))

    def select_kernel(self, kernel: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> str:
        """Use ``kernel`` in ``dtype`` (default: the first candidate that runs here and matches the
        dequantized product on a random input). Returns the kernel's name."""
        device = self.qweight.device
        cands = self._candidates(device) if kernel is None else [(kernel, dtype or default_compute_dtype(device))]
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(3, self.in_features, generator=gen, device=device)
        ref, mag = None, None
        errors = []
        for k, dt in cands:
            try:
                self._pack(k, dt)
                if k != "dequant":
                    xd = x.to(dt)
                    if ref is None:
                        w = self.dequantized()
                        ref, mag = xd.float() @ w.t(), xd.float().abs() @ w.abs().t()
                    tol = 1e-4 if dt == torch.float32 else 3e-2  # of the sum of |x| |w| (bf16 output rounding)
                    err = (self._mm(xd).float() - ref).abs()
                    if not bool((err <= tol * mag + 1e-6).all()):
                        raise RuntimeError(f"wrong result (max error {float(err.max()):.3g})")
                self._kernel_device = device
                return k
            except (RuntimeError, NotImplementedError, AttributeError) as e:
                errors.append(f"{k}/{str(dt).removeprefix('torch.')}: {str(e).splitlines()[0][:120]}")
        raise RuntimeError(f"no quantized kernel runs on {device}: " + "; ".join(errors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_device != self.qweight.device:
            self.select_kernel()
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        y = self._mm(x2 if self.kernel == "dequant" else x2.contiguous()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not re-round the integers' scales (nor the kernel's): only a device move applies
        fixed = {n: b for n, b in self._buffers.items() if b is not None and n != "bias"}
        super()._apply(fn, recurse)
        for n, b in fixed.items():
            new = self._buffers[n]
            if new.dtype != b.dtype:
                self._buffers[n] = b.to(new.device)
        if self._kernel_device is not None and self.qweight.device != self._kernel_device:
            self._kernel_device = None  # the packed layouts are per device: repack at the next call
            for name in ("k_weight", "k_scale"):
                self._buffers.pop(name, None)
        return self

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{g}, "
                f"kernel={self.kernel}/{str(self.compute_dtype).removeprefix('torch.')}")


# ----------------------------------------------------------------------------- models

def quantizable_linears(model: GPT, include_head: bool = False) -> dict[str, nn.Linear]:
    """The Linears to quantize: every Linear in the blocks (q, k, v, o, gate, up, down) and,
    with ``include_head``, an untied LM head."""
    out = {f"blocks.{k}.{n}": m for k, b in model.blocks.items() for n, m in b.named_modules()
           if isinstance(m, (nn.Linear, QuantLinear)) and n.rsplit(".", 1)[-1] in BLOCK_LINEARS}
    if include_head:
        if model.cfg.tie_embeddings:
            raise UserError("--include-head: this model's LM head is tied to the token embedding (one tensor): it "
                            "stays float; leave out --include-head")
        out["lm_head"] = model.lm_head
    return out


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def check_group_size(model: GPT, scheme: str, group_size: int, names: Iterable[str]) -> None:
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r}: choose {' or '.join(SCHEMES)}")
    if scheme != "int4":
        return
    if group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {group_size} is not supported: choose one of {', '.join(map(str, GROUP_SIZES))}")
    for name in names:
        k = model.get_submodule(name).in_features
        if k % group_size:
            ok = [g for g in GROUP_SIZES if k % g == 0]
            raise UserError(f"--group-size {group_size} does not divide the input width {k} of {name}: choose "
                            + (f"--group-size {' or '.join(map(str, ok))}" if ok else "--scheme int8 (no int4 group "
                               "size divides it)"))


def quantized_gpt(cfg: ModelConfig, quant: dict, device="cpu") -> GPT:
    """A GPT whose listed Linears are empty :class:`QuantLinear` s, ready for ``load_state_dict``
    (float tensors uninitialised on ``device``; nothing float is allocated on ``device="meta"``)."""
    with torch.device("meta"):
        model = GPT(cfg)
        known = quantizable_linears(model, include_head=not cfg.tie_embeddings)
        unknown = sorted(set(quant["modules"]) - set(known))
        if unknown:
            raise CheckpointError(f"quantized modules {unknown[:3]} are not Linears this model has (a damaged "
                                  f"config.json?)")
        for name in quant["modules"]:
            lin = known[name]
            if quant["scheme"] == "int4" and lin.in_features % quant["group_size"]:
                raise CheckpointError(f"group_size {quant['group_size']} does not divide {name}'s width "
                                      f"{lin.in_features} (a damaged config.json?)")
            replace_module(model, name, QuantLinear(lin.in_features, lin.out_features, quant["scheme"],
                                                    quant.get("group_size") or 0, lin.bias is not None))
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    with torch.no_grad():
        model.reset_parameters()  # the non-persistent RoPE tables; the weights are loaded next
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model


def check_quantized_state(model: GPT, sd: dict[str, torch.Tensor], source: str) -> None:
    """The stored integers and scales have the dtypes and ranges the format says (shapes are
    checked by the loader): a float tensor silently cast to int8 would be garbage."""
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        for leaf in ("qweight", "scale", "zero"):
            want, got = getattr(m, leaf), sd.get(f"{name}.{leaf}")
            if want is not None and got is not None and got.dtype != want.dtype:
                raise CheckpointError(f"{source}: '{name}.{leaf}' is {got.dtype} but the {m.scheme} format stores "
                                      f"{want.dtype}: the file is damaged or not written by `scalelm quantize`")
        z = sd.get(f"{name}.zero")
        if z is not None and z.numel() and int(z.max()) > 15:
            raise CheckpointError(f"{source}: '{name}.zero' holds zero points above 15: the file is damaged")


def prepare_kernels(model: nn.Module) -> dict[str, int]:
    """Pick every QuantLinear's kernel now (not at the first call); a count per kernel/dtype."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.select_kernel()
            key = f"{m.kernel}/{str(m.compute_dtype).removeprefix('torch.')}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def kernel_summary(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            key = f"{m.kernel}/{str(m.compute_dtype).removeprefix('torch.')}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the stored weights a decode step reads: quantized values and scales, float matrices."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in (m.qweight, m.scale, m.zero, m.bias) if b is not None)
        elif isinstance(m, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total
