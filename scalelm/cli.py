"""The ``scalelm`` command line: one subcommand per stage, each defined in its stage's module.

A stage module provides ``add_<name>_parser(parser)`` and ``run_<name>(args) -> int``; it is
imported only when its subcommand runs, so ``scalelm --help`` stays fast. Subcommands that
build a training config set ``accepts_overrides=True``: their leftover ``--section.key=value``
arguments arrive as ``args.overrides`` for :func:`scalelm.config.resolve`; every other command
refuses them with a message that says which commands take them. The options the commands share
are spelled alike (:mod:`scalelm.cliargs`).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import Optional

from . import __version__
from .errors import UserError

# name -> (module, one-line help); the order is the order of the pipeline
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("scalelm.demo", "prepare a corpus, train a small model for a few minutes, generate text"),
    "prepare": ("scalelm.data.prepare", "train a tokenizer and write token shards from a corpus"),
    "train": ("scalelm.train.run", "train a model (one process, or many under torchrun)"),
    "finetune": ("scalelm.tasks.finetune", "fine-tune a model for a task (classify, tokens, sft, translate, summarize, "
                 "dpo), fully or with LoRA"),
    "eval": ("scalelm.evaluate.lm", "loss, perplexity and bits per byte of a checkpoint on a data split"),
    "generate": ("scalelm.generate.cli", "generate text from a checkpoint"),
    "classify": ("scalelm.tasks.classify.cli", "label texts with a classifier (JSON lines of label and probabilities)"),
    "tag": ("scalelm.tasks.tokens.cli", "tag the words of a CoNLL, CoNLL-U or JSONL file with a token tagger (NER, POS), "
            "line for line"),
    "translate": ("scalelm.tasks.translate.cli", "translate a file with a translation model, one line per line"),
    "summarize": ("scalelm.tasks.translate.cli", "summarize texts (lines or JSONL records) with a summarization model, "
                  "one summary per line"),
    "chat": ("scalelm.generate.chat", "interactive multi-turn chat with a checkpoint"),
    "serve": ("scalelm.serve.cli", "an OpenAI-compatible HTTP server for a checkpoint"),
    "inspect": ("scalelm.interp.cli", "per-token surprisal, top predictions, logit lens and attention of a text "
                "(table, JSON, HTML report)"),
    "trace": ("scalelm.interp.cli", "activation patching: which layers, positions and heads carry a prediction"),
    "steer": ("scalelm.interp.cli", "build a steering vector from two sets of prompts (for generate --steer)"),
    "convert": ("scalelm.convert", "convert checkpoints to and from Hugging Face transformers and PEFT"),
    "push": ("scalelm.publish", "publish a model on the Hugging Face Hub, with a model card from its run"),
    "merge": ("scalelm.lora.merge", "fold a LoRA run's adapters into a plain model directory"),
    "export": ("scalelm.compress.export", "consolidate a sharded (DCP) checkpoint into a model directory, or "
               "export a model to ONNX (--format onnx)"),
    "plot": ("scalelm.analysis.plots", "plot loss and throughput curves of a run"),
    "plan": ("scalelm.analysis.planner", "memory, FLOPs and time per layout before you train"),
    "sweep": ("scalelm.analysis.sweep.cli", "run a scaling-law sweep within a compute budget"),
    "report": ("scalelm.analysis.sweep.cli", "fit scaling laws and plot a sweep's results"),
    "prune": ("scalelm.compress.prune", "prune a model: magnitude, Wanda, SparseGPT (N:M too) or structured"),
    "distill": ("scalelm.compress.distill", "train a student on a teacher's next-token distributions"),
    "quantize": ("scalelm.compress.quantize", "weight-only int8/int4 quantization (round-to-nearest or GPTQ)"),
    "presets": ("scalelm.cli", "list the named model presets with their parameter counts"),
}


# the commands whose parsers set accepts_overrides=True (tests/test_cli_vocabulary.py checks the list)
CONFIG_COMMANDS = ("train", "finetune", "distill", "sweep", "plan")


def add_presets_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_presets(args: argparse.Namespace) -> int:
    import json

    import torch

    from .config import Config, apply_preset
    from .model.build import build_model
    from .presets import PRESETS

    rows = []
    for name in PRESETS:
        cfg = apply_preset(Config(), name).model
        with torch.device("meta"):  # shapes only: no memory, no init cost
            m = build_model(cfg)
        rows.append(dict(preset=name, params=m.num_params(), non_embedding=m.num_params(False),
                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.kv_heads,
                         n_embd=cfg.n_embd, block_size=cfg.block_size, vocab_size=cfg.vocab_size))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<18}{'params':>16}{'non-emb':>16}  layers heads kv  width  ctx    vocab")
    for r in rows:
        print(f"{r['preset']:<18}{r['params']:>16,}{r['non_embedding']:>16,}  {r['n_layer']:>6} "
              f"{r['n_head']:>5} {r['n_kv_head']:>3} {r['n_embd']:>6} {r['block_size']:>5} {r['vocab_size']:>8}")
    # not a shape: chosen per run from the time budget, the data and this machine's measured speed
    print(f"{'auto':<18}{'for the budget':>16}  `scalelm train --preset auto --train.max_minutes=M` "
          f"(scalelm/train/auto.py)")
    return 0


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scalelm",
        description="Pretrain, evaluate, generate with and scale Transformer LMs, from 1 CPU to a cluster.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items())
        + "\n\nRun `scalelm COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"scalelm {__version__}")
    p.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    return p


def _suggest_option(parser: argparse.ArgumentParser, bad: str) -> str:
    opts = [o for a in parser._actions for o in a.option_strings]
    close = difflib.get_close_matches(bad.split("=")[0], opts, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _is_override(arg: str) -> bool:
    """``--section.key=value`` or ``--section.key value``: a dotted config key."""
    return arg.startswith("--") and "." in arg[2:].split("=", 1)[0]


def command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The parser of ``scalelm NAME`` and the module that runs it (imported now)."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"scalelm {name}", description=COMMANDS[name][1])
    getattr(module, f"add_{name}_parser")(parser)
    return parser, module


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] == "--version":
        top.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        top.error(f"unknown command '{name}'{hint}")
    parser, module = command_parser(name)
    args, leftover = parser.parse_known_args(rest)
    if leftover:
        if getattr(args, "accepts_overrides", False):
            args.overrides = leftover
        elif any(map(_is_override, leftover)):
            parser.error(f"{next(filter(_is_override, leftover))}: `scalelm {name}` builds no training config, so it "
                         f"takes no --section.key=value overrides (they go to {', '.join(CONFIG_COMMANDS)})")
        else:
            parser.error(f"unrecognized arguments: {' '.join(leftover)}{_suggest_option(parser, leftover[0])}")
    else:
        args.overrides = []
    from .quiet import quiet_known_noise

    quiet_known_noise()
    try:
        return int(getattr(module, f"run_{name}")(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
