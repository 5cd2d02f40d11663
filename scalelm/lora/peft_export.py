"""``scalelm convert LORA_RUN --to-peft OUT``: a LoRA run's adapters in PEFT's format.

``peft.PeftModel.from_pretrained(hf_base, OUT)``, with ``hf_base`` the Hugging Face export of
the run's base (``scalelm convert BASE --to-hf``), then computes what scalelm's merged model does.
Llama's projections map one-to-one. GPT-2 fuses q, k and v in one ``Conv1D`` (``c_attn``,
output ``[q; k; v]``): adapters of rank r on some of them become ONE adapter of rank
``r * len(those)`` on ``c_attn``, with the A matrices stacked and the B matrices placed
block-diagonally in their rows, so ``B @ A`` is exactly the per-projection updates side by
side; ``rank_pattern``/``alpha_pattern`` keep its scale at alpha / r. GPT-2's ``Conv1D`` stores
weights transposed, hence ``fan_in_fan_out``; PEFT's A/B are stored (r, in) / (out, r) either way.
Phi-3 (a base imported from Phi-3, exported back to it) fuses the same way: q/k/v in ``qkv_proj``
(rows ``[q; k; v]``, k and v ``n_kv_head * head_dim`` tall) and gate/up in ``gate_up_proj``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import staged_dir
from ..checkpoint.adapters import read_adapters
from ..checkpoint.model_dir import write_tensors
from ..checkpoint.names import PEFT_CONFIG, PEFT_WEIGHTS
from ..errors import CheckpointError
from ..model.hf import ConversionError, hf_family, recorded_hf_type
from ..model.io import read_model_config
from ..runs import resolve_checkpoint

_LLAMA = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
          "attn.o_proj": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
          "mlp.down": "mlp.down_proj"}
_GPT2 = {"attn.o_proj": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}  # q, k, v: c_attn


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file()


def peft_adapters(cfg, entry: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(LoraConfig keyword arguments, adapter_model tensors)`` for a LoRA run of model ``cfg``,
    for the class ``convert BASE --to-hf`` writes (the base's own, for an imported base)."""
    base = entry.get("base")
    prefer = recorded_hf_type(base) if base and Path(base).is_dir() else None
    family = hf_family(cfg, prefer)  # a ConversionError for what Hugging Face cannot represent
    if entry.get("prefix"):
        raise ConversionError("--to-peft exports a language model's adapters; this run adapts a model inside a "
                              "task (its head trains too): fold it into a model directory with `scalelm merge`")
    r, alpha = int(entry["r"]), float(entry["alpha"])
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        mod, _, leaf = k.rpartition(".")
        layers.setdefault(mod, {})[leaf] = t
    out, targets, rank_pattern, alpha_pattern = {}, set(), {}, {}
    root = "base_model.model.transformer.h" if family == "gpt2" else "base_model.model.model.layers"

    def put(hf_mod: str, a: torch.Tensor, b: torch.Tensor) -> None:
        out[f"{hf_mod}.lora_A.weight"], out[f"{hf_mod}.lora_B.weight"] = a.contiguous(), b.contiguous()

    def fuse(i: int, names: dict, hf_mod: str, parts: list[tuple[str, int]]) -> None:
        """One adapter on a fused projection whose output rows are ``parts`` (ours, rows) in order:
        A stacked, B block-diagonal, rank and alpha scaled by the number of adapted parts."""
        have = [(j, ours) for j, (ours, _) in enumerate(parts) if ours in names]
        if not have:
            return
        offsets = [sum(n for _, n in parts[:j]) for j in range(len(parts))]
        a = torch.cat([names[ours]["lora_A"] for _, ours in have])
        b = a.new_zeros(sum(n for _, n in parts), r * len(have))
        for c, (j, ours) in enumerate(have):
            b[offsets[j]:offsets[j] + parts[j][1], c * r:(c + 1) * r] = names[ours]["lora_B"]
        put(f"{root}.{i}.{hf_mod}", a, b)
        leaf = hf_mod.split(".")[-1]
        targets.add(leaf)
        if len(have) > 1:  # its rank is r * len(have); the same alpha / r scale
            rank_pattern[leaf], alpha_pattern[leaf] = r * len(have), alpha * len(have)

    for i in range(cfg.n_layer):
        block = f"blocks.{i}."
        names = {m[len(block):]: ab for m, ab in layers.items() if m.startswith(block)}
        if family == "phi3":
            q, kv, f = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim
            fuse(i, names, "self_attn.qkv_proj", [("attn.q_proj", q), ("attn.k_proj", kv), ("attn.v_proj", kv)])
            fuse(i, names, "mlp.gate_up_proj", [("mlp.gate", f), ("mlp.up", f)])
            for ours in ("attn.o_proj", "mlp.down"):
                if ours in names:
                    put(f"{root}.{i}.{_LLAMA[ours]}", names[ours]["lora_A"], names[ours]["lora_B"])
                    targets.add(_LLAMA[ours].split(".")[-1])
            continue
        if family != "gpt2":  # Llama, Qwen2, Qwen3 and Mistral name their projections alike
            for ours, theirs in _LLAMA.items():
                if ours in names:
                    put(f"{root}.{i}.{theirs}", names[ours]["lora_A"], names[ours]["lora_B"])
                    targets.add(theirs.split(".")[-1])
            continue
        for ours, theirs in _GPT2.items():
            if ours in names:
                put(f"{root}.{i}.{theirs}", names[ours]["lora_A"], names[ours]["lora_B"])
                targets.add(theirs)
        qkv = [x for x in "qkv" if f"attn.{x}_proj" in names]
        if qkv:
            d = cfg.n_embd
            a = torch.cat([names[f"attn.{x}_proj"]["lora_A"] for x in qkv])
            b = a.new_zeros(3 * d, r * len(qkv))
            for j, x in enumerate(qkv):  # rows of c_attn's output: [q; k; v]
                off = "qkv".index(x) * d
                b[off:off + d, j * r:(j + 1) * r] = names[f"attn.{x}_proj"]["lora_B"]
            put(f"{root}.{i}.attn.c_attn", a, b)
            targets.add("c_attn")
            if len(qkv) > 1:  # its rank is r * len(qkv); the same alpha / r scale
                rank_pattern["c_attn"], alpha_pattern["c_attn"] = r * len(qkv), alpha * len(qkv)
    if not out:
        raise CheckpointError("the run has no adapters on the GPT's projections: nothing to export")
    kw = dict(r=r, lora_alpha=alpha, lora_dropout=float(entry.get("dropout", 0.0)), target_modules=sorted(targets),
              fan_in_fan_out=family == "gpt2", bias="none", task_type="CAUSAL_LM", rank_pattern=rank_pattern,
              alpha_pattern=alpha_pattern)
    return kw, out


def export_peft_dir(ckpt: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """LoRA checkpoint or RUN_DIR -> a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``), written atomically."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConversionError("exporting to PEFT needs peft: pip install 'scalelm[hf]'") from None

    src = resolve_checkpoint(ckpt)
    entry, tensors = read_adapters(src)
    kw, sd = peft_adapters(read_model_config(src), entry, tensors)
    out = Path(out_dir)
    with staged_dir(out, manifest=False) as d:  # PEFT's format: its two files, nothing of ours
        LoraConfig(**kw).save_pretrained(str(d))
        write_tensors(d / PEFT_WEIGHTS, {k: v.to(dtype) for k, v in sd.items()})
    return out
