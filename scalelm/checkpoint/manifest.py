"""``manifest.json``: the sha256 and size of every file in a model directory or checkpoint.

Written last into a staging directory (after every other file), checked on load, so a flipped
byte anywhere is an error naming the file instead of NaN losses or garbage text. A directory
without a manifest (written by an older scalelm) loads unchecked. No torch needed.

:func:`scalelm.checkpoint.staged_dir` writes it (``manifest=True``) just before publishing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from ..errors import CheckpointError
from ..fileio import atomic_write_text, sha256_file
from .names import MANIFEST

FORMAT = "scalelm-manifest"
VERSION = 1


def _files(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(dir_: str | Path) -> Path:
    """Hash every file under ``dir_`` (recursively) into ``dir_/manifest.json``."""
    d = Path(dir_)
    files = {name: {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size} for name in _files(d)}
    out = d / MANIFEST
    atomic_write_text(out, json.dumps({"format": FORMAT, "version": VERSION, "files": files}, indent=1) + "\n")
    return out


def read_manifest(dir_: str | Path) -> Optional[dict]:
    """The ``files`` table of ``dir_/manifest.json``, or None when there is none."""
    p = Path(dir_) / MANIFEST
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is corrupt ({e}): the directory {p.parent} cannot be checked; "
                              f"pass --no-verify to load it anyway") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(files, dict) \
            or not all(isinstance(v, dict) for v in files.values()):
        raise CheckpointError(f"{p} is not a scalelm manifest: the directory {p.parent} cannot be checked; "
                              f"pass --no-verify to load it anyway")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{p} has manifest version {meta.get('version')!r} (this scalelm reads {VERSION}): "
                              f"written by a newer scalelm? pass --no-verify to load it anyway")
    return files


NO_VERIFY = "restore it from a good copy, or pass --no-verify to load it anyway"


def verify_manifest(dir_: str | Path, only: Optional[Iterable[str]] = None, how: str = NO_VERIFY,
                    optional: Iterable[str] = ()) -> None:
    """Check the files ``manifest.json`` lists (those among ``only``, when given) against it.

    A file the manifest lists but that is missing (unless ``optional``), or has another size or
    hash, is a ``CheckpointError`` naming it. Files the manifest does not list are not checked.
    """
    d = Path(dir_)
    files = read_manifest(d)
    if files is None:
        return
    names = sorted(files) if only is None else [n for n in sorted(set(only)) if n in files]
    for name in names:
        p, want = d / name, files[name]
        if not p.is_file():
            if name in optional:  # removed on purpose (e.g. a tokenizer replaced by --tokenizer)
                continue
            raise CheckpointError(f"{d} is corrupt or incomplete: {name} is missing but {MANIFEST} lists it; {how}")
        size = p.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"{d} is corrupt: {name} has {size} bytes but {MANIFEST} says "
                                  f"{want.get('bytes')}; {how}")
        if sha256_file(p) != want.get("sha256"):
            raise CheckpointError(f"{d} is corrupt: {name} does not match its sha256 in {MANIFEST}; {how}")
