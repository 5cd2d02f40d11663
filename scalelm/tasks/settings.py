"""A task run's settings (``RUN_DIR/task.json``): given now, else saved by the run, else defaults.

Every ``scalelm finetune TASK`` resumes from ``--out`` alone: the options that shape the model or its
data are saved in ``task.json`` and a resumed run may not change them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint.names import TASK_FILE  # noqa: F401 (re-exported to the task commands)
from ..errors import UserError


def read_task_file(out: Path) -> dict | None:
    p = Path(out) / TASK_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is corrupt ({e}): delete the run, or use another --out") from None


def _same_hub_model(given, saved) -> bool:
    """``hf:ORG/NAME`` (any branch's head) against the ``hf:ORG/NAME@COMMIT`` a run pinned it to."""
    return (isinstance(given, str) and isinstance(saved, str) and given.startswith("hf:") and "@" not in given
            and saved.startswith(given + "@"))


def settings(args: argparse.Namespace, saved_task: dict | None, fixed: tuple, paths: tuple, defaults: dict,
             command: str, free: tuple = ()) -> dict:
    """The task's settings: this command line, else the run's task.json, else ``defaults``. A resumed
    run may not change the ``fixed`` ones (they shape the model or its data); ``free`` ones (e.g. where
    the files now are) may change. ``paths`` are made absolute."""
    given = {k: getattr(args, k, None) for k in (*fixed, *free)}
    for k in paths:
        if isinstance(given.get(k), list):  # several files (--train a.jsonl b.jsonl)
            given[k] = [str(Path(v).resolve()) for v in given[k]]
        elif given.get(k) is not None and not (k == "tokenizer" and given[k] == "byte") \
                and not str(given[k]).startswith("hf:"):  # a Hub id (--base hf:ORG/NAME), not a path
            given[k] = str(Path(given[k]).resolve())
    s = dict(given)
    if saved_task is not None:
        for k in fixed:
            if k == "base" and _same_hub_model(given[k], saved_task.get(k)):
                given[k] = saved_task[k]  # hf:ORG/NAME given again: the run keeps the commit it started from
            if given[k] is not None and saved_task.get(k) is not None and given[k] != saved_task[k]:
                raise UserError(f"{args.out} holds a run with {k}={saved_task[k]!r}, not {given[k]!r}: resume it "
                                f"with its own settings (`scalelm finetune {command} --out {args.out}` reuses "
                                f"them), or use another --out")
        s = {k: saved_task.get(k) if v is None else v for k, v in given.items()}
        if given.get("base") is not None:
            s["preset"] = None
    s = {k: defaults.get(k) if v is None else v for k, v in s.items()}
    if bool(s.get("base")) == bool(s.get("preset")):
        raise UserError("give the model to train: --base MODEL_DIR (fine-tune) or --preset NAME (from scratch), "
                        "not both" if s.get("base") else "give the model to train: --base MODEL_DIR (fine-tune) "
                        "or --preset NAME (from scratch)")
    if s.get("base") and given.get("tokenizer"):
        raise UserError("--tokenizer is for --preset: a fine-tuned model reads text with its base's tokenizer")
    return s
