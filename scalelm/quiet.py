"""Silence what the libraries below scalelm print that is known to be harmless, and nothing else.

Stderr is for what a user must act on. Each entry names the message, who prints it and why it
needs no action here; anything not listed still reaches the user. Called once by the command line
(:func:`scalelm.cli.main`); Python users keep their own logging and warnings settings.
"""

from __future__ import annotations

import logging
import warnings

# logger -> lowest level still shown
LOGGERS = {
    # torchao (imported by transformers when installed) tries its CUDA-only kernels (_C_mxfp8.so,
    # _C_cutlass_90a.so) on every import; a CPU build cannot load them and needs none of them
    "torchao": logging.ERROR,
    # torchao registers Enum classes with torch's pytree; torch 2.13 says that is now unnecessary
    "torch.utils._pytree": logging.ERROR,
    # torch.onnx's registry skips torchvision's operators when torchvision is absent (we export none)
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}

# (message regex, category) of Python warnings that say nothing about the user's run
WARNINGS = [
    # DCP reading a checkpoint in one process (eval/export/resume of a torchrun run) is intended
    (r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning),
]


def quiet_known_noise() -> None:
    for name, level in LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def no_git_probe() -> None:
    """lm-eval records the git commit of the current directory by running ``git describe``, whose
    "fatal: not a git repository" reaches stderr outside a repository: record none instead."""
    try:
        import lm_eval.evaluator as ev
    except ImportError:
        return
    ev.get_git_commit_hash = lambda: None
