"""Where the hooks of :mod:`scalelm.interp.hooks` sit: one :class:`Session` per model installs the
forward hooks and pre-hooks that the active ``capture``/``patch`` contexts need, and removes them all.

Per block (``Block`` of a GPT or an encoder, ``DecoderBlock`` of a decoder), with the hook that serves it:

    resid_pre      Block pre-hook (its input)          resid_post             Block hook (its output)
    attn_out       what the attention adds to the stream: the hook of its post-norm (Gemma's sandwich
                   norms) if the block has one, else of Attention; likewise cross_out and mlp_out
    attn.z         o_proj pre-hook (its input, split per head)
    attn.head_out  o_proj hook: z_h @ W_O[:, h]^T, per head; with o_proj's bias they sum to o_proj's output
    resid_mid      read at the MLP's input (the pre-hook of mlp_norm, or of the MLP without one); patched
                   through the sublayer before the MLP, whose contribution becomes ``new_mid - stream_before``
                   (the residual add itself happens inside Block.forward)
    attn.pattern   recomputed after the attention ran: q from q_proj's output, k from k_proj's (or, under a
                   KV cache, every key the layer attended to, from the cache's ``update``), with the layer's
                   q/k norms, RoPE, score scale, soft-cap and mask (sliding windows included); softmax in fp32

A shared block (``n_shared_blocks``) runs several layers: the layer comes from the Block's ``layer``
argument at each call, so names follow layers, not modules. ``logits`` is the result of the model's
``head_logits`` (the LM head and its soft-cap) where it has one, else of ``lm_head``.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn

from ..model.gpt import apply_rope
from .names import HookError, HookPoint, is_encdec, site_of


def attention_pattern(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
                      scale: Optional[float] = None, cap: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) as the layer computes it, (B, H, T, S) in fp32. ``q``: (B, H, T, D);
    ``k``: (B, H_kv, S, D) (grouped-query heads share theirs); ``mask``: bool (True = may attend) or
    additive; ``causal`` with no mask: query i sees keys 0..i (the layer passes no mask only when
    S == T); ``scale``: default 1/sqrt(D); ``cap``: soft-capped scores (Gemma 2), cap * tanh(s / cap)."""
    q, k = q.float(), k.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    T, S = scores.shape[-2:]
    if mask is None and causal and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(dim=-1)


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear, of a decoding copy's PackedLinear, or a QuantLinear's dequantized."""
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor):
        return w
    wt = getattr(mod, "weight_t", None)
    if isinstance(wt, torch.Tensor):
        return wt.t()
    if hasattr(mod, "dequantized"):
        return mod.dequantized()
    raise HookError(f"head_out needs the output projection's weight, which this {type(mod).__name__} keeps packed "
                    f"(a bf16 decoding copy): capture attn.z and project it yourself, or use an fp32 model")


class RecordingCache:
    """Stands in for a KV cache during one forward: every call goes through to the real cache; the
    positions ``prepare`` returns and the keys/values/mask each layer's ``update`` returns are kept."""

    def __init__(self, cache, session: "Session", stream: str):
        self.__dict__.update(_cache=cache, _session=session, _stream=stream, kv={})

    def prepare(self, T: int):
        pos = self._cache.prepare(T)
        self._session.positions[self._stream] = pos
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        out = self._cache.update(layer, k, v)
        self.kv[layer] = out
        return out

    def __getattr__(self, name):
        return getattr(self.__dict__["_cache"], name)

    def __setattr__(self, name, value):
        setattr(self._cache, name, value)


class Session:
    """The hooks of one model: the union of what its open contexts ask for (patches first, then captures)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.entries: list = []  # ("capture", names, cache, detach) and ("patch", {name: [(fn, arity)]})
        self.handles: list = []
        self.shadowed: list[str] = []
        self.positions: dict[str, Optional[torch.Tensor]] = {"": None, "encoder": None, "decoder": None}
        self.layer = 0  # the layer running now (set by each block's pre-hook)
        self.base: Optional[torch.Tensor] = None  # the stream the sublayer before the MLP adds to
        self.stash: dict[int, dict] = {}  # per attention module: what its pattern is computed from
        self.patches: dict[str, list] = {}
        self.captures: list = []
        self.wanted: set[str] = set()

    @property
    def empty(self) -> bool:
        return not self.entries

    # ------------------------------------------------------------------ applying
    def patched(self, name: str, x: torch.Tensor, layer: Optional[int], stream: str) -> torch.Tensor:
        for fn, arity in self.patches.get(name, ()):
            y = fn(x, HookPoint(name, layer, self.positions[stream])) if arity == 2 else fn(x)
            if y is None:
                y = x
            elif not isinstance(y, torch.Tensor) or y.shape != x.shape:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise HookError(f"the patch of {name} returned {got}; it must return a tensor of shape "
                                f"{tuple(x.shape)}")
            x = y
        return x

    def record(self, name: str, x: torch.Tensor) -> None:
        for _, names, cache, detach in self.captures:
            if name in names:
                cache._add(name, x.detach() if detach else x)

    def apply(self, name: str, x: torch.Tensor, layer: Optional[int], stream: str) -> torch.Tensor:
        x = self.patched(name, x, layer, stream)
        self.record(name, x)
        return x

    # ------------------------------------------------------------------ installing
    def uninstall(self) -> None:
        for h in self.handles:
            h.remove()
        for name in self.shadowed:
            self.model.__dict__.pop(name, None)
        self.handles, self.shadowed = [], []
        self.stash.clear()
        self.base = None

    def install(self) -> None:
        """(Re)register the hooks the open contexts need, and only those."""
        self.uninstall()
        self.patches = {}
        for e in self.entries:
            if e[0] == "patch":
                for name, fns in e[1].items():
                    self.patches.setdefault(name, []).extend(fns)
        self.captures = [e for e in self.entries if e[0] == "capture"]
        self.wanted = set(self.patches).union(*(e[1] for e in self.captures))
        if not self.wanted:
            return
        sites = {site_of(n) for n in self.wanted}
        m = self.model
        if is_encdec(m):
            self._shadow("encode", "encoder", "src")
            self._shadow("decode", "decoder", "tgt")
        else:
            self._shadow("hidden_states", "", "idx")
        for key, block in m.blocks.items():
            prefix, stream, layers = self._where(key)
            here = {n[len(prefix) + 1:].split(".", 1)[1] for n in self.wanted
                    if n.startswith(prefix + ".") and int(n[len(prefix) + 1:].split(".", 1)[0]) in layers}
            if here:  # the sites wanted at this block's layers: only their hooks
                self._block(block, prefix, stream, here)
        out_stream = "decoder" if is_encdec(m) else ""
        if "final_norm" in sites and getattr(m, "norm_f", None) is not None:
            self._output_hook(m.norm_f, "final_norm", out_stream)
        if "encoder.final_norm" in sites:
            self._output_hook(m.enc_norm, "encoder.final_norm", "encoder")
        if "logits" in sites and getattr(m, "lm_head", None) is not None:
            if hasattr(type(m), "head_logits"):  # the head and its soft-cap (Gemma 2): the model's own logits
                self._shadow_output("head_logits", "logits", out_stream)
            else:
                self._output_hook(m.lm_head, "logits", out_stream)

    def _hook(self, mod: nn.Module, fn, pre: bool = False, kwargs: bool = False) -> None:
        if pre:
            self.handles.append(mod.register_forward_pre_hook(fn, with_kwargs=kwargs))
        else:
            self.handles.append(mod.register_forward_hook(fn))

    def _shadow(self, method: str, stream: str, ids_arg: str) -> None:
        """Shadow the model's entry method on the instance: it notes the positions and wraps the KV cache."""
        orig = getattr(type(self.model), method).__get__(self.model)
        sig = inspect.signature(orig)

        def entry(*args, **kwargs):
            b = sig.bind(*args, **kwargs)
            kv = b.arguments.get("kv_cache")
            if kv is not None:
                b.arguments["kv_cache"] = RecordingCache(kv, self, stream)
            else:
                ids, pos = b.arguments[ids_arg], b.arguments.get("pos_ids")
                self.positions[stream] = pos if pos is not None else torch.arange(ids.shape[1], device=ids.device)[None]
            return orig(*b.args, **b.kwargs)

        object.__setattr__(self.model, method, entry)
        self.shadowed.append(method)

    def _shadow_output(self, method: str, name: str, stream: str) -> None:
        """Shadow a method whose result is the activation ``name``."""
        orig = getattr(type(self.model), method).__get__(self.model)

        def wrapped(*args, **kwargs):
            return self.apply(name, orig(*args, **kwargs), None, stream)

        object.__setattr__(self.model, method, wrapped)
        self.shadowed.append(method)

    def _output_hook(self, mod: nn.Module, name: str, stream: str) -> None:
        def hook(_, args, out):
            if name in self.wanted:
                y = self.apply(name, out, None, stream)
                return y if y is not out else None
        self._hook(mod, hook)

    def _where(self, key: str) -> tuple[str, str, set]:
        """A block's name prefix, its stream and the layers it runs (several when blocks are shared)."""
        m = self.model
        if is_encdec(m):
            return ("encoder.blocks", "encoder", {int(key[1:])}) if key.startswith("e") else \
                ("decoder.blocks", "decoder", {int(key[1:])})
        return "blocks", "", {i for i, k in enumerate(m.layer_keys) if k == key}

    def _block(self, block: nn.Module, prefix: str, stream: str, sites: set) -> None:
        """The hooks of one block for ``sites`` (wanted at one of its layers; the names are checked per call)."""
        sig = inspect.signature(block.forward)
        decoder = hasattr(block, "cross")
        mid_patch = "resid_mid" in sites and any(n.endswith(".resid_mid") for n in self.patches)

        def pre(_, args, kwargs):
            b = sig.bind(*args, **kwargs)
            self.layer = b.arguments.get("layer", 0)
            x = self.base = b.arguments["x"]
            name = f"{prefix}.{self.layer}.resid_pre"
            if name in self.wanted:
                y = self.base = self.apply(name, x, self.layer, stream)
                if y is not x:
                    b.arguments["x"] = y
                    return b.args, b.kwargs

        def post(_, args, out):
            name = f"{prefix}.{self.layer}.resid_post"
            if name in self.wanted:
                y = self.apply(name, out, self.layer, stream)
                return y if y is not out else None

        self._hook(block, pre, pre=True, kwargs=True)  # always: it tells the other hooks the layer
        if "resid_post" in sites:
            self._hook(block, post)
        self._attention(block.attn, getattr(block, "attn_post_norm", None), prefix, stream, "attn", sites,
                        mid=mid_patch and not decoder)
        if decoder:
            if mid_patch:
                self._hook(block.cross_norm, lambda _, args: setattr(self, "base", args[0]), pre=True)
            self._attention(block.cross, getattr(block, "cross_post_norm", None), prefix, stream, "cross", sites,
                            mid=mid_patch)

        def mid_read(_, args):
            name = f"{prefix}.{self.layer}.resid_mid"
            if name in self.wanted:
                self.record(name, args[0])

        def mlp(_, args, out):
            name = f"{prefix}.{self.layer}.mlp_out"
            if name in self.wanted:
                y = self.apply(name, out, self.layer, stream)
                return y if y is not out else None

        mlp_norm, mlp_post = getattr(block, "mlp_norm", None), getattr(block, "mlp_post_norm", None)
        if "resid_mid" in sites:
            self._hook(mlp_norm if mlp_norm is not None else block.mlp, mid_read, pre=True)  # what the MLP reads
        if "mlp_out" in sites:
            self._hook(mlp_post if mlp_post is not None else block.mlp, mlp)

    def _attention(self, attn: nn.Module, post_norm: Optional[nn.Module], prefix: str, stream: str, part: str,
                   sites: set, mid: bool) -> None:
        """Hooks of one attention (``part``: ``attn`` or ``cross``), whose output goes through ``post_norm``
        (Gemma's sandwich norm) if there is one before the residual add; ``mid``: it is the sublayer before
        the MLP and resid_mid is patched (through this sublayer's contribution)."""
        out_site = "attn_out" if part == "attn" else "cross_out"
        st = self.stash.setdefault(id(attn), {})
        if f"{part}.pattern" in sites:
            sig = inspect.signature(attn.forward)

            def stash_args(_, args, kwargs):
                b = sig.bind(*args, **kwargs)
                b.apply_defaults()  # every argument, so that none is left over from an earlier call
                st.update(b.arguments)

            self._hook(attn, stash_args, pre=True, kwargs=True)
            self._hook(attn.q_proj, lambda _, args, out: st.__setitem__("q_out", out))
            if part == "attn":
                self._hook(attn.k_proj, lambda _, args, out: st.__setitem__("k_out", out))

        def pattern(_, args, out):
            pname = f"{prefix}.{self.layer}.{part}.pattern"
            if pname in self.wanted:
                self.record(pname, self._pattern(attn, part, st))

        def contribution(_, args, out):  # what this sublayer adds to the residual stream
            layer = self.layer
            y = out
            name = f"{prefix}.{layer}.{out_site}"
            if name in self.wanted:
                y = self.apply(name, y, layer, stream)
            mname = f"{prefix}.{layer}.resid_mid"
            if mid and mname in self.patches:  # the stream the MLP reads = base + this output
                y = self.patched(mname, self.base + y, layer, stream) - self.base
            return y if y is not out else None

        if f"{part}.pattern" in sites:
            self._hook(attn, pattern)
        if out_site in sites or mid:
            self._hook(post_norm if post_norm is not None else attn, contribution)
        hd = attn.head_dim

        def z(_, args):
            name = f"{prefix}.{self.layer}.{part}.z"
            if name in self.wanted:
                x = args[0]
                zz = x.reshape(*x.shape[:-1], -1, hd)
                y = self.apply(name, zz, self.layer, stream)
                if y is not zz:
                    return (y.reshape(x.shape), *args[1:])

        def head_out(mod, args, out):
            name = f"{prefix}.{self.layer}.{part}.head_out"
            if name not in self.wanted:
                return None
            x = args[0]
            zz = x.reshape(*x.shape[:-1], -1, hd)
            w = linear_weight(mod)
            per = torch.einsum("bthd,ehd->bthe", zz, w.reshape(w.shape[0], -1, hd).to(zz.dtype))
            y = self.apply(name, per, self.layer, stream)
            if y is per:
                return None
            bias = getattr(mod, "bias", None)
            return (y.sum(2) + (bias.to(y.dtype) if bias is not None else 0)).to(out.dtype)

        if f"{part}.z" in sites:
            self._hook(attn.o_proj, z, pre=True)
        if f"{part}.head_out" in sites:
            self._hook(attn.o_proj, head_out)

    def _pattern(self, attn: nn.Module, part: str, st: dict) -> torch.Tensor:
        hd = attn.head_dim
        q_out = st["q_out"]
        B, T = q_out.shape[:2]
        if part == "cross":  # keys/values of the encoded source, computed once; the source's padding mask
            q = q_out.view(B, T, -1, hd).transpose(1, 2)
            k, _ = st["kv"]
            return attention_pattern(q, k.to(q.dtype), st.get("src_mask"), causal=False)
        whole = getattr(attn, "qk_norm_all", False)  # OLMo 2: q/k norms over the whole projection, before the heads

        def heads(out: torch.Tensor, norm: Optional[nn.Module]) -> torch.Tensor:
            out = norm(out) if norm is not None and whole else out
            x = out.view(B, T, -1, hd).transpose(1, 2)
            return norm(x) if norm is not None and not whole else x

        rope, kv = st.get("rope"), st.get("kv_cache")
        q = heads(q_out, attn.q_norm)
        if rope is not None:
            q = apply_rope(q, *rope)
        scale, cap = getattr(attn, "scale", None), getattr(attn, "softcap", None)
        if kv is not None:
            rec = kv.kv.get(st.get("layer", 0)) if isinstance(kv, RecordingCache) else None
            if rec is None:
                raise HookError("attn.pattern under a KV cache: call the model itself (forward, hidden_states, "
                                "decode), not its blocks")
            k, _, mask = rec  # every key the layer attended to, and its mask (a sliding window's band included)
            return attention_pattern(q, k.to(q.dtype), mask, True, scale, cap)
        k = heads(st["k_out"], attn.k_norm)
        if rope is not None:
            k = apply_rope(k, *rope)
        mask, window = st.get("mask"), getattr(attn, "window", None)
        if window is not None and T > window:  # the band the layer builds without a cache
            from ..model.masks import window_mask

            pos = torch.arange(T, device=q.device)
            band = window_mask(pos, pos, window)
            mask = band if mask is None else mask & band
        return attention_pattern(q, k, mask, True, scale, cap)
