"""Every file name of a model directory, a run directory and a checkpoint (no torch, no I/O).

The one place these names are spelled; everything else imports them from here::

    MODEL_DIR/model.safetensors     weights (a tied LM head stored once, as the embedding)
              config.json           {"format": "scalelm", "model": {...}, ...}
              tokenizer.json        when known (+ tokenizer_config.json, chat_template.jinja, ...)
              head.safetensors      a classifier's head
              adapter.safetensors   a LoRA directory: only the trained tensors (the base lives elsewhere)
              manifest.json         sha256 and size of every other file (checked on load)
    RUN_DIR/config.json             the resolved training config
            run.json                which data the run trains on
            task.json               a fine-tuning task's settings (distill.json: a distillation's teacher;
                                    auto.json: what --preset auto chose)
            metrics.jsonl           one JSON line per logged step
            trackers.json           the wandb / MLflow runs it logs to (log.wandb, log.mlflow)
            latest                  names the newest complete checkpoint (ckpt-00000400)
            ckpt-00000400/          a model directory + optimizer.safetensors, rng.safetensors, state.json;
                                    or, sharded (torchrun): dcp/ + rng/rank-<r>.* + state.json
            best/                   a model directory of the best validation loss so far
            .lock, .lock.holder     one writer per run
"""

from __future__ import annotations

from pathlib import Path

FORMAT = "scalelm"  # config.json's "format" in every scalelm model directory and checkpoint

# ----------------------------------------------------------------------------- a model directory

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
MANIFEST = "manifest.json"
HEAD = "head.safetensors"  # a classifier's head (keys without "head.")
ADAPTER = "adapter.safetensors"  # a LoRA directory's trained tensors
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"  # bos/eos strings, added tokens (Hugging Face's, too)
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# tokenizer-side files copied as they are between directories (chat templates live in the last two)
TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, TEMPLATE_FILE)
ONNX_FILE = "model.onnx"  # an ONNX export directory's graph (beside its config.json)

# ----------------------------------------------------------------------------- a training checkpoint

OPTIMIZER = "optimizer.safetensors"  # AdamW moments keyed "<param fqn>/<key>"
RNG = "rng.safetensors"  # torch generator states
STATE = "state.json"  # step, loader position, Python/NumPy RNG, optimizer param groups, ...
DCP_DIR = "dcp"  # a sharded (torchrun) checkpoint's shards: .metadata + __<rank>_0.distcp
DCP_METADATA = Path(DCP_DIR) / ".metadata"
RNG_DIR = "rng"  # a sharded checkpoint's per-rank RNG states


def rank_rng_files(rank: int) -> tuple[str, str]:
    """``(tensors, json)`` file names of one rank's RNG states inside ``RNG_DIR``."""
    return f"rank-{rank:05d}.safetensors", f"rank-{rank:05d}.json"


# ----------------------------------------------------------------------------- a run directory

LATEST = "latest"  # RUN_DIR/latest names the newest complete checkpoint directory
BEST = "best"  # RUN_DIR/best is a model dir of the best validation loss so far
RUN_INFO = "run.json"  # which data the run trains on (the tokenizer's hash names it)
METRICS = "metrics.jsonl"
TRACKERS = "trackers.json"  # the wandb / MLflow runs a run logs to (log.wandb, log.mlflow), so a resume continues them
TASK_FILE = "task.json"  # a fine-tuning task's settings (given > saved > defaults)
LORA_BASE = "base"  # RUN_DIR/base: a LoRA run's grown base model (new tokens), when it needs one
AUTO_RECORD = "auto.json"  # --preset auto: the shape it chose and why
DISTILL_RECORD = "distill.json"  # a distillation run's teacher, so a resume needs no --teacher
REFERENCE_CACHE = "reference_logps.safetensors"  # a preference run's reference log-probabilities (computed once)
KD_PROJECTION = "kd_projection.safetensors"  # a distillation checkpoint's hidden-state projection (kd.hidden > 0)
LOCK = ".lock"
LOCK_HOLDER = ".lock.holder"  # who holds it (the lock file itself is truncated by every opener)
CKPT_PREFIX = "ckpt-"
CKPT_GLOB = CKPT_PREFIX + "*"
RUN_MARKERS = (LATEST, METRICS, RUN_INFO)  # any of these makes a directory a run's
# hidden directories a kill may leave in a run (never visible as checkpoints): a checkpoint's stage,
# a stage inside it ("..staging-*"), best/'s stages
STAGING = (".staging-*", "..staging-*", ".ckpt-*", ".best.*", ".best-*")


def ckpt_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def staging_name(name: str) -> str:
    """The fixed stage of ``RUN_DIR/<name>`` (every rank of a sharded save must know it)."""
    return f".staging-{name}"


# ----------------------------------------------------------------------------- Hugging Face / PEFT

HF_CONFIG, HF_WEIGHTS = CONFIG, WEIGHTS  # the same names in a Hugging Face model directory
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_PICKLE_WEIGHTS = "pytorch_model.bin"
HF_GENERATION_CONFIG = "generation_config.json"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
