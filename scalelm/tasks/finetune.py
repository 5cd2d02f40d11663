"""``scalelm finetune TASK``: task fine-tuning recipes, one module each, all on the one Trainer.

    scalelm finetune classify --base MODEL_DIR --train FILE --val FILE --out RUN_DIR

A task module provides ``add_<task>_parser(p)`` and ``run_<task>(args)``; add it to ``TASKS``.
"""

from __future__ import annotations

import argparse
import importlib

# task -> (module, one-line help)
TASKS: dict[str, tuple[str, str]] = {
    "classify": ("scalelm.tasks.classify.train", "a text classifier: a linear head on a GPT (full or LoRA)"),
    "sft": ("scalelm.tasks.sft.train", "instruction tuning: chat template, loss on replies, packing (full or LoRA)"),
    "translate": ("scalelm.tasks.translate.train", "translation: a decoder-only GPT on 'source => target', or an encoder-decoder "
                  "(--preset transformer-small)"),
    "summarize": ("scalelm.tasks.translate.train", "summarization: the translation recipe on (text, summary) pairs, "
                  "from JSONL fields or line-aligned files, decoder-only or encoder-decoder"),
    "tokens": ("scalelm.tasks.tokens.train", "token classification (NER, POS): a linear head on every position of a GPT "
               "or an encoder, from CoNLL, CoNLL-U or JSONL (full or LoRA)"),
    "dpo": ("scalelm.tasks.preference.train", "preference tuning: DPO, IPO, conservative DPO or SimPO on chosen/rejected "
            "pairs (full or LoRA)"),
}


def add_finetune_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True,
                           help="; ".join(f"{n}: {h}" for n, (_, h) in TASKS.items()))
    for name, (module, help_) in TASKS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not (module == e.name or module.startswith(f"{e.name}.")):
                raise
            continue  # a task still being written: the others work
        getattr(mod, f"add_{name}_parser")(sub.add_parser(name, help=help_, description=help_))


def run_finetune(args: argparse.Namespace) -> int:
    module = importlib.import_module(TASKS[args.task][0])
    return int(getattr(module, f"run_{args.task}")(args) or 0)
