"""The on-disk format, in one package: every file name, the manifest, one way to stage and
publish a directory, and one reader and writer per kind of directory, at the level of files
<-> state dicts + JSON (building a model from them is :mod:`scalelm.model.io`'s job; this
package imports nothing above ``config``, so every stage can use it).

==================  =====================================================================
``names``           the file names of model directories, run directories and checkpoints
``manifest``        ``manifest.json``: sha256 + size of every file, checked on load
``staging``         :func:`staged_dir`: stage, publish atomically, delete on failure
``rundir``          ``ckpt-N``, ``latest``, pruning, leftovers of a kill
``model_dir``       a plain model directory (weights, config, tokenizer)
``head``            a classifier's directory (a model directory + ``head.safetensors``)
``adapters``        a LoRA directory, its base, and the LoRA merge
``quantized``       a quantized model directory (``"quantization"`` in config.json)
``training``        a training checkpoint of one process (optimizer, RNG, ``state.json``)
``dcp``             a sharded (torchrun) checkpoint, and consolidating one in one process
``kinds``           what kind of model a directory holds; :func:`~.kinds.require_kind`, every command's refusal
==================  =====================================================================

Importing the package loads no torch; the readers and writers (``model_dir`` and below) do.
"""

from .manifest import read_manifest, verify_manifest, write_manifest
from .names import ckpt_name
from .rundir import latest_checkpoint, list_checkpoints
from .staging import staged_dir

__all__ = ["ckpt_name", "latest_checkpoint", "list_checkpoints", "read_manifest", "staged_dir", "verify_manifest",
           "write_manifest"]
