"""What every ``scalelm finetune TASK`` starts from: a base model directory or a preset's shape.

The options every task shares (``--base``/``--preset``, ``--tokenizer``, ``--config``, ``--out``,
``--resume``, ``--max-length``), reading the base (its config, tokenizer, chat template and special
ids) and the task's config (resolved by the runner's one rule: the base fixes the shape). Loading
the base's weights with a grown vocabulary is :mod:`scalelm.tasks.sft.recipe`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import Config, ConfigError
from ..errors import UserError
from ..checkpoint.names import CONFIG, TOKENIZER, TOKENIZER_CONFIG
from ..train.recipe import resolve_run_config

# fine-tuning a trained model (--base, not --preset) starts from gentler defaults than pretraining
FINETUNE_DEFAULTS = {"optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 20},
                     "train": {"max_steps": 500, "eval_every": 50, "save_every": 100}}


def add_model_source_args(p: argparse.ArgumentParser, tokenizer_help: str, max_length_help: str =
                          "longest example in tokens (default: the model's block_size)") -> None:
    """Options every fine-tuning command shares."""
    src = p.add_argument_group("model (one of)")
    src.add_argument("--base", metavar="MODEL_DIR", help=BASE_HELP)
    src.add_argument("--preset", help="train a model of this preset from scratch")
    p.add_argument("--tokenizer", metavar="FILE|DIR", help=tokenizer_help)
    p.add_argument("--config", help="a TOML config file (same keys as the dotted overrides)")
    p.add_argument("--out", required=True, help="the run directory (checkpoints, metrics.jsonl, best/)")
    p.add_argument("--resume", help="resume from this checkpoint or RUN_DIR instead of --out's latest")
    p.add_argument("--max-length", type=int, help=max_length_help)
    p.epilog = "Any config field is an override: --optim.lr=1e-4 --train.max_steps=500 --lora.r=8 ..."
    p.set_defaults(accepts_overrides=True)


# ----------------------------------------------------------------------------- the starting model

BASE_HELP = ("fine-tune this model directory (or RUN_DIR's latest), or a Hugging Face model hf:ORG/NAME[@REVISION] "
             "(downloaded through the Hugging Face cache and converted once)")


def hub_cache_root() -> Path:
    """Where Hub models converted for ``--base hf:...`` are kept: ``$SCALELM_CACHE``, else
    ``$XDG_CACHE_HOME/scalelm``, else ``~/.cache/scalelm``."""
    if os.environ.get("SCALELM_CACHE"):
        return Path(os.environ["SCALELM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scalelm"


def hub_base_dir(spec: str) -> tuple[Path, str]:
    """The scalelm model directory of a Hub model ``hf:ORG/NAME[@REVISION]``, and its pinned id
    ``hf:ORG/NAME@COMMIT``.

    The snapshot comes through ``huggingface_hub`` (the user's token and cache; HF_HUB_OFFLINE=1
    reads the cache only) and is converted once, safetensors only, into a folder named by its
    commit: a moved branch converts anew, a pinned commit never twice. A lock keeps two runs that
    start together from converting the same model at once."""
    from filelock import FileLock

    from ..checkpoint.names import LOCK
    from ..data.hub import download_hub_model
    from ..model.hf import import_hf_dir
    from ..runs import is_scalelm_model_dir

    snapshot, source = download_hub_model(spec)  # source: hf:ORG/NAME@COMMIT
    repo = source.removeprefix("hf:").rpartition("@")[0]
    out = hub_cache_root() / "hub" / repo.replace("/", "--") / snapshot.name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + LOCK):  # COMMIT.lock beside the folder
        if not is_scalelm_model_dir(out):
            print(f"converting {source} into {out} (once)", file=sys.stderr)
            import_hf_dir(snapshot, out, source=source, safetensors_only=True)
    return out, source


@dataclass
class Base:
    """The model training starts from: a directory (``--base``) or a preset's shape."""

    dir: Optional[Path]
    cfg: object  # the base's ModelConfig (None for a preset)
    tokenizer_json: str
    template: Optional[str] = None  # the base's own chat template
    bos: Optional[str] = None  # bos/eos strings of the base's tokenizer_config.json
    eos: Optional[str] = None
    hf: Optional[dict] = None  # config.json's "hf" entry (an imported model's special ids)


def tokenizer_json_of(spec: str) -> str:
    """A tokenizer.json's text: a file, a directory holding one, or ``byte`` (raw UTF-8 bytes)."""
    from ..data.tokenizer import byte_tokenizer, load_tokenizer

    return byte_tokenizer().to_str() if spec == "byte" else load_tokenizer(spec).to_str()


def read_base(base: str, supported: tuple = (), command: str = "scalelm finetune",
              settings: Optional[dict] = None) -> Base:
    """The base of ``--base``; ``supported``: the model kinds (:mod:`scalelm.checkpoint.kinds`) the
    task starts from (empty: any), refused in one line before anything is loaded. A Hub id is
    pinned to the commit it resolved to in ``settings`` (the run's task.json), so that a resumed
    run keeps its base when the branch moves."""
    from ..checkpoint.kinds import ENCDEC, require_kind
    from ..generate.generator import read_chat_template
    from ..model.io import read_model_config
    from ..runs import resolve_checkpoint

    if base.startswith("hf:"):
        d, pinned = hub_base_dir(base)
        if settings is not None:
            settings["base"] = pinned
    else:
        d = resolve_checkpoint(base)
    if supported:
        require_kind(d, f"{command} --base", supported,
                     hint={ENCDEC: "an encoder-decoder trains further with `scalelm finetune translate --base`"})
    if not (d / TOKENIZER).is_file():
        raise UserError(f"the base {d} has no {TOKENIZER}: fine-tuning reads text with the base's tokenizer")
    meta = json.loads((d / CONFIG).read_text())
    bos = eos = None
    tc = d / TOKENIZER_CONFIG
    if tc.is_file():
        try:
            t = json.loads(tc.read_text())
            bos, eos = (v.get("content") if isinstance(v, dict) else v
                        for v in (t.get("bos_token"), t.get("eos_token")))
        except (json.JSONDecodeError, AttributeError):
            pass
    hf = meta.get("hf") if isinstance(meta.get("hf"), dict) else None
    return Base(d, read_model_config(d), (d / TOKENIZER).read_text(), read_chat_template(d), bos, eos, hf)


def base_or_tokenizer(s: dict, needs: str, supported: tuple = (), command: str = "scalelm finetune") -> Base:
    """The base of ``--base`` (of a kind in ``supported``), or a from-scratch start on ``--tokenizer``
    (``needs`` names what it may be)."""
    if s["base"]:
        return read_base(s["base"], supported, command, settings=s)
    if not s.get("tokenizer"):
        raise UserError(f"--preset {s['preset']} trains from scratch and needs a tokenizer: --tokenizer {needs}")
    return Base(None, None, tokenizer_json_of(s["tokenizer"]))


def task_config(args, s: dict, saved: Optional[Config], base: Base, vocab_size: int,
                defaults: Optional[dict] = FINETUNE_DEFAULTS) -> Config:
    """The saved config when resuming, else the base's shape (its vocabulary grown to ``vocab_size``)
    on ``defaults``, or the preset; the overrides on top. Only dropout may differ from the base."""
    model = None
    if base.cfg is not None:
        model = dataclasses.replace(base.cfg, vocab_size=max(base.cfg.vocab_size, vocab_size))
    cfg = resolve_run_config(args, saved, preset=s["preset"], model=model, fixed=f"--base {s['base']}",
                             defaults=defaults, vocab_size=vocab_size,
                             reuse_saved=saved is not None and not (getattr(args, "preset", None) or args.config))
    if cfg.lora.r > 0 and base.dir is None:
        raise ConfigError("LoRA adapts a trained model: pass --base MODEL_DIR (not --preset)")
    return cfg


def split_val(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, val): a fixed shuffle's ``fraction`` validates (at least one example each)."""
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), not {fraction}")
    if len(items) < 2:
        raise UserError("a single example cannot be split into training and validation: pass --val FILE")
    perm = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    return [items[i] for i in sorted(perm[n_val:])], [items[i] for i in sorted(perm[:n_val])]


def max_length_of(s: dict, cfg: Config, least: int = 2) -> int:
    n = s.get("max_length")
    if n is None:
        return cfg.model.block_size
    if not least <= n <= cfg.model.block_size:
        raise UserError(f"--max-length must be between {least} and the model's block_size {cfg.model.block_size}, "
                        f"not {n}")
    return n


# ----------------------------------------------------------------------------- what a task model carries

@dataclass
class ModelFiles:
    """The (extended) tokenizer and what every model directory of the run carries besides the weights."""

    tokenizer_json: str
    new_ids: list[int] = field(default_factory=list)  # ids of tokens added to the base's tokenizer
    n_old: int = 0  # the base tokenizer's size (rows that count in the new rows' mean)
    files: dict = field(default_factory=dict)  # name -> text (chat_template.jinja, ...)
    meta: dict = field(default_factory=dict)  # config.json entries ("task", "hf")
