"""The recipe runner: everything a training command does around the one ``Trainer``, written once.

A :class:`Recipe` declares what differs between training commands (``train``, ``finetune
classify|sft|translate``, ``distill``): its settings, the config and data it prepares, how it builds
the model (from a base, a preset or a student), its batches, loss, evaluation and metric, how its
model is saved, the files it keeps in RUN_DIR and its summary fields. :func:`run_recipe` owns the
rest, in one order for every command:

    read RUN_DIR's saved config and refuse a run of another command
    -> recipe.prepare (settings, config, data)
    -> start the process group, refuse a wrong --out, lock RUN_DIR, find the checkpoint to resume
    -> a new run: write config.json, run.json and the recipe's files (first: what follows may write
       into RUN_DIR, which must then count as a run; a failure before training removes them)
    -> seed, recipe.build_model, the batch geometry, recipe.batches
    -> the Trainer (the only place a training command constructs one; it loads the checkpoint)
    -> a resumed run: write those files now (a checkpoint that fails to load leaves RUN_DIR untouched)
    -> fit
    -> the summary (the Trainer's fields + the recipe's), printed as one JSON line.

A new recipe is one module of declarations plus its data code; it never touches this file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..checkpoint.names import DISTILL_RECORD, TASK_FILE
from ..config import CLOCK_STEPS, Config, ConfigError, ModelConfig
from ..distributed.mesh import ParallelContext, destroy_parallel, init_parallel
from ..errors import CheckpointError
from ..fileio import atomic_write_text, json_safe
from . import state as ts
from .model_io import ModelIO
from .trainer import Trainer, batch_geometry, default_loss

LM_METRICS = ("val_loss", "val_bits_per_byte")  # what the progress line shows after an evaluation


# ----------------------------------------------------------------------------- what a recipe declares

@dataclass
class RunRecord:
    """What ``run.json`` records of the data a run trains on (``TokenData`` has the same fields)."""

    dir: str
    tokenizer_sha256: str
    vocab_size: int
    meta: dict = field(default_factory=dict)

    @classmethod
    def of_files(cls, first: str, tokenizer_json: str, vocab_size: int, *files) -> "RunRecord":
        """A record for a run on text files: named by the first, the inputs' hash over all of them."""
        from ..data.tokenizer import tokenizer_sha256

        return cls(first, tokenizer_sha256(tokenizer_json), vocab_size, {"inputs_sha256": files_sha256(*files)})


def files_sha256(*paths) -> str:
    """One hash over the bytes of several files (``None`` entries skipped)."""
    h = hashlib.sha256()
    for p in paths:
        if p:
            h.update(Path(p).read_bytes())
    return h.hexdigest()


@dataclass
class TokenizerData:
    """What the Trainer reads of a task's data when it is not a DATA_DIR: the tokenizer and its size."""

    tokenizer_json: str
    vocab_size: int


@dataclass
class Plan:
    """What :meth:`Recipe.prepare` resolved before the run directory is opened. Recipes subclass it
    to carry their own prepared data (encoded examples, the teacher's path, ...)."""

    cfg: Config
    data: Any  # what the Trainer reads: a TokenData, or an object with tokenizer_json and vocab_size
    record: Any = None  # what run.json records (default: ``data``, a TokenData)
    files: dict = field(default_factory=dict)  # RUN_DIR/<name> -> text, written when the run opens
    recipe: Optional["Recipe"] = None  # the recipe that trains this plan, when prepare chose another


class Recipe:
    """The declaration of a training command. Override what differs; the defaults are ``train``'s."""

    command = "train"  # recorded in run.json: a run is only ever continued by the command that made it
    metric = "val_loss"  # picks best/
    higher_is_better = False
    show_metrics: tuple[str, ...] = LM_METRICS

    def prepare(self, args: argparse.Namespace, out: Path, saved: Optional[Config]) -> Plan:
        """Settings, config and data: everything that can be refused before RUN_DIR is touched."""
        raise NotImplementedError

    def build_model(self, plan: Plan, ctx: ParallelContext, resume_from: Optional[Path]):
        """``(model or None, base_dir or None)``. None: the Trainer builds ``cfg.model`` from scratch
        (a resumed run's weights come from its checkpoint either way). ``base_dir``: the model
        directory the weights came from (a LoRA run records it and its hash)."""
        return None, None

    def batches(self, plan: Plan, ctx: ParallelContext, micro_batch: int, accum: int):
        """The training batches; None: windows of ``plan.data``'s train split (language modelling)."""
        return None

    def loss_fn(self, plan: Plan) -> Callable:
        return default_loss

    def evaluate_fn(self, plan: Plan, micro_batch: int) -> Optional[Callable]:
        """``evaluate(trainer) -> {name: value}``; None: the LM loss on ``plan.data``'s val split."""
        return None

    def model_io(self, plan: Plan) -> Optional[ModelIO]:
        """How the model is saved (None: a GPT model directory)."""
        return None

    def wrap_model_io(self, plan: Plan) -> Optional[Callable[[ModelIO], ModelIO]]:
        """Wraps the final ModelIO (after LoRA's adapter files), to add files to every saved model."""
        return None

    def describe(self, plan: Plan, batches) -> Optional[str]:
        """One stderr line about the data, printed when training starts."""
        return None

    def summary(self, plan: Plan, trainer: Trainer, batches, summary: dict) -> dict:
        """Fields added to the Trainer's summary."""
        return {}


# ----------------------------------------------------------------------------- the config

def vocab_is_explicit(args: argparse.Namespace) -> bool:
    """Did the user set model.vocab_size (a file or an override)? Otherwise it follows the data."""
    if any(a.lstrip("-").replace("-", "_").startswith("model.vocab_size") for a in args.overrides):
        return True
    if getattr(args, "config", None):
        import tomllib

        try:
            return "vocab_size" in tomllib.loads(Path(args.config).read_text()).get("model", {})
        except (OSError, tomllib.TOMLDecodeError):
            return False  # resolve() reports the problem
    return False


def sets(args: argparse.Namespace, preset: Optional[str], key: str) -> bool:
    """Did this command line ask for ``key`` (``section.name``): an override, the --config file, or the preset?"""
    if any(a.lstrip("-").replace("-", "_").split("=")[0] == key for a in args.overrides):
        return True
    section, name = key.split(".")
    if getattr(args, "config", None):
        import tomllib

        try:
            if name in tomllib.loads(Path(args.config).read_text()).get(section, {}):
                return True
        except (OSError, tomllib.TOMLDecodeError):
            pass  # resolve() reports the problem
    if preset:
        from ..presets import PRESETS

        return name in (PRESETS.get(preset) or {}).get(section, {})
    return False


def resolve_run_config(args: argparse.Namespace, saved: Optional[Config], *, preset: Optional[str] = None,
                       model: Optional[ModelConfig] = None, fixed: Optional[str] = None,
                       defaults: Optional[dict] = None, vocab_size: Optional[int] = None,
                       reuse_saved: Optional[bool] = None, check_vocab: bool = True) -> Config:
    """The run's config, the same way for every recipe (lowest first, overrides always on top):

    - resuming (``saved``, no ``--preset``/``--config``): the run's own config;
    - from a model (``model``: a base, an init-from checkpoint, a teacher or student): its shape on
      ``defaults``; ``fixed`` (the option that named it, e.g. ``--base DIR``) means only its dropout
      may change;
    - else the preset (or the defaults), its vocabulary following ``vocab_size`` unless set.
    """
    from ..config import merge_dict, resolve

    if reuse_saved is None:
        reuse_saved = saved is not None and not (preset or getattr(args, "config", None))
    if reuse_saved:
        cfg = resolve(config_file=getattr(args, "config", None), overrides=args.overrides, base=saved)
    elif model is not None:
        start = merge_dict(Config(), defaults, "fine-tuning defaults") if defaults else Config()
        start.model = model
        cfg = resolve(config_file=getattr(args, "config", None), overrides=args.overrides, base=start)
    else:
        cfg = resolve(preset=preset, config_file=getattr(args, "config", None), overrides=args.overrides)
        if vocab_size is not None and not vocab_is_explicit(args):
            cfg.model.vocab_size = vocab_size
    if not reuse_saved and cfg.train.max_minutes is not None and not sets(args, preset, "train.max_steps"):
        cfg.train.max_steps = CLOCK_STEPS  # a time budget and no step limit asked for: the clock governs
    if fixed and model is not None:
        diffs = [f"model.{k} is {getattr(model, k)!r} in the base, {getattr(cfg.model, k)!r} here"
                 for k in vars(model) if k != "dropout" and getattr(model, k) != getattr(cfg.model, k)]
        if diffs:
            raise ConfigError(f"{fixed} fixes the model's shape ({'; '.join(diffs)}): drop those "
                              f"--model.* settings (only --model.dropout may change)")
    if check_vocab and vocab_size is not None and vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is "
                          f"{cfg.model.vocab_size}: set --model.vocab_size={vocab_size} or more")
    if getattr(args, "resume", None):
        cfg.checkpoint.resume = args.resume
    return cfg


# ----------------------------------------------------------------------------- the run directory

def run_command(run_dir: Path) -> Optional[str]:
    """The command that made the run in ``run_dir`` (recorded in run.json; older runs by their files)."""
    info = Path(run_dir) / ts.RUN_INFO
    if info.is_file():
        try:
            command = json.loads(info.read_text()).get("command")
        except (json.JSONDecodeError, AttributeError):
            command = None
        if command:
            return command
    if (Path(run_dir) / DISTILL_RECORD).is_file():
        return "distill"
    task = Path(run_dir) / TASK_FILE
    if task.is_file():
        return "finetune"  # the task is checked by its own settings
    return "train"


def check_run_kind(out: Path, saved: Optional[Config], command: str) -> None:
    """Refuse to continue a run that another command made (``distill --out`` of a pretraining run
    would otherwise resume it, mixing two losses in one metrics file and replacing its best/)."""
    if saved is None:
        return
    made_by = run_command(out)
    same = made_by == command or (made_by == "finetune" and command.startswith("finetune "))
    if not same:
        raise CheckpointError(f"--out {out} holds a run of `scalelm {made_by}`, not of `scalelm {command}`: use "
                              f"another --out (nothing was touched)")


def lock_run_dir(run_dir: Path, ctx: ParallelContext, command: str):
    """One writer per run directory: the main rank holds ``RUN_DIR/.lock`` for the whole run; under
    torchrun every rank learns whether it got it (so no rank waits on a barrier that never comes)."""
    from ..runs import RunDirLocked, RunLock

    lock, error = None, ""
    if ctx.is_main:
        try:
            lock = RunLock(run_dir, command).acquire()
        except RunDirLocked as e:
            error = str(e)
    if ctx.distributed:
        msg = [error]
        dist.broadcast_object_list(msg, src=0)
        error = msg[0]
    if error:
        raise RunDirLocked(error)
    return lock


@contextlib.contextmanager
def open_run(out: Path, cfg: Config, data, saved: Optional[Config], command: str = "train"):
    """Start the process group, refuse a wrong ``--out``, lock RUN_DIR (one writer), clean it and
    find the checkpoint to resume. Yields ``(ctx, resume_from)``; the lock and the process group are
    released at the end."""
    ctx = init_parallel(cfg)
    lock = None
    try:
        ts.prepare_run_dir(out, cfg, data, saved, write=False)  # refuse a wrong --out before locking it
        lock = lock_run_dir(out, ctx, command)
        resume_from = ts.prepare_run_dir(out, cfg, data, saved, write=ctx.is_main)
        ctx.barrier()
        yield ctx, resume_from
    finally:
        if lock is not None:
            lock.release()
        destroy_parallel(ctx)


def report_run(trainer: Trainer, summary: dict) -> int:
    """Print the run's JSON summary (main rank); the exit code (128 + signal when stopped by one)."""
    if trainer.is_main:
        print(json.dumps(json_safe(summary), allow_nan=False))  # a diverged run's NaN loss prints as null
    return 128 + trainer._signal if trainer._signal else 0


def _write_run_files(out: Path, plan: Plan, command: str, ctx: ParallelContext) -> None:
    ts.write_run_config(out, plan.cfg, plan.record)
    info = out / ts.RUN_INFO
    micro_batch, accum = batch_geometry(plan.cfg, ctx.dp_world)
    atomic_write_text(info, json.dumps({
        **json.loads(info.read_text()),
        "command": command,  # only the command that made the run may continue it
        # the layout it last ran on: a resume on another world size keeps this global batch
        "layout": {"world_size": ctx.world_size, "global_batch_size": micro_batch * accum * ctx.dp_world},
    }, indent=2) + "\n")
    for name, text in plan.files.items():
        atomic_write_text(out / name, text)


def follow_world_size(out: Path, cfg: Config, saved: Optional[Config]) -> None:
    """Resuming on another number of processes (a torchrun run continued in one process, or on more
    nodes): unless this command line changed the parallel layout or the batch, shard data parallelism
    over the processes there are and keep the run's recorded global batch (the accumulation follows),
    so the run continues the same trajectory instead of failing on its old layout."""
    from ..distributed.mesh import world_from_env

    if saved is None or cfg.parallel != saved.parallel:
        return
    t, st = cfg.train, saved.train
    if (t.global_batch_size, t.global_batch_tokens, t.micro_batch_size) != \
            (st.global_batch_size, st.global_batch_tokens, st.micro_batch_size):
        return
    try:
        layout = json.loads((out / ts.RUN_INFO).read_text()).get("layout") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    world, recorded = world_from_env()[0], layout.get("world_size")
    if not isinstance(recorded, int) or recorded == world:
        return
    p = cfg.parallel
    if world % (p.dp_replicate * p.tp * p.pp * p.cp):  # the model-parallel dimensions no longer fit: data parallel only
        p.dp_replicate = p.tp = p.pp = p.cp = 1
    p.dp_shard = -1
    if t.global_batch_size is None and t.global_batch_tokens is None and layout.get("global_batch_size"):
        t.global_batch_size = int(layout["global_batch_size"])
    if world_from_env()[1] == 0:
        print(f"note: {out} last ran on {recorded} processes, now {world}: data parallelism over {world}, the "
              f"global batch kept at {t.global_batch_size or t.global_batch_tokens} (accumulation derived)",
              file=sys.stderr)


def _forget_new_run(out: Path, existed: bool) -> None:
    """A new run that failed before training: remove what it wrote, so that the same command with
    corrected settings starts afresh instead of finding a half-made run to "resume"."""
    if existed:
        return
    for p in out.iterdir() if out.is_dir() else ():
        if p.name.startswith("."):  # the lock: released by open_run
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# ----------------------------------------------------------------------------- the runner

def run_recipe(recipe: Recipe, args: argparse.Namespace) -> int:
    """Run one training command; the exit code."""
    out = Path(args.out)
    saved = ts.read_run_config(out)
    check_run_kind(out, saved, recipe.command)
    plan = recipe.prepare(args, out, saved)
    recipe = plan.recipe or recipe
    if plan.record is None:
        plan.record = plan.data
    follow_world_size(out, plan.cfg, saved)
    cfg = plan.cfg.validate()
    existed = out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())
    with open_run(out, cfg, plan.record, saved, recipe.command) as (ctx, resume_from):
        try:
            if resume_from is None:  # a new run: RUN_DIR counts as a run before the model may write into it
                if ctx.is_main:
                    _write_run_files(out, plan, recipe.command, ctx)
                ctx.barrier()
            torch.manual_seed(cfg.train.seed)  # the same initial weights (and task head) on every rank
            model, base_dir = recipe.build_model(plan, ctx, resume_from)
            micro_batch, accum = batch_geometry(cfg, ctx.dp_world)
            batches = recipe.batches(plan, ctx, micro_batch, accum)
            trainer = Trainer(cfg, plan.data, out, ctx=ctx, model=model, resume_from=resume_from, batches=batches,
                              loss_fn=recipe.loss_fn(plan), evaluate_fn=recipe.evaluate_fn(plan, micro_batch),
                              metric=recipe.metric, higher_is_better=recipe.higher_is_better,
                              model_io=recipe.model_io(plan), base_dir=base_dir,
                              wrap_model_io=recipe.wrap_model_io(plan), show_metrics=recipe.show_metrics)
        except BaseException:
            if ctx.is_main and resume_from is None:
                _forget_new_run(out, existed)
            raise
        if resume_from is not None:  # a resumed run is rewritten only once its checkpoint has loaded
            if ctx.is_main:
                _write_run_files(out, plan, recipe.command, ctx)
            ctx.barrier()
        line = recipe.describe(plan, trainer.batches)
        if line and trainer.is_main:
            print(line, file=sys.stderr)
        summary = trainer.fit()
        summary.update(recipe.summary(plan, trainer, trainer.batches, summary))
    return report_run(trainer, summary)
