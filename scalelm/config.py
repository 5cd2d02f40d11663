"""Typed configuration: dataclasses, presets, TOML files and dotted CLI overrides.

Resolution order (later wins): dataclass defaults < preset < TOML file < CLI overrides.
CLI overrides map one-to-one onto fields: ``--optim.lr=1e-3 --train.max_steps=2000``.
Type parsing of overrides is delegated to ``tyro``; unknown keys are caught first so the
error can name the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import tomllib

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem the user can fix (bad key, bad value, bad file)."""


# max_steps of a run the clock governs (train.max_minutes set, max_steps not): the Trainer then
# scales warmup and the evaluation cadence to the step count the budget is projected to reach
CLOCK_STEPS = 10**9


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # maximum context length
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None -> n_head (MHA); 1 -> MQA; otherwise GQA
    n_embd: int = 768
    intermediate_size: Optional[int] = None  # None -> 4*n_embd (gelu) or Llama's 8/3 rule (swiglu)
    pos_embedding: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu", "geglu"] = "gelu"  # geglu: SwiGLU with a tanh-GELU gate (Gemma)
    # the GELU of mlp=gelu and of geglu's gate: "tanh" (GPT-2's gelu_new, Gemma) or "erf", the exact GELU
    # (BERT's and ModernBERT's "gelu"); they differ by up to ~1e-3, too much for logits parity
    gelu: Literal["tanh", "erf"] = "tanh"
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    n_shared_blocks: Optional[int] = None  # ALBERT-style: n_layer layers built from K distinct blocks
    init_std: float = 0.02
    # "encoder-decoder": the seq2seq Transformer of "Attention Is All You Need" (scalelm/model/encdec.py);
    # "encoder": a bidirectional encoder with a masked-LM head, BERT / ModernBERT (scalelm/model/encoder.py)
    arch: Literal["gpt", "encoder-decoder", "encoder"] = "gpt"
    # encoder only: token-type (segment) embeddings added to the input (BERT: 2); 0 = none (ModernBERT)
    type_vocab_size: int = 0
    n_encoder_layer: Optional[int] = None  # encoder-decoder only; None -> n_layer
    n_decoder_layer: Optional[int] = None  # encoder-decoder only; None -> n_layer
    head_size: Optional[int] = None  # width of one head; None -> n_embd / n_head (set by structured pruning)
    # RoPE frequency scaling: "none" (plain RoPE), "linear" (position interpolation) or "llama3"
    # (Llama 3.1/3.2). The fields are HF's rope_parameters: factor, low/high_freq_factor and the
    # pre-training context original_max_position_embeddings (scalelm/model/gpt.py scale_inv_freq)
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_block_size: int = 8192
    qkv_bias: bool = False  # biases on q/k/v only, with bias=false (Qwen2/2.5)
    qk_norm: bool = False  # an RMSNorm over each head of q and of k, before RoPE (Qwen3)
    # which q/k the qk_norm normalises: "head" = each head (weights head_dim wide, shared by the heads:
    # Qwen3, Gemma 3) or "all" = the whole q and k projections before the split into heads (weights
    # n_head * head_dim and n_kv_head * head_dim wide: OLMo 2)
    qk_norm_scope: Literal["head", "all"] = "head"
    # where a block's norms sit: "pre" x + f(norm(x)) (GPT-2, Llama); "sandwich" x + norm'(f(norm(x)))
    # (Gemma 2/3); "post" x + norm'(f(x)) (OLMo 2). norm' is the block's attn_post_norm / mlp_post_norm.
    # "post_add" norm'(x + f(x)), the original Transformer's and BERT's post-LN (arch=encoder only)
    norm_placement: Literal["pre", "sandwich", "post", "post_add"] = "pre"
    # Gemma: every RMSNorm scales by (1 + weight) and its weights start at 0. A switch rather than the 1
    # folded into the weights on import: in bf16, 1 + w would lose w's low bits, and an export would not
    # give back the imported bits
    norm_unit_offset: bool = False
    # token embeddings times this, rounded to the weights' dtype as HF does (Gemma: sqrt(n_embd)); a
    # number, not a flag, so that a model pruned to fewer channels keeps its trained scale
    embed_scale: float = 1.0
    # attention scores scale by attn_scalar ** -0.5; None: head_dim (Gemma's query_pre_attn_scalar)
    attn_scalar: Optional[float] = None
    attn_softcap: Optional[float] = None  # attention scores -> c * tanh(scores / c), before the mask (Gemma 2)
    logit_softcap: Optional[float] = None  # output logits -> c * tanh(logits / c) (Gemma 2 and 3)
    # the RoPE base of the local (sliding-window) layers, which then take plain RoPE while rope_theta and
    # rope_scaling are the global layers' (Gemma 3's rope_local_base_freq); None: one RoPE for every layer
    rope_local_theta: Optional[float] = None
    # sliding-window attention (Mistral, Phi-3; Gemma's local layers): a query attends to itself and
    # the sliding_window - 1 tokens before it (HF's convention); None = full attention everywhere.
    # With a window, layer i is local unless sliding_window_pattern > 1 and (i + 1) % pattern == 0
    # (Gemma 2: 2, Gemma 3: 6; Mistral: 1, every layer local): see layer_window. An encoder's window is
    # bidirectional, ModernBERT's local_attention: a query sees the keys at most sliding_window // 2
    # away on either side; its layer i is global when sliding_window_pattern > 1 and i % pattern == 0
    sliding_window: Optional[int] = None
    sliding_window_pattern: int = 1

    def layer_window(self, layer: int) -> Optional[int]:
        """The attention window of layer ``layer`` (0-based): ``sliding_window`` on a local layer,
        None (full attention) on a global one or without a window."""
        if self.sliding_window is None:
            return None
        p = self.sliding_window_pattern
        if self.arch == "encoder":  # ModernBERT: layer 0 global, then every p-th (global_attn_every_n_layers)
            return None if p > 1 and layer % p == 0 else self.sliding_window
        return None if p > 1 and (layer + 1) % p == 0 else self.sliding_window

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def gated_mlp(self) -> bool:
        """A gate projection beside up and down (SwiGLU, GeGLU), not GELU's up and down alone."""
        return self.mlp in ("swiglu", "geglu")

    @property
    def ffn_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.gated_mlp:  # Llama: 2/3 of 4d, rounded up to a multiple of 256
            return 256 * ((int(8 * self.n_embd / 3) + 255) // 256)
        return 4 * self.n_embd

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"model: {msg}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_size is not None and self.head_size <= 0:
            bad(f"head_size must be positive, got {self.head_size}")
        if self.head_size is None and self.n_embd % self.n_head:
            bad(f"n_head={self.n_head} does not divide n_embd={self.n_embd}; "
                f"choose n_head among {[h for h in range(1, 65) if self.n_embd % h == 0]}")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            bad(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            bad(f"RoPE needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("n_encoder_layer", "n_decoder_layer"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.arch != "gpt" and self.n_shared_blocks is not None:
            bad("n_shared_blocks is for arch=gpt")
        if self.n_shared_blocks is not None and (
            self.n_shared_blocks <= 0 or self.n_layer % self.n_shared_blocks
        ):
            bad(f"n_shared_blocks={self.n_shared_blocks} must divide n_layer={self.n_layer}")
        if self.rope_scaling != "none":
            if self.pos_embedding != "rope" or self.arch != "gpt":
                bad(f"rope_scaling={self.rope_scaling!r} needs pos_embedding=rope and arch=gpt")
            if not self.rope_factor > 0:
                bad(f"rope_factor must be positive, got {self.rope_factor}")
        if self.rope_scaling == "llama3":
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                bad(f"rope_low_freq_factor={self.rope_low_freq_factor} and rope_high_freq_factor="
                    f"{self.rope_high_freq_factor} must satisfy 0 < low < high (Llama 3: 1 and 4)")
            if self.rope_original_block_size <= 0:
                bad(f"rope_original_block_size must be positive, got {self.rope_original_block_size}")
        if self.qkv_bias and self.bias:
            bad("qkv_bias=true is for bias=false (biases on q/k/v only); bias=true already has them")
        if (self.qkv_bias or self.qk_norm) and self.arch != "gpt":
            bad("qkv_bias and qk_norm are for arch=gpt")
        if self.qk_norm and self.norm != "rmsnorm":
            bad("qk_norm=true is an RMSNorm per head (Qwen3): it needs norm=rmsnorm")
        if self.qk_norm_scope != "head" and not self.qk_norm:
            bad(f"qk_norm_scope={self.qk_norm_scope!r} says where the q/k norm goes: it needs qk_norm=true")
        if self.norm_unit_offset and self.norm != "rmsnorm":
            bad("norm_unit_offset=true is Gemma's RMSNorm (scale 1 + weight): it needs norm=rmsnorm")
        if self.type_vocab_size < 0:
            bad(f"type_vocab_size must be 0 (no token types) or positive, got {self.type_vocab_size}")
        if self.arch != "encoder" and self.type_vocab_size:
            bad("type_vocab_size (token-type embeddings) is for arch=encoder")
        if self.arch == "encoder" and self.norm_placement not in ("pre", "post_add"):
            bad(f"norm_placement={self.norm_placement!r} is for arch=gpt; an encoder takes pre (pre-norm, "
                f"ModernBERT) or post_add (post-LN, BERT)")
        if self.arch != "encoder" and self.norm_placement == "post_add":
            bad("norm_placement='post_add' (BERT's post-LN) is for arch=encoder")
        if self.arch != "gpt":
            # an encoder has norm_placement (checked above) and ModernBERT's local-layer RoPE base; every
            # other decoder-only switch is refused
            only = _GPT_ONLY if self.arch != "encoder" else tuple(
                n for n in _GPT_ONLY if n not in ("norm_placement", "rope_local_theta"))
            changed = [f.name for f in dataclasses.fields(self) if f.name in only
                       and getattr(self, f.name) != f.default]
            if changed:
                bad(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} for arch=gpt")
        if not self.embed_scale > 0:
            bad(f"embed_scale must be positive, got {self.embed_scale}")
        for name in ("attn_scalar", "attn_softcap", "logit_softcap", "rope_local_theta"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                bad(f"{name} must be positive (or unset), got {v}")
        if self.rope_local_theta is not None:
            if self.pos_embedding != "rope":
                bad("rope_local_theta needs pos_embedding=rope")
            if self.sliding_window is None:
                bad("rope_local_theta is the RoPE base of the sliding-window layers: it needs sliding_window")
        if self.sliding_window is not None:
            if self.sliding_window < 1:
                bad(f"sliding_window must be at least 1 (a query sees itself), got {self.sliding_window}")
            if self.arch == "encoder-decoder":
                bad("sliding_window is for arch=gpt and arch=encoder")
        if self.sliding_window_pattern < 1:
            bad(f"sliding_window_pattern must be at least 1, got {self.sliding_window_pattern}")
        if self.sliding_window is not None and self.n_shared_blocks:
            k = self.n_shared_blocks  # layer i runs block i % k: the layers sharing a block must share a window
            mixed = [i for i in range(self.n_layer) if self.layer_window(i) != self.layer_window(i % k)]
            if mixed:
                bad(f"n_shared_blocks={k} with sliding_window_pattern={self.sliding_window_pattern} makes layer "
                    f"{mixed[0]} share block {mixed[0] % k} with a layer of the other attention kind; choose a "
                    f"pattern that divides n_shared_blocks")


# ModelConfig's decoder-only switches (the encoder-decoder model has none of them)
_GPT_ONLY = ("qk_norm_scope", "norm_placement", "norm_unit_offset", "embed_scale", "attn_scalar", "attn_softcap",
             "logit_softcap", "rope_local_theta")


@dataclass
class DataConfig:
    path: str = ""  # a DATA_DIR written by `scalelm prepare` (also settable with --data)
    sampling: Literal["random", "sequential"] = "random"  # nanoGPT windows or epochs of packed sequences


@dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 12
    grad_accum_steps: int = 1
    global_batch_size: Optional[int] = None  # sequences per optimizer step; overrides grad_accum_steps
    global_batch_tokens: Optional[int] = None  # tokens per optimizer step; overrides grad_accum_steps
    eval_every: int = 250
    eval_iters: int = 20  # validation batches per evaluation
    save_every: int = 1000
    log_every: int = 10
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where the hardware has it
    compile: bool = False
    # bf16 weights, fp32 master copies in the optimizer, no autocast: the fastest CPU setting
    # (README "Performance"). None (the default, also `auto`): on where it applies, i.e. bf16
    # precision on a CPU in one process, without LoRA or pipeline stages; true: on (an error where
    # it cannot be: not bf16, or under torchrun, where FSDP2 has its own: --parallel.fsdp_param_dtype);
    # false: fp32 weights with bf16 autocast. The summary's "master_weights" says which was used.
    master_weights: Optional[bool] = None
    # CPU with glibc: keep freed memory for reuse instead of returning it to the OS (each step's
    # big tensors then skip the page faults: -21% step time on a 6x384 batch-64 run, ~15% more RSS)
    keep_freed_memory: bool = True
    activation_checkpointing: bool = False
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    max_minutes: Optional[float] = None  # wall-clock budget; stops (and saves) when reached
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying at the end
    fused: Optional[bool] = None  # None: fused AdamW where the device has it, else foreach

    def validate(self) -> None:
        def bad(name: str, rule: str, example: str) -> None:
            raise ConfigError(f"optim.{name} must be {rule}, got {getattr(self, name)} (e.g. --optim.{name}={example})")

        if not self.lr > 0:  # also catches nan
            bad("lr", "a positive number", "3e-4")
        if not self.min_lr >= 0:
            bad("min_lr", "zero or positive", "0")
        if not self.weight_decay >= 0:
            bad("weight_decay", "zero or positive", "0.1")
        for name, example in (("beta1", "0.9"), ("beta2", "0.95")):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "in [0, 1)", example)
        if not self.eps > 0:
            bad("eps", "positive", "1e-8")
        if not self.grad_clip >= 0:
            bad("grad_clip", "zero (off) or positive", "1.0")
        if self.warmup_steps < 0:
            bad("warmup_steps", "zero or positive", "100")
        if not 0 <= self.decay_fraction <= 1:
            bad("decay_fraction", "in [0, 1]", "0.2")


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever is left of the world size after the other dimensions
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel: each sequence split over cp ranks, attention as a ring (long sequences)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    pp_microbatches: Optional[int] = None  # None: 2 * pp
    sequence_parallel: bool = False
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    timeout_s: int = 600  # process-group timeout, so a hang fails instead of waiting forever


@dataclass
class CheckpointConfig:
    keep_last: int = 3
    resume: str = "auto"  # auto: resume from RUN_DIR's latest checkpoint; never; or a path


@dataclass
class LoRAConfig:
    r: int = 0  # adapter rank; 0 = off (every weight trains)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input
    targets: str = "q,k,v,o"  # comma list of q,k,v,o,gate,up,down, or the groups attn / mlp / all


@dataclass
class KDConfig:
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5  # loss = alpha * KD + (1 - alpha) * next-token CE
    hidden: float = 0.0  # weight of a hidden-state matching term (0 = off)


@dataclass
class LogConfig:
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False  # Weights & Biases (pip install 'scalelm[track]')
    wandb_mode: str = ""  # online | offline | disabled; "": WANDB_MODE, else online with an API key, else offline
    mlflow: bool = False  # MLflow (pip install 'scalelm[track]')
    mlflow_tracking_uri: str = ""  # "": MLFLOW_TRACKING_URI, else ./mlruns of the working directory
    project: str = ""  # the wandb project and MLflow experiment; "": WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME, else scalelm


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    kd: KDConfig = field(default_factory=KDConfig)

    def validate(self) -> "Config":
        for section in SECTIONS:  # nan and inf pass every comparison check below: refuse them first
            for f in dataclasses.fields(getattr(self, section)):
                v = getattr(getattr(self, section), f.name)
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{section}.{f.name} must be a finite number, got {v}; "
                                      f"give it one (--{section}.{f.name}=NUMBER) or leave it at its default")
        self.model.validate()
        t = self.train
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_iters"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
        self.optim.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
    "parallel": ParallelConfig, "checkpoint": CheckpointConfig, "log": LogConfig,
    "lora": LoRAConfig, "kd": KDConfig,
}


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    if not close and "." in key:  # try matching the field name alone across sections
        leaf = key.split(".")[-1]
        close = [c for c in choices if c.split(".")[-1] in difflib.get_close_matches(
            leaf, [c.split(".")[-1] for c in choices], n=1, cutoff=0.6)][:1]
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_key_error(key: str, where: str = "") -> ConfigError:
    src = f" in {where}" if where else ""
    choices = valid_keys() if "." in key else list(SECTIONS)
    return ConfigError(f"unknown config key '{key}'{src}{_suggest(key, choices)}")


# ----------------------------------------------------------------------------- coercion

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a TOML/JSON value against a dataclass field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        if value == "auto" and bool in args:  # TOML has no null: `auto` is an Optional[bool]'s None
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def merge_dict(cfg: Config, data: dict, where: str = "") -> Config:
    """Apply a nested {section: {key: value}} dict onto cfg, validating keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a table of sections{' in ' + where if where else ''}, "
                          f"got a {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise unknown_key_error(section, where)
        if not isinstance(values, dict):
            raise ConfigError(f"'{section}' must be a table of keys{' in ' + where if where else ''}")
        types = _field_types(SECTIONS[section])
        sub = getattr(cfg, section)
        for key, value in values.items():
            if key not in types:
                raise unknown_key_error(f"{section}.{key}", where)
            setattr(sub, key, _coerce(value, types[key], f"{section}.{key}"))
    return cfg


def config_from_dict(data: dict, where: str = "") -> Config:
    return merge_dict(Config(), data, where)


def load_toml(path: str | Path, cfg: Optional[Config] = None) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); TOML files must be UTF-8") from None
    cfg = cfg or Config()
    preset = data.pop("preset", None)
    if preset is not None:
        cfg = apply_preset(cfg, preset)
    return merge_dict(cfg, data, str(p))


def apply_preset(cfg: Config, name: str) -> Config:
    from .presets import PRESETS

    if name == "auto":  # not a fixed config: scalelm/train/auto.py measures and chooses one
        raise ConfigError("--preset auto is for `scalelm train` (it chooses the model for --train.max_minutes); "
                          "pass a named preset here (see `scalelm presets`)")
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (known: {', '.join(PRESETS)})")
    return merge_dict(cfg, PRESETS[name], f"preset {name}")


def check_override_keys(args: list[str]) -> None:
    """Fail on any --section.key that is not a config field, naming the nearest valid key."""
    keys = set(valid_keys())
    for a in args:
        if not a.startswith("--"):
            continue
        key = a[2:].split("=", 1)[0].replace("-", "_")
        if "." not in key:
            continue
        if key not in keys:
            raise unknown_key_error(key, "command line")


_BOOL_WORDS = {"true": "True", "false": "False", "yes": "True", "no": "False", "1": "True", "0": "False"}
_NONE_WORDS = {"auto": "None", "none": "None", "null": "None"}  # an Optional[bool]'s unset value


def _normalize_bools(args: list[str]) -> list[str]:
    """Accept TOML-style ``--log.progress=false`` (tyro wants ``True``/``False``), and for an
    ``Optional[bool]`` (``--train.master_weights``) also ``auto``/``none``/``null`` for None."""
    kinds = {f"{s}.{f.name}": t for s, cls in SECTIONS.items() for f, t in
             ((f, _field_types(cls)[f.name]) for f in dataclasses.fields(cls)) if t in (bool, Optional[bool])}
    out, expect = [], None
    for a in args:
        if expect is not None:
            a, expect = _bool_word(a, expect), None
        elif a.startswith("--"):
            key, eq, val = a[2:].partition("=")
            tp = kinds.get(key.replace("-", "_"))
            if tp is not None:
                if eq:
                    a = f"--{key}={_bool_word(val, tp)}"
                else:
                    expect = tp
        out.append(a)
    return out


def _bool_word(val: str, tp: Any) -> str:
    words = _BOOL_WORDS if tp is bool else {**_BOOL_WORDS, **_NONE_WORDS}
    return words.get(val.lower(), val)


def apply_overrides(cfg: Config, args: list[str]) -> Config:
    """Apply dotted overrides (``--optim.lr=1e-3`` or ``--optim.lr 1e-3``) with tyro's parsing."""
    if not args:
        return cfg
    for a in args:
        if a.startswith("--") and "." not in a.split("=", 1)[0] and a not in ("--help", "-h"):
            raise ConfigError(f"unrecognized option '{a}'")
    check_override_keys(args)
    args = _normalize_bools(args)
    import tyro

    try:
        return tyro.cli(Config, args=args, default=cfg, config=(tyro.conf.FlagConversionOff,),
                        prog="scalelm")
    except SystemExit as e:
        if e.code == 0:  # --help was printed
            raise
        raise ConfigError(f"could not parse overrides {' '.join(args)} (see the message above)") from None


def resolve(preset: Optional[str] = None, config_file: Optional[str] = None,
            overrides: Optional[list[str]] = None, base: Optional[Config] = None) -> Config:
    cfg = base or Config()
    if preset:
        cfg = apply_preset(cfg, preset)
    if config_file:
        cfg = load_toml(config_file, cfg)
    cfg = apply_overrides(cfg, overrides or [])
    return cfg.validate()


def save_config(cfg: Config, path: str | Path) -> None:
    from .fileio import atomic_write_text

    atomic_write_text(Path(path), json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_config_json(path: str | Path) -> Config:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config not found: {p}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid JSON: {e}") from None
    return config_from_dict(data, str(p))
