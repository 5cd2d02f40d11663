"""What every language-model fine-tuning command (``sft``, ``translate``) does around the Trainer.

Settings from the command line or the run's ``task.json`` (so ``--out RUN_DIR`` alone resumes),
the starting model (``--base`` directory, or a preset with a tokenizer), the config (the base fixes
the shape), the vocabulary grown by new special tokens, then one :func:`train_lm_task`: open the
run directory, build the model (LoRA base included), train encoded examples through the Trainer
with the reply-only loss, and print the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...config import Config, ConfigError
from ...errors import UserError
from ...fileio import atomic_write_text
from ...runs import TOKENIZER
from ...train import state as ts
from ..settings import TASK_FILE, read_task_file, settings  # noqa: F401 (re-exported to sft/translate)

FINETUNE_DEFAULTS = {"optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 20},  # from --base (not --preset)
                     "train": {"max_steps": 500, "eval_every": 50, "save_every": 100}}


def add_model_source_args(p: argparse.ArgumentParser, tokenizer_help: str) -> None:
    """Options every LM fine-tuning command shares."""
    src = p.add_argument_group("model (one of)")
    src.add_argument("--base", metavar="MODEL_DIR", help="fine-tune this model directory (or RUN_DIR's latest)")
    src.add_argument("--preset", help="train a model of this preset from scratch")
    p.add_argument("--tokenizer", metavar="FILE|DIR", help=tokenizer_help)
    p.add_argument("--config", help="a TOML config file (same keys as the dotted overrides)")
    p.add_argument("--out", required=True, help="the run directory (checkpoints, metrics.jsonl, best/)")
    p.add_argument("--resume", help="resume from this checkpoint or RUN_DIR instead of --out's latest")
    p.add_argument("--max-length", type=int, help="longest example in tokens (default: the model's block_size)")
    p.add_argument("--packing", choices=["on", "off"], help="pack several examples per window with a document "
                   "mask (on, the default: as fast or faster at a slightly lower loss in the README's measurement) "
                   "or one example per row, length-grouped and padded (off)")
    p.epilog = "Any config field is an override: --optim.lr=1e-4 --train.max_steps=500 --lora.r=8 ..."
    p.set_defaults(accepts_overrides=True)


# ----------------------------------------------------------------------------- settings

def files_sha256(*paths) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        if p:
            h.update(Path(p).read_bytes())
    return h.hexdigest()


@dataclass
class RunRecord:
    """What ``prepare_run_dir`` / ``write_run_config`` record of the data in run.json."""
    dir: str
    tokenizer_sha256: str
    vocab_size: int
    meta: dict


@dataclass
class TrainerData:
    """What the Trainer reads of the data: the (extended) tokenizer and its size."""
    tokenizer_json: str
    vocab_size: int


# ----------------------------------------------------------------------------- the starting model

@dataclass
class Base:
    """The model training starts from: a directory (``--base``) or a preset's shape."""
    dir: Path | None
    cfg: object  # the base's ModelConfig (None for a preset)
    tokenizer_json: str
    template: str | None = None  # the base's own chat template
    bos: str | None = None  # bos/eos strings of the base's tokenizer_config.json
    eos: str | None = None
    hf: dict | None = None  # config.json's "hf" entry (an imported model's special ids)


def tokenizer_json_of(spec: str) -> str:
    """A tokenizer.json's text: a file, a directory holding one, or ``byte`` (raw UTF-8 bytes)."""
    from ...data.tokenizer import byte_tokenizer, load_tokenizer

    return byte_tokenizer().to_str() if spec == "byte" else load_tokenizer(spec).to_str()


def read_base(base: str) -> Base:
    from ...generate.generator import read_chat_template
    from ...model.io import read_model_config
    from ...runs import resolve_checkpoint

    d = resolve_checkpoint(base)
    if not (d / TOKENIZER).is_file():
        raise UserError(f"the base {d} has no {TOKENIZER}: fine-tuning reads text with the base's tokenizer")
    meta = json.loads((d / "config.json").read_text())
    bos = eos = None
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        try:
            t = json.loads(tc.read_text())
            bos, eos = (v.get("content") if isinstance(v, dict) else v
                        for v in (t.get("bos_token"), t.get("eos_token")))
        except (json.JSONDecodeError, AttributeError):
            pass
    hf = meta.get("hf") if isinstance(meta.get("hf"), dict) else None
    return Base(d, read_model_config(d), (d / TOKENIZER).read_text(), read_chat_template(d), bos, eos, hf)


def resolve_config(args, s: dict, saved: Config | None, base: Base, vocab_size: int) -> Config:
    """The saved config when resuming, else the base's shape (its vocabulary grown to
    ``vocab_size``) with fine-tuning defaults, or the preset; the overrides on top."""
    from ...config import merge_dict, resolve
    from ...train.run import vocab_is_explicit

    base_cfg = None
    if base.cfg is not None:
        base_cfg = dataclasses.replace(base.cfg, vocab_size=max(base.cfg.vocab_size, vocab_size))
    if saved is not None and not (args.preset or args.config):
        cfg = resolve(overrides=args.overrides, base=saved)
    elif base_cfg is not None:
        start = merge_dict(Config(), FINETUNE_DEFAULTS, "fine-tuning defaults")
        start.model = base_cfg
        cfg = resolve(config_file=args.config, overrides=args.overrides, base=start)
    else:
        cfg = resolve(preset=s["preset"], config_file=args.config, overrides=args.overrides)
        if not vocab_is_explicit(args):
            cfg.model.vocab_size = vocab_size
    if base_cfg is not None:
        diffs = [f"model.{k} is {getattr(base_cfg, k)!r} in the base, {getattr(cfg.model, k)!r} here"
                 for k in vars(base_cfg) if k != "dropout" and getattr(base_cfg, k) != getattr(cfg.model, k)]
        if diffs:
            raise ConfigError(f"--base {s['base']} fixes the model's shape ({'; '.join(diffs)}): drop those "
                              f"--model.* settings (only --model.dropout may change)")
    if vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is "
                          f"{cfg.model.vocab_size}: set --model.vocab_size={vocab_size} or more")
    if cfg.parallel.pp > 1:
        raise ConfigError("fine-tuning trains with data or tensor parallelism; use --parallel.pp=1")
    if cfg.lora.r > 0 and base.dir is None:
        raise ConfigError("LoRA adapts a trained model: pass --base MODEL_DIR (not --preset)")
    if args.resume:
        cfg.checkpoint.resume = args.resume
    return cfg.validate()


def split_val(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, val): a fixed shuffle's ``fraction`` validates (at least one example each)."""
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), not {fraction}")
    if len(items) < 2:
        raise UserError("a single example cannot be split into training and validation: pass --val FILE")
    perm = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    return [items[i] for i in sorted(perm[n_val:])], [items[i] for i in sorted(perm[:n_val])]


def max_length_of(s: dict, cfg: Config) -> int:
    n = s.get("max_length") or cfg.model.block_size
    if not 2 <= n <= cfg.model.block_size:
        raise UserError(f"--max-length must be between 2 and the model's block_size {cfg.model.block_size}")
    return n


# ----------------------------------------------------------------------------- the model directory

@dataclass
class ModelFiles:
    """The (extended) tokenizer and what every model directory of the run carries besides the weights."""
    tokenizer_json: str
    new_ids: list[int] = field(default_factory=list)  # ids of tokens added to the base's tokenizer
    n_old: int = 0  # the base tokenizer's size (rows that count in the new rows' mean)
    files: dict = field(default_factory=dict)  # name -> text (chat_template.jinja, ...)
    meta: dict = field(default_factory=dict)  # config.json entries ("task", "hf")


def build_gpt(base: Base, cfg: Config, mf: ModelFiles):
    """The base's weights, the new tokens' rows at the mean of the old ones."""
    from ...model.gpt import GPT
    from ...model.io import load_model_dir, load_state_dict_into, model_state_dict
    from .vocab import grow_vocab

    src = load_model_dir(base.dir, model_cfg=dataclasses.replace(base.cfg, dropout=cfg.model.dropout),
                         allow_quantized=False)
    if cfg.model.vocab_size == src.cfg.vocab_size and not mf.new_ids:
        return src
    sd = grow_vocab(model_state_dict(src), src.cfg, cfg.model.vocab_size, mf.new_ids, mf.n_old)
    gpt = GPT(cfg.model)
    load_state_dict_into(gpt, sd, source=f"{base.dir} (vocabulary grown to {cfg.model.vocab_size})")
    return gpt


def lora_base(out: Path, base: Base, cfg: Config, mf: ModelFiles, resume_from, ctx) -> tuple:
    """``(gpt, base_dir)`` of a LoRA run. With new tokens the frozen base is the grown model, written
    once to ``RUN_DIR/base`` so that the adapters' base can be loaded (and its hash checked)."""
    from ...lora import lora_base_dir
    from ...model.io import load_model_dir, save_model_dir
    from ...model.manifest import write_manifest
    from .files import write_files

    if resume_from is not None:
        d = lora_base_dir(cfg.lora, resume_from, None)
        return load_model_dir(d, model_cfg=cfg.model), d
    if cfg.model.vocab_size == base.cfg.vocab_size and not mf.new_ids:
        d = lora_base_dir(cfg.lora, None, base.dir)
        return load_model_dir(d, model_cfg=cfg.model), d
    gpt = build_gpt(base, cfg, mf)
    d = out / "base"
    if ctx.is_main:
        save_model_dir(gpt, d, mf.tokenizer_json, extra={**mf.meta, "source": str(base.dir)}, manifest=False)
        write_files(d, mf.files)
        write_manifest(d)
    ctx.barrier()
    return gpt, d


# ----------------------------------------------------------------------------- the run

def train_lm_task(args, command: str, s: dict, cfg: Config, saved: Config | None, base: Base, mf: ModelFiles,
                  train: list, val: list, record: RunRecord, packing: bool, describe: str = "",
                  fill: int = 0, before_train=None, extra_summary: dict | None = None) -> int:
    """Train encoded examples (:class:`~scalelm.tasks.sft.encode.Encoded`) on the Trainer; prints the summary."""
    from tokenizers import Tokenizer

    from ...data.tokenizer import vocab_size_of
    from ...train.model_io import ModelIO
    from ...train.run import open_run, report_run
    from ...train.trainer import Trainer, batch_geometry
    from .batches import make_batches
    from .files import TemplateFiles
    from .objective import make_evaluate_fn, sft_loss

    out = Path(args.out)
    max_length = max_length_of(s, cfg)
    data = TrainerData(mf.tokenizer_json, vocab_size_of(Tokenizer.from_str(mf.tokenizer_json)))
    with open_run(out, cfg, record, saved, f"finetune {command}") as (ctx, resume_from):
        if ctx.is_main:  # first: what follows may write into RUN_DIR, which must then count as a run
            ts.write_run_config(out, cfg, record)
            atomic_write_text(out / TASK_FILE, json.dumps(s, indent=2) + "\n")
            if before_train is not None:
                before_train(out)
        ctx.barrier()
        torch.manual_seed(cfg.train.seed)
        gpt, base_dir = None, base.dir
        if base.dir is not None:
            if cfg.lora.r > 0:
                gpt, base_dir = lora_base(out, base, cfg, mf, resume_from, ctx)
            else:
                gpt = build_gpt(base, cfg, mf)
        B, accum = batch_geometry(cfg, ctx.dp_world)
        batches = make_batches(train, packing, B, accum, max_length, dp_rank=ctx.dp_rank, dp_world=ctx.dp_world,
                               seed=cfg.train.seed, fill=fill, device=ctx.device)
        trainer = Trainer(cfg, data, out, ctx=ctx, model=gpt, resume_from=resume_from, batches=batches,
                          loss_fn=sft_loss, evaluate_fn=make_evaluate_fn(val, B, fill), model_io=ModelIO(),
                          base_dir=base_dir,  # outermost, so LoRA's adapter files get the template files too
                          wrap_model_io=lambda io: TemplateFiles(io, mf.files, mf.meta))
        if trainer.is_main:
            fill_note = f", {batches.fill_ratio():.0%} of each window filled" if packing else ""
            print(f"{command}: {len(train)} training examples, {len(val)} validation{describe}; packing "
                  f"{'on' if packing else 'off'}{fill_note}", file=sys.stderr)
        summary = trainer.fit()
        elapsed = summary.get("elapsed_s") or 0
        sup_epoch = sum(e.n_supervised for e in train)
        summary.update(task=command, packing="on" if packing else "off", train_examples=len(train),
                       val_examples=len(val), real_tokens=batches.tokens, supervised_tokens=batches.supervised_tokens,
                       supervised_tokens_per_s=batches.supervised_tokens / elapsed if elapsed else None,
                       epochs=round(batches.supervised_tokens / max(1, sup_epoch), 4),
                       **(extra_summary or {}), best_dir=str(out / "best") if trainer.best_step else None)
    return report_run(trainer, summary)
