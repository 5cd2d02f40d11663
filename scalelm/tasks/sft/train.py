"""``scalelm finetune sft``: instruction tuning through the one Trainer.

    scalelm finetune sft --base MODEL_DIR --data FILE --out RUN_DIR [--val FILE | --val-fraction F]
                         [--template chatml|alpaca|plain|FILE.jinja] [--prompt-field F --completion-field F]
                         [--packing on|off] [--loss-on completion|all] [--section.key=value ...]
    scalelm finetune sft --preset NAME --tokenizer FILE|DIR|byte --data FILE --out RUN_DIR ...

Conversations are rendered with the chat template (its special tokens are added to the tokenizer
and the model, new rows at the mean of the old), and only reply tokens count in the loss. The run
directory is a training run like ``scalelm train``'s (exact resume, ``best/`` by validation reply
loss, time budget, torchrun, ``--lora.r``); every model directory it writes carries the template,
so ``scalelm chat RUN_DIR/best`` talks the way the model was trained.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ...config import ConfigError
from ...data.chat_template import ChatTemplate as Template
from ...errors import UserError
from ...train.recipe import RunRecord, TokenizerData, run_recipe
from ..base import Base, ModelFiles, add_model_source_args, base_or_tokenizer, max_length_of, split_val, task_config
from ..settings import TASK_FILE, read_task_file, settings
from .encode import LOSS_ON, Encoder, require_supervision
from .formats import read_conversations
from .recipe import ExamplesPlan, ExamplesRecipe
from .template import BUILTIN, check_special_tokens, load_template, special_tokens_of

FIXED = ("base", "preset", "tokenizer", "data", "val", "val_fraction", "template", "special_tokens", "prompt_field",
         "completion_field", "packing", "max_length", "loss_on")
DEFAULTS = {"packing": "on", "loss_on": "completion", "val_fraction": 0.05}


def add_packing_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--packing", choices=["on", "off"], help="pack several examples per window with a document "
                   "mask (on, the default: as fast or faster at a slightly lower loss in the README's measurement) "
                   "or one example per row, length-grouped and padded (off)")


def add_sft_parser(p: argparse.ArgumentParser) -> None:
    add_model_source_args(p, "with --preset: a tokenizer.json, a DATA_DIR / model directory holding one, or "
                             "'byte' (with --base the base's tokenizer is extended)")
    add_packing_arg(p)
    p.add_argument("--data", metavar="FILE", help="training examples: Alpaca JSON/JSONL, prompt/completion JSONL, "
                   "chat 'messages' JSONL, or any two fields with --prompt-field/--completion-field")
    p.add_argument("--val", metavar="FILE", help="validation examples (same formats)")
    p.add_argument("--val-fraction", type=float, help="without --val: hold out this fraction of --data "
                   "(default 0.05, a fixed shuffle)")
    p.add_argument("--template", help=f"chat template: {', '.join(BUILTIN)} or a Jinja file (default: the base's "
                   "own template if it has one, else chatml)")
    p.add_argument("--special-token", dest="special_tokens", action="append", metavar="TOKEN",
                   help="a token the template needs as one id (<|...|> literals in the template are found "
                        "automatically); repeatable")
    p.add_argument("--prompt-field", help="the JSON field holding the prompt (e.g. question)")
    p.add_argument("--completion-field", help="the JSON field holding the reply (e.g. answer)")
    p.add_argument("--loss-on", choices=LOSS_ON, help="which tokens count in the loss: the replies (default) or "
                   "every token (prompts too)")


@dataclass
class Chat:
    """The extended tokenizer and the template it is rendered with."""
    tokenizer: object
    template: Template
    specials: list[str]
    files: ModelFiles


def prepare_chat(base: Base, spec: str | None, extra_specials: list[str] | None, block_size: int) -> Chat:
    """Load the template, add its special tokens (and end-of-text if missing) to the tokenizer, and
    say what the model directory records: the template files and the ids generation stops at."""
    check_special_tokens(extra_specials)
    from tokenizers import Tokenizer

    from ...data.tokenizer import EOT, special_ids, vocab_size_of
    from .files import template_files, tokenizer_config
    from .vocab import extend_tokenizer

    if spec is None:
        name, text = ("base", base.template) if base.template else load_template("chatml")
    else:
        name, text = load_template(spec)
    specials = special_tokens_of(text)
    specials += [t for t in (extra_specials or []) if t not in specials]
    tok0 = Tokenizer.from_str(base.tokenizer_json)
    add = specials + ([EOT] if special_ids(tok0)[0] is None else [])  # a reply must end in a stop token
    tok_json, new_ids = extend_tokenizer(base.tokenizer_json, add)
    tok = Tokenizer.from_str(tok_json)
    eot, pad = special_ids(tok)
    eot_text = tok.id_to_token(eot)
    bos, eos = base.bos or eot_text, base.eos or eot_text
    template = Template(text, bos, eos, name)
    stops = {eot} | {tok.token_to_id(t) for t in template.end_of_turn(specials)}
    hf = dict(base.hf or {})
    old = hf.get("eos_token_id")
    hf["eos_token_id"] = sorted(set(old if isinstance(old, list) else [] if old is None else [old]) | stops)
    hf.setdefault("bos_token_id", tok.token_to_id(bos) if tok.token_to_id(bos) is not None else eot)
    tc = tokenizer_config(bos, eos, specials, block_size, tok.id_to_token(pad) if pad is not None else None)
    mf = ModelFiles(tok_json, new_ids, vocab_size_of(tok0), template_files(text, tc), {"hf": hf})
    return Chat(tok, template, specials, mf)


def encode_splits(s: dict, enc: Encoder, seed: int):
    train_convs = read_conversations(s["data"], s["prompt_field"], s["completion_field"])
    if s["val"]:
        val_convs = read_conversations(s["val"], s["prompt_field"], s["completion_field"])
    else:
        train_convs, val_convs = split_val(train_convs, s["val_fraction"], seed)
    train, _, rep = enc.encode_all(train_convs)
    rep.warn("training", enc.max_length)
    require_supervision(rep, s["data"], enc.max_length)
    # validation measures the replies whatever the training loss counts (--loss-on all compares fairly)
    val, _, vrep = Encoder(enc.tokenizer, enc.template, enc.max_length).encode_all(val_convs)
    vrep.warn("validation", enc.max_length)
    if not val:
        raise UserError(f"no validation example has a reply token within {enc.max_length} tokens: pass another "
                        f"--val or raise --max-length")
    return train, val, rep


class SFTRecipe(ExamplesRecipe):
    def __init__(self):
        super().__init__("finetune sft")

    def prepare(self, args, out: Path, saved) -> ExamplesPlan:
        from tokenizers import Tokenizer

        from ...data.tokenizer import vocab_size_of

        s = settings(args, read_task_file(out), FIXED, ("base", "tokenizer", "data", "val"), DEFAULTS, "sft")
        if s["template"] is not None and s["template"] not in BUILTIN:
            s["template"] = str(Path(s["template"]).resolve())
        if not s["data"]:
            raise UserError("no training data: pass --data FILE (Alpaca JSON/JSONL, prompt/completion or chat JSONL)")
        from ...checkpoint.kinds import FLOAT_LANGUAGE_MODELS

        base = base_or_tokenizer(s, "FILE (a tokenizer.json), a DATA_DIR / model directory holding one, or 'byte'",
                                 FLOAT_LANGUAGE_MODELS, "scalelm finetune sft")
        chat = prepare_chat(base, s["template"], s["special_tokens"], 0)
        vocab = vocab_size_of(chat.tokenizer)
        cfg = task_config(args, s, saved, base, vocab)
        if cfg.parallel.pp > 1:
            raise ConfigError("fine-tuning trains with data or tensor parallelism; use --parallel.pp=1")
        chat = prepare_chat(base, s["template"], s["special_tokens"], cfg.model.block_size)
        max_length = max_length_of(s, cfg)
        train, val, rep = encode_splits(s, Encoder(chat.tokenizer, chat.template, max_length, s["loss_on"]),
                                        cfg.train.seed)
        chat.files.meta["task"] = {"name": "sft", "template": chat.template.name, "special_tokens": chat.specials,
                                   "loss_on": s["loss_on"], "prompt_field": s["prompt_field"],
                                   "completion_field": s["completion_field"], "max_length": max_length}
        tok_json = chat.files.tokenizer_json
        pad = Tokenizer.from_str(tok_json).token_to_id("<|pad|>")
        added = f" (+{len(chat.files.new_ids)} tokens)" if chat.files.new_ids else ""
        return ExamplesPlan(
            cfg, TokenizerData(tok_json, vocab), RunRecord.of_files(s["data"], tok_json, vocab, s["data"], s["val"]),
            {TASK_FILE: json.dumps(s, indent=2) + "\n"}, out=out, task="sft", settings=s, base=base,
            model_files=chat.files, train=train, val=val, max_length=max_length, packing=s["packing"] == "on",
            fill=pad or 0,
            about=(f" ({rep.supervised_tokens:,} reply tokens of {rep.tokens:,}, {len(rep.dropped)} dropped, "
                   f"{rep.truncated} truncated); template {chat.template.name}{added}"),
            extra_summary={"template": chat.template.name, "loss_on": s["loss_on"],
                           "dropped_examples": len(rep.dropped), "truncated_examples": rep.truncated,
                           "reply_tokens_per_epoch": rep.supervised_tokens})


def run_sft(args: argparse.Namespace) -> int:
    return run_recipe(SFTRecipe(), args)
