"""The model: ``GPT`` (GPT-2 and Llama styles), presets' shapes, the loss, the model-directory
format (``io``) and Hugging Face interop (``hf``). Imports nothing above it: parallelism, LoRA,
quantization and task heads are applied to a plain ``GPT`` from outside."""

from .encoder import Encoder
from .gpt import GPT, Block, flops_per_token, make_norm
from .io import load_model, load_model_dir, save_model_dir
from .kv_cache import KVCache, PreallocatedKVCache
from .loss import IGNORE_INDEX, cross_entropy

__all__ = ["GPT", "Block", "Encoder", "IGNORE_INDEX", "KVCache", "PreallocatedKVCache", "cross_entropy", "flops_per_token",
           "load_model", "load_model_dir", "make_norm", "save_model_dir"]
