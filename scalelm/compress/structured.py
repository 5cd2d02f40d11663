"""Structured pruning to a smaller dense ``GPT`` (the Minitron recipe's importance estimates).

Importance comes from one forward pass over calibration windows of the original model:

- attention heads: the L2 norm of each head's output (the input of ``o_proj``) over all tokens;
  with grouped-query attention a kv head and the query heads that read it are one unit (their
  norms are combined), so kv heads are removed together with their query groups;
- MLP neurons: the L2 norm of each neuron's activation (the input of ``down``);
- embedding channels: the L2 norm of each channel of every norm's output (before each
  attention and MLP, and the final norm), summed;
- layers: the cosine distance between a block's input and output, averaged over tokens
  (ShortGPT's "block influence"): the layers that change the residual stream least go.

The units kept are the most important ones, in their original order, the same number in every
layer. Heads keep their width: a model whose new ``n_embd / n_head`` differs from the head width
records it as ``model.head_size``. Removing embedding channels also slices every norm; the norms
then average over fewer channels, which is compensated exactly for RMSNorm (weights times
``sqrt(d / d')``, ``norm_eps`` times ``d / d'``: the result equals the original model with those
channels zeroed) and approximately for LayerNorm (whose mean also changes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError
from ..model.gpt import GPT
from .calib import check_prunable


@dataclass
class Importance:
    groups: torch.Tensor  # (n_layer, n_kv_head): a kv head with its query heads
    neurons: torch.Tensor  # (n_layer, ffn_dim)
    channels: torch.Tensor  # (n_embd,)
    layers: torch.Tensor  # (n_layer,): block influence, 1 - mean cos(input, output)


def importance(model: GPT, windows: torch.Tensor, batch_size: int = 8) -> Importance:
    """Activation-based importance of every prunable unit, from one pass over ``windows``."""
    check_prunable(model)
    cfg = model.cfg
    L, dev = cfg.n_layer, next(model.parameters()).device
    heads = torch.zeros(L, cfg.n_head, device=dev, dtype=torch.float64)
    neurons = torch.zeros(L, cfg.ffn_dim, device=dev, dtype=torch.float64)
    channels = torch.zeros(cfg.n_embd, device=dev, dtype=torch.float64)
    cos_sum = torch.zeros(L, device=dev, dtype=torch.float64)
    tokens = [0]

    def sq(x):  # sum of squares over every dimension but the last
        return x.detach().double().square().reshape(-1, x.shape[-1]).sum(0)

    # (hooks return None: a value returned would replace the module's input or output)
    def head_hook(m, args, i):
        heads[i] += sq(args[0]).reshape(cfg.n_head, -1).sum(1)

    def neuron_hook(m, args, i):
        neurons[i] += sq(args[0])

    def block_hook(m, args, out, i):
        x, y = args[0].detach().double(), out.detach().double()
        cos_sum[i] += torch.nn.functional.cosine_similarity(x, y, dim=-1).sum()
        if i == 0:
            tokens[0] += x.shape[0] * x.shape[1]

    def channel_hook(m, args, out):
        channels.add_(sq(out))

    handles = [model.norm_f.register_forward_hook(channel_hook)]
    for i, key in enumerate(model.layer_keys):
        b = model.blocks[key]
        handles += [b.attn.o_proj.register_forward_pre_hook(functools.partial(head_hook, i=i)),
                    b.mlp.down.register_forward_pre_hook(functools.partial(neuron_hook, i=i)),
                    b.register_forward_hook(functools.partial(block_hook, i=i))]
        handles += [n.register_forward_hook(channel_hook) for n in block_norms(b).values()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(windows), batch_size):
                model(windows[s:s + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    g = cfg.n_head // cfg.kv_heads
    return Importance(groups=heads.reshape(L, cfg.kv_heads, g).sum(-1).sqrt(), neurons=neurons.sqrt(),
                      channels=channels.sqrt(), layers=1 - cos_sum / max(1, tokens[0]))


def block_norms(block) -> dict:
    """A block's norms over the residual stream's channels, by name: before attention and MLP and,
    with norm_placement sandwich or post (Gemma, OLMo 2), on their outputs."""
    names = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm")
    return {n: getattr(block, n) for n in names if getattr(block, n, None) is not None}


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending index order."""
    return torch.sort(torch.topk(score, k).indices).values


@dataclass
class Plan:
    """What stays: layer indices, per kept layer the kv groups and neurons, and the channels."""
    layers: list[int]
    groups: list[torch.Tensor]
    neurons: list[torch.Tensor]
    channels: torch.Tensor

    def describe(self) -> dict:
        return {"layers": self.layers, "kv_heads": [g.tolist() for g in self.groups],
                "neurons_kept": [len(n) for n in self.neurons], "channels_kept": len(self.channels)}


def make_plan(model: GPT, imp: Importance, heads: Optional[int] = None, ffn_dim: Optional[int] = None,
              n_layer: Optional[int] = None, embd: Optional[int] = None) -> Plan:
    cfg = model.cfg
    heads = cfg.n_head if heads is None else heads
    ffn_dim = cfg.ffn_dim if ffn_dim is None else ffn_dim
    n_layer = cfg.n_layer if n_layer is None else n_layer
    embd = cfg.n_embd if embd is None else embd
    g = cfg.n_head // cfg.kv_heads
    for name, v, top in (("--heads", heads, cfg.n_head), ("--ffn-dim", ffn_dim, cfg.ffn_dim),
                         ("--n-layer", n_layer, cfg.n_layer), ("--embd", embd, cfg.n_embd)):
        if not 1 <= v <= top:
            raise UserError(f"{name} {v} must be between 1 and the model's {top}")
    if heads % g:
        raise UserError(f"--heads {heads}: with grouped-query attention ({cfg.n_head} query heads share "
                        f"{cfg.kv_heads} kv heads, {g} each) a kv head goes with its {g} query heads, so --heads "
                        f"must be a multiple of {g} (e.g. {max(g, heads - heads % g)})")
    layers = _top(imp.layers, n_layer).tolist()
    return Plan(layers=layers, groups=[_top(imp.groups[i], heads // g) for i in layers],
                neurons=[_top(imp.neurons[i], ffn_dim) for i in layers], channels=_top(imp.channels, embd))


def pruned_config(cfg, plan: Plan):
    """The smaller model's config: derived sizes stay derived where they still hold."""
    g = cfg.n_head // cfg.kv_heads
    kv, embd, ffn = len(plan.groups[0]), len(plan.channels), len(plan.neurons[0])
    heads, hd = kv * g, cfg.head_dim
    derived_ffn = dataclasses.replace(cfg, n_embd=embd, intermediate_size=None).ffn_dim
    new = dataclasses.replace(
        cfg, n_layer=len(plan.layers), n_head=heads, n_kv_head=None if cfg.n_kv_head is None else kv, n_embd=embd,
        intermediate_size=None if cfg.intermediate_size is None and ffn == derived_ffn else ffn,
        head_size=None if embd == heads * hd else hd, norm_eps=cfg.norm_eps * cfg.n_embd / embd)
    new.validate()
    return new


def apply_plan(model: GPT, plan: Plan) -> GPT:
    """A new, smaller ``GPT`` holding the kept units of ``model`` (which is left unchanged)."""
    cfg = model.cfg
    new_cfg = pruned_config(cfg, plan)
    kinds = [cfg.layer_window(i) for i in plan.layers]
    if kinds != [new_cfg.layer_window(j) for j in range(len(plan.layers))]:
        raise UserError(f"removing layers {sorted(set(range(cfg.n_layer)) - set(plan.layers))} would change which "
                        f"layers attend within the sliding window (model.sliding_window_pattern="
                        f"{cfg.sliding_window_pattern}): keep --n-layer at {cfg.n_layer}")
    g, hd = cfg.n_head // cfg.kv_heads, cfg.head_dim
    c = plan.channels.to(model.tok_emb.weight.device)
    norm_scale = math.sqrt(cfg.n_embd / len(c))
    with torch.device("meta"):  # no initialisation: every weight is copied below
        small = GPT(new_cfg).to(model.tok_emb.weight.dtype)
    small.to_empty(device=c.device)
    if new_cfg.tie_embeddings:  # to_empty gives each module its own tensor
        small.lm_head.weight = small.tok_emb.weight
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {"tok_emb.weight": sd["tok_emb.weight"][:, c]}
    if "pos_emb.weight" in sd:
        out["pos_emb.weight"] = sd["pos_emb.weight"][:, c]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:, c]

    def norm(src: str, dst: str) -> None:
        w = sd[f"{src}.weight"][c] * norm_scale
        if cfg.norm_unit_offset:  # a Gemma norm scales by 1 + w: (1 + w) * s = 1 + (w * s + s - 1)
            w = w + (norm_scale - 1)
        out[f"{dst}.weight"] = w
        if f"{src}.bias" in sd:
            out[f"{dst}.bias"] = sd[f"{src}.bias"][c]

    def linear(src: str, dst: str, rows=None, cols=None) -> None:
        w = sd[f"{src}.weight"]
        w = w if rows is None else w[rows]
        out[f"{dst}.weight"] = w if cols is None else w[:, cols]
        if f"{src}.bias" in sd:
            b = sd[f"{src}.bias"]
            out[f"{dst}.bias"] = b if rows is None else b[rows]

    norm("norm_f", "norm_f")
    for j, (i, groups, neurons) in enumerate(zip(plan.layers, plan.groups, plan.neurons)):
        s, d = f"blocks.{model.layer_keys[i]}", f"blocks.{j}"
        groups, neurons = groups.to(c.device), neurons.to(c.device)
        q_heads = (groups[:, None] * g + torch.arange(g, device=c.device)[None]).flatten()
        q_rows = (q_heads[:, None] * hd + torch.arange(hd, device=c.device)[None]).flatten()
        kv_rows = (groups[:, None] * hd + torch.arange(hd, device=c.device)[None]).flatten()
        for name in block_norms(model.blocks[model.layer_keys[i]]):
            norm(f"{s}.{name}", f"{d}.{name}")
        linear(f"{s}.attn.q_proj", f"{d}.attn.q_proj", q_rows, c)
        linear(f"{s}.attn.k_proj", f"{d}.attn.k_proj", kv_rows, c)
        linear(f"{s}.attn.v_proj", f"{d}.attn.v_proj", kv_rows, c)
        # qk_norm: Qwen3's one head-width weight is shared by the heads kept; OLMo 2's spans the whole
        # projection (qk_norm_scope=all), of which the kept heads' rows stay
        for x, rows in (("q_norm", q_rows), ("k_norm", kv_rows)):
            if f"{s}.attn.{x}.weight" in sd:
                w = sd[f"{s}.attn.{x}.weight"]
                out[f"{d}.attn.{x}.weight"] = w[rows] if cfg.qk_norm_scope == "all" else w
        linear(f"{s}.attn.o_proj", f"{d}.attn.o_proj", c, q_rows)
        for name in ("up", "gate"):
            if f"{s}.mlp.{name}.weight" in sd:
                linear(f"{s}.mlp.{name}", f"{d}.mlp.{name}", neurons, c)
        linear(f"{s}.mlp.down", f"{d}.mlp.down", c, neurons)
    with torch.no_grad():
        for k, v in out.items():
            small.get_parameter(k).copy_(v)
        if new_cfg.pos_embedding == "rope":  # the head width is unchanged, so are the tables
            small.rope_cos.copy_(model.rope_cos)
            small.rope_sin.copy_(model.rope_sin)
            if new_cfg.rope_local_theta is not None:  # Gemma 3's local layers' tables
                small.rope_local_cos.copy_(model.rope_local_cos)
                small.rope_local_sin.copy_(model.rope_local_sin)
    return small


def prune_structured(model: GPT, windows: torch.Tensor, heads: Optional[int] = None, ffn_dim: Optional[int] = None,
                     n_layer: Optional[int] = None, embd: Optional[int] = None,
                     batch_size: int = 8) -> tuple[GPT, Plan]:
    if heads is None and ffn_dim is None and n_layer is None and embd is None:
        raise UserError("--method structured needs at least one target: --heads H, --ffn-dim F, --n-layer L "
                        "or --embd E")
    imp = importance(model, windows, batch_size)
    plan = make_plan(model, imp, heads, ffn_dim, n_layer, embd)
    return apply_plan(model, plan), plan

