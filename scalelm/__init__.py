"""scalelm: pretrain, fine-tune, compress, evaluate and serve Transformer LMs, from 1 CPU to a cluster.

The public face (imported on first use, so ``scalelm --help`` and ``prepare`` start fast)::

    from scalelm import Config, GPT, Trainer, Generator, TokenData, load_model, prepare
    from scalelm import capture, patch     # read and replace activations by name (scalelm/interp)
"""

__version__ = "0.1.0"

from .config import Config, ConfigError, ModelConfig  # noqa: E402
from .errors import CheckpointError, UserError  # noqa: E402

_LAZY = {
    "GPT": "scalelm.model.gpt", "load_model": "scalelm.model.io", "save_model": "scalelm.model.io",
    "Trainer": "scalelm.train.trainer", "Generator": "scalelm.generate.generator",
    "SamplingParams": "scalelm.generate.sampling", "TokenData": "scalelm.data.loader",
    "prepare": "scalelm.data.prepare", "evaluate": "scalelm.train.validation",
    "capture": "scalelm.interp.hooks", "patch": "scalelm.interp.hooks",
}

__all__ = ["CheckpointError", "Config", "ConfigError", "ModelConfig", "UserError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scalelm' has no attribute {name!r}")
