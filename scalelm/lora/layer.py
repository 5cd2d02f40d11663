"""LoRA layers on a plain ``GPT``: ``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T``.

:func:`apply_lora` swaps the targeted ``nn.Linear`` modules for :class:`LoRALinear`, which keeps
the same ``weight``/``bias`` parameters (so base names stay ``blocks.0.attn.q_proj.weight``) and
adds ``lora_A`` (r, in; Kaiming-uniform, as PEFT) and ``lora_B`` (out, r; zeros, so training
starts from the base model). Every other GPT parameter is frozen.
"""

from __future__ import annotations

import contextlib

import difflib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint.adapters import fold_lora
from ..config import ConfigError, LoRAConfig, ModelConfig

# target -> (sub-module of a Block, attribute)
TARGETS = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"), "o": ("attn", "o_proj"),
           "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}
GROUPS = {"attn": ["q", "k", "v", "o"], "mlp": ["gate", "up", "down"], "all": list(TARGETS)}
# names users bring from Hugging Face / PEFT configs, and what they are called here
ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down", "c_attn": "q,k,v", "c_fc": "up", "c_proj": "o or down", "attention": "attn",
           "self_attn": "attn", "ffn": "mlp", "query": "q", "key": "k", "value": "v"}


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (sharing the base's parameters) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not Linear's __init__: no new weight, the base's own is kept
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scale = alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(
            F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, dropout={self.dropout_p:g}"


def parse_targets(spec: str, model: ModelConfig) -> list[str]:
    """``"q,v"`` / ``"attn,up"`` / ``"all"`` -> target names in canonical order; unknown names
    and a gate on a GELU model are ConfigErrors saying what to write instead."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise ConfigError("lora.targets is empty: name the projections to adapt, e.g. --lora.targets=q,k,v,o "
                          "(or attn, mlp, all)")
    swiglu = model.gated_mlp  # SwiGLU or GeGLU
    chosen: set[str] = set()
    for it in items:
        if it in GROUPS:
            chosen.update(t for t in GROUPS[it] if swiglu or t != "gate")  # a GELU MLP has no gate
        elif it == "gate" and not swiglu:
            raise ConfigError(f"lora.targets names 'gate', but model.mlp={model.mlp} has no gate projection "
                              f"(only gated MLPs, SwiGLU and GeGLU, do): target up,down (or the group mlp) instead")
        elif it in TARGETS:
            chosen.add(it)
        else:
            if it in ALIASES:
                hint = f"; did you mean '{ALIASES[it]}'?"
            else:
                close = difflib.get_close_matches(it, [*TARGETS, *GROUPS], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"lora.targets: unknown target '{it}'{hint} (choose among "
                              f"{', '.join(TARGETS)} or the groups {', '.join(GROUPS)})")
    return [t for t in TARGETS if t in chosen]


def check_lora_config(lora: LoRAConfig, model: ModelConfig) -> list[str]:
    """Validate the lora section; returns the parsed targets."""
    if not isinstance(lora.r, int) or lora.r <= 0:
        raise ConfigError(f"lora.r={lora.r} must be a positive integer rank (e.g. --lora.r=8); 0 turns LoRA off")
    if not lora.alpha > 0:
        raise ConfigError(f"lora.alpha={lora.alpha} must be positive (the update is scaled by alpha / r; "
                          f"e.g. --lora.alpha=16)")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout={lora.dropout} must be in [0, 1)")
    return parse_targets(lora.targets, model)


def apply_lora(gpt: nn.Module, lora: LoRAConfig) -> list[str]:
    """Freeze every parameter of ``gpt`` and add adapters to the targeted projections of every
    block; returns the adapted modules' names (``blocks.0.attn.q_proj``, ...). Call it on the
    plain GPT, before parallelism, compile or activation checkpointing are applied."""
    targets = check_lora_config(lora, gpt.cfg)
    if any(isinstance(m, LoRALinear) for m in gpt.modules()):
        raise ConfigError("the model already has LoRA adapters: apply_lora once per model")
    sites = []  # checked before anything changes, so a refused model is left as it was
    for key, block in gpt.blocks.items():
        for t in targets:
            sub, attr = TARGETS[t]
            parent = getattr(block, sub)
            lin = getattr(parent, attr)
            if type(lin) is not nn.Linear:  # e.g. a quantized base: its weights are not plain tensors
                raise ConfigError(f"blocks.{key}.{sub}.{attr} is a {type(lin).__name__}, not a float nn.Linear: "
                                  f"LoRA trains on a float base model (not a quantized one)")
            sites.append((f"blocks.{key}.{sub}.{attr}", parent, attr, lin))
    for p in gpt.parameters():
        p.requires_grad_(False)
    names = []
    for name, parent, attr, lin in sites:
        setattr(parent, attr, LoRALinear(lin, lora.r, float(lora.alpha), float(lora.dropout)))
        names.append(name)
    return names


@contextlib.contextmanager
def adapters_off(module: nn.Module):
    """Inside: every adapter of ``module`` adds nothing, so the model computes its base (a LoRA
    preference run's reference is exactly this)."""
    layers = list(lora_layers(module).values())
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield module
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}


def targets_of(gpt: nn.Module) -> str:
    """The canonical targets string of a model's adapters (``"q,k,v,o"``)."""
    present = {(n.split(".")[-2], n.split(".")[-1]) for n in lora_layers(gpt)}
    return ",".join(t for t, where in TARGETS.items() if where in present)


@torch.no_grad()
def merge_lora(gpt: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (``W += alpha / r * B @ A``) and put plain ``nn.Linear``
    modules back: ``gpt`` becomes an ordinary GPT (in place; returned for chaining)."""
    for name, layer in lora_layers(gpt).items():
        parent_name, _, attr = name.rpartition(".")
        parent = gpt.get_submodule(parent_name)
        fold_lora(layer.weight, layer.lora_A, layer.lora_B, layer.scale)  # the loader's merge, too
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = layer.weight
        plain.bias = layer.bias
        setattr(parent, attr, plain)
    return gpt
