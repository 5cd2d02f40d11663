"""One way to write a directory: stage it, publish it atomically, delete the stage on failure.

Every writer of a model directory, checkpoint or export goes through :func:`staged_dir`, so a
kill or an exception at any moment leaves either the previous directory or the complete new
one, never a mix, and no half-written directory under the final name. Stages are hidden
(``.<name>.*`` next to the final directory, or a fixed ``.staging-<name>``) so that a run's
``clean_staging`` removes what a kill leaves behind.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..fileio import publish_dir
from .manifest import write_manifest


def reset_dir(path: str | Path) -> Path:
    """``path`` as a new, empty directory (whatever a killed writer left there is dropped)."""
    p = Path(path)
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    return p


@contextmanager
def staged_dir(final: str | Path, *, manifest: bool = True, stage: Optional[str | Path] = None,
               adopt: bool = False, tag: str = "") -> Iterator[Path]:
    """Yield an empty hidden directory; when the block ends normally, write ``manifest.json``
    (``manifest=True``; it hashes every file, so it comes last) and publish the directory as
    ``final`` atomically (replacing an earlier one). When the block raises, the stage is deleted
    and ``final`` is left as it was.

    ``stage``: a fixed stage path instead of a fresh ``.<final name>.<tag>XXXX`` (a sharded save,
    where every rank writes into the same stage); ``adopt=True`` takes it as it is (already
    filled by the other ranks) instead of emptying it. ``manifest=False`` is for a directory
    that is not a scalelm one (a Hugging Face export) or a caller that adds files itself.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if stage is None:
        d = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}", dir=final.parent))
    elif adopt:
        d = Path(stage)
        if not d.is_dir():
            raise FileNotFoundError(f"the stage {d} of {final} is missing")
    else:
        d = reset_dir(stage)
    try:
        yield d
        if manifest:
            write_manifest(d)
        publish_dir(d, final)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
