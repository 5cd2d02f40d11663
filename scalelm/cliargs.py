"""The command line's one vocabulary: options that mean the same thing are spelled the same way.

Every command that takes these concepts adds them through the helpers here:

- ``MODEL`` (dest ``model``): the positional model directory, or a RUN_DIR (its latest checkpoint).
- ``--dtype auto|fp32|bf16|fp16``: the number format the model computes in; the values are the
  config's ``train.precision`` values, so ``--dtype bf16`` and ``--train.precision=bf16`` agree.
- ``--batch-size``: sequences (windows, rows) per forward pass.
- ``--seq-len``: tokens per window fed to the model (default: its ``block_size``).
- ``--overwrite``: replace an earlier output directory of the same kind (see
  :func:`scalelm.runs.check_output_dir`, which every directory-writing command calls).

Spellings these replaced (``--precision``, ``--max-batch``, ``--micro-batch``, ``--block-size``,
``--dtype float32`` ...) keep working for one release through :func:`add_deprecated` and
:func:`dtype_value`: hidden from ``--help``, with one line on stderr that names the new spelling.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

DTYPES = ("fp32", "bf16", "fp16")  # as train.precision spells them
OLD_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch's names: until the next release
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # for Python APIs that take torch's names
MODEL_HELP = "a model directory, or a RUN_DIR (its latest checkpoint)"


def warn_deprecated(old: str, new: str) -> None:
    print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)


def dtype_value(value: str) -> str:
    """``--dtype``'s type: an old (torch) name still works, with a warning, and becomes the new one."""
    if value in OLD_DTYPES:
        warn_deprecated(f"--dtype {value}", f"--dtype {OLD_DTYPES[value]}")
        return OLD_DTYPES[value]
    return value


def add_model_arg(p, help: str = MODEL_HELP, nargs: Optional[str] = None) -> None:
    """The positional model argument, named alike in every command's usage line and code."""
    p.add_argument("model", metavar="MODEL", help=help, **({"nargs": nargs} if nargs else {}))


def add_dtype_arg(p, help: str, default: Optional[str] = "auto", choices: Sequence[str] = ("auto", *DTYPES)) -> None:
    p.add_argument("--dtype", type=dtype_value, choices=list(choices), default=default, help=help)


def add_overwrite_arg(p, kind: str, option: str = "--out") -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {option} if it holds an earlier {kind} (never a run directory, the source or "
                        f"another folder)")


class _Deprecated(argparse.Action):
    """An old spelling: stores into the new option's dest after one warning line."""

    def __init__(self, option_strings, dest, new: str, **kw):
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated(option_string, self.new)
        setattr(namespace, self.dest, values)


def add_deprecated(p, old: str, new: str) -> None:
    """Accept ``old`` as a hidden alias of the already added option ``new`` (same dest, type, choices)."""
    target = p._option_string_actions[new]
    if target.nargs == 0:
        raise ValueError(f"{new} is a flag: aliases of flags are not supported")
    p.add_argument(old, action=_Deprecated, new=new, dest=target.dest, type=target.type, choices=target.choices,
                   metavar=target.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
