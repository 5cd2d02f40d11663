"""Data: corpus sources, tokenizers, token shards (`prepare`) and the batch loader."""

from .loader import BatchLoader, DataError, TokenData, eval_batches

__all__ = ["BatchLoader", "DataError", "TokenData", "eval_batches"]
