"""scalelm: pretrain, fine-tune, compress, evaluate and serve Transformer LMs, from 1 CPU to a cluster."""

__version__ = "0.1.0"

from .config import Config, ConfigError, ModelConfig  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["Config", "ConfigError", "ModelConfig", "UserError", "__version__"]
