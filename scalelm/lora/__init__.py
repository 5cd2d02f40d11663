"""LoRA adapters, applied to a plain GPT from outside (like parallelize), merged, exported to PEFT.

    scalelm train --init-from BASE --lora.r=8 --lora.targets=q,v ...   train adapters only
    scalelm merge RUN --out MODEL_DIR                                  fold them into a model
    scalelm convert RUN --to-peft OUT_DIR                              PEFT's adapter format

Inference needs none of this: ``scalelm.model.io.load_model_dir`` merges a LoRA directory.
"""

from .files import NEEDS_BASE, LoRAFiles, lora_base_dir
from .layer import LoRALinear, adapters_off, apply_lora, lora_layers, merge_lora, parse_targets

__all__ = ["NEEDS_BASE", "LoRAFiles", "LoRALinear", "adapters_off", "apply_lora", "lora_base_dir", "lora_layers", "merge_lora",
           "parse_targets"]
