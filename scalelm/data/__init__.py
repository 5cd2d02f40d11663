"""Data: corpus sources, tokenizers, token shards (`prepare`) and the batch loader.

The loader (which needs torch) is imported on first use, so `scalelm prepare` starts fast.
"""

__all__ = ["BatchLoader", "DataError", "TokenData", "eval_batches"]


def __getattr__(name):
    if name in __all__:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'scalelm.data' has no attribute {name!r}")
