"""torchrun worker: ``scalelm ARGS`` whose process of one rank dies by SIGKILL once, mid-run.

Usage: crash_once.py MARKER RANK STEP ARGS...   (ARGS as for ``python -m scalelm``)

The worker of global rank RANK kills itself with SIGKILL (no cleanup, no checkpoint: a lost
node) when it is about to train the step after STEP, unless MARKER exists; it creates MARKER
first, so the workers torchrun restarts run through. Keyed on the step count and a file, not on
time, so the failure hits the same step however loaded the machine is.
"""

import os
import signal
import sys
from pathlib import Path

from scalelm.cli import main
from scalelm.train.trainer import Trainer

marker, rank, at_step = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
_train_step = Trainer.train_step


def train_step(self):
    if self.step == at_step and int(os.environ.get("RANK", 0)) == rank and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return _train_step(self)


Trainer.train_step = train_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[4:]))
