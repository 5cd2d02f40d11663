"""One vocabulary across every command (scalelm/cliargs.py), checked on the real parsers of scalelm/cli.py.

The walk covers every subcommand (finetune's tasks too), so a new command that spells a shared
concept its own way fails here: the old spellings are hidden aliases (they work, with one warning
line), ``--dtype`` takes the config's precision values, the positional model is ``MODEL``, every
command that builds a training config takes ``--section.key=value`` overrides (the others refuse
them by name), and every command that writes a directory has ``--overwrite``.
"""

import argparse
import json
import re

import pytest

from scalelm import cli
from scalelm.cliargs import DTYPES

# the spellings the vocabulary replaced: accepted for one release, never shown
BANNED = {"--precision", "--max-batch", "--micro-batch", "--global-batch", "--calib-batch", "--calib-seq-len",
          "--block-size"}
# old spelling -> the option that replaced it, with a value to give (one case per command that has it)
DEPRECATED = [
    ("eval", ["M"], "--precision", "--dtype", "bf16", "bf16"),
    ("classify", ["M"], "--precision", "--dtype", "bf16", "bf16"),
    ("plan", ["--preset", "gpt2-124m"], "--precision", "--dtype", "fp16", "fp16"),
    ("plan", ["--preset", "gpt2-124m"], "--micro-batch", "--batch-size", "2", 2),
    ("plan", ["--preset", "gpt2-124m"], "--global-batch", "--global-batch-size", "16", 16),
    ("serve", ["M"], "--max-batch", "--batch-size", "4", 4),
    ("prepare", ["--input", "a", "--out", "b"], "--block-size", "--seq-len", "64", 64),
    ("prepare", ["--input", "a", "--out", "b"], "--dtype", "--token-dtype", "uint32", "uint32"),
    ("prune", ["M", "--method", "wanda", "--out", "o"], "--calib-seq-len", "--seq-len", "32", 32),
    ("prune", ["M", "--method", "wanda", "--out", "o"], "--calib-batch", "--batch-size", "4", 4),
    ("quantize", ["M", "--scheme", "int8", "--out", "o"], "--calib-seq-len", "--seq-len", "32", 32),
    ("quantize", ["M", "--scheme", "int8", "--out", "o"], "--calib-batch", "--batch-size", "4", 4),
]
OLD_DTYPE_VALUES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# the positional model argument: dest `model`, metavar MODEL, in exactly these commands
MODEL_COMMANDS = {"eval", "generate", "classify", "tag", "translate", "summarize", "chat", "serve", "convert", "merge", "export",
                  "prune", "quantize", "push", "inspect", "trace", "steer"}
OLD_MODEL_NAMES = {"ckpt", "checkpoint", "model_dir", "run", "RUN", "CKPT", "MODEL_DIR"}
# what each command's --out is: a directory it writes (refused when non-empty without --overwrite),
# a run directory it continues (train-like: an existing run is resumed), or files
DIRECTORY_WRITERS = {"prepare", "convert", "merge", "export", "prune", "quantize", "inspect", "trace"}
RUN_DIR_WRITERS = {"train", "finetune", "distill", "sweep", "demo"}
FILE_WRITERS = {"translate", "summarize", "plot", "steer", "tag"}
# "longest example in tokens" belongs to the fine-tuning tasks; a model's window is --seq-len
MAX_LENGTH_COMMANDS = {"finetune classify", "finetune sft", "finetune translate", "finetune summarize",
                       "finetune dpo", "finetune tokens"}


def _subparsers(p: argparse.ArgumentParser) -> dict:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


@pytest.fixture(scope="module")
def parsers() -> dict:
    """Every command's parser, built as `scalelm` builds it; finetune's tasks as "finetune TASK"."""
    out = {}
    for name in cli.COMMANDS:
        p, _ = cli.command_parser(name)
        out[name] = p
        for task, sub in _subparsers(p).items():
            out[f"{name} {task}"] = sub
    assert {"finetune classify", "finetune sft", "finetune translate"} <= set(out)
    return out


def _visible(p: argparse.ArgumentParser) -> list:
    return [a for a in p._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)]


def _options(p) -> set:
    return {o for a in _visible(p) for o in a.option_strings}


def _leaves(parsers: dict) -> dict:
    """The parsers that parse arguments (finetune itself only picks a task)."""
    return {n: p for n, p in parsers.items() if not _subparsers(p)}


def _command(name: str) -> str:
    return name.split()[0]


def test_no_old_spelling_is_shown(parsers):
    for name, p in parsers.items():
        assert not _options(p) & BANNED, name
        text = p.format_help()
        for old in BANNED:
            assert not re.search(rf"(?<![\w.-]){re.escape(old)}(?![\w-])", text), (name, old)


def test_dtype_takes_the_precision_values_everywhere(parsers):
    seen = set()
    for name, p in parsers.items():
        for a in _visible(p):
            assert a.dest != "precision", name
            if "--dtype" in a.option_strings:
                seen.add(name)
                assert set(a.choices) <= {"auto", *DTYPES}, (name, a.choices)
                assert {"fp32", "bf16"} <= set(a.choices), name
    assert {"eval", "generate", "chat", "serve", "classify", "convert", "export", "plan"} <= seen
    assert "prepare" not in seen  # its token files' integer type is another concept: --token-dtype


def test_the_model_argument_has_one_name(parsers):
    have = set()
    for name, p in parsers.items():
        for a in p._actions:
            if a.option_strings or isinstance(a, argparse._SubParsersAction):
                continue
            assert a.dest not in OLD_MODEL_NAMES and a.metavar not in OLD_MODEL_NAMES, (name, a.dest, a.metavar)
            if a.dest == "model":
                assert a.metavar == "MODEL" and "RUN" in a.help, name
                have.add(name)
    assert have == MODEL_COMMANDS


def test_batch_and_length_concepts_have_one_name_each(parsers):
    for name, p in _leaves(parsers).items():
        opts = _options(p)
        assert not {o for o in opts if re.fullmatch(r"--(\w+-)?batch", o)}, name  # --batch-size, not --x-batch
        if "--max-length" in opts:
            assert name in MAX_LENGTH_COMMANDS, name
            help_ = next(a.help for a in _visible(p) if "--max-length" in a.option_strings)
            assert help_.startswith("longest example in tokens"), name
        for a in _visible(p):
            if "--seq-len" in a.option_strings:
                assert "tokens per window" in a.help, name
    for name in MAX_LENGTH_COMMANDS:
        assert "--max-length" in _options(parsers[name])


def test_config_commands_take_overrides(parsers):
    takes = set()
    for name, p in _leaves(parsers).items():
        if p.get_default("accepts_overrides"):
            takes.add(_command(name))
        else:  # a command that reads a training config (file or preset) must take overrides too
            assert "--config" not in _options(p), name
    assert takes == set(cli.CONFIG_COMMANDS)


def _required_argv(p: argparse.ArgumentParser) -> list[str]:
    """The least that parses: every positional and required option with a placeholder."""
    argv = []
    for a in p._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if not a.option_strings and a.nargs != "?":
            argv.append("x")
        elif a.option_strings and a.required:
            argv += [a.option_strings[0], a.choices[0] if a.choices else "x"]
    return argv


def test_other_commands_refuse_overrides_by_name(parsers, capsys):
    for name, p in _leaves(parsers).items():
        if _command(name) in cli.CONFIG_COMMANDS:
            continue
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli.main([name, *_required_argv(p), "--model.n_layer=2"])
        err = capsys.readouterr().err
        assert e.value.code == 2, name
        assert f"--model.n_layer=2: `scalelm {name}` builds no training config" in err, (name, err)
        assert "takes no --section.key=value overrides" in err


def test_directory_writers_have_overwrite(parsers):
    for name, p in parsers.items():
        cmd = _command(name)
        if "--out" in _options(p):
            assert cmd in DIRECTORY_WRITERS | RUN_DIR_WRITERS | FILE_WRITERS, f"classify `{name}`'s --out here"
        if cmd in DIRECTORY_WRITERS:
            assert "--overwrite" in _options(p), name
    assert not DIRECTORY_WRITERS & RUN_DIR_WRITERS and not DIRECTORY_WRITERS & FILE_WRITERS


@pytest.mark.parametrize("command,base,old,new,value,want", DEPRECATED, ids=lambda x: x if isinstance(x, str) else None)
def test_old_spellings_still_work_and_warn(parsers, capsys, command, base, old, new, value, want):
    p = parsers[command]
    dest = p._option_string_actions[new].dest
    capsys.readouterr()
    args = p.parse_args([*base, old, value])
    assert getattr(args, dest) == want
    assert capsys.readouterr().err == f"warning: {old} is deprecated; use {new}\n"
    args = p.parse_args([*base, new, value])  # the new spelling: the same value, no warning
    assert getattr(args, dest) == want
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "convert"])
def test_old_dtype_values_still_work_and_warn(parsers, capsys, command):
    p = parsers[command]
    for old, new in OLD_DTYPE_VALUES.items():
        if new not in p._option_string_actions["--dtype"].choices:
            continue  # convert writes fp32 or bf16 only
        capsys.readouterr()
        assert p.parse_args(["M", "--dtype", old]).dtype == new
        assert capsys.readouterr().err == f"warning: --dtype {old} is deprecated; use --dtype {new}\n"


def test_old_spellings_give_the_same_plan(capsys):
    """End to end: `scalelm plan` with the old spellings prints what the new ones print, plus warnings."""
    def plan(*args):
        capsys.readouterr()
        assert cli.main(["plan", "--preset", "gpt2-124m", "--devices", "8", "--json", *args]) == 0
        out = capsys.readouterr()
        return json.loads(out.out), out.err

    new, err = plan("--batch-size", "2", "--global-batch-size", "32", "--dtype", "bf16")
    old, old_err = plan("--micro-batch", "2", "--global-batch", "32", "--precision", "bf16")
    assert old == new and "deprecated" not in err
    assert old_err.splitlines()[:3] == ["warning: --micro-batch is deprecated; use --batch-size",
                                        "warning: --global-batch is deprecated; use --global-batch-size",
                                        "warning: --precision is deprecated; use --dtype"]
    assert (new["micro_batch"], new["global_batch"], new["precision"]) == (2, 32, "bf16")


def test_prepare_refuses_an_existing_data_dir_without_overwrite(tmp_path, capsys):
    src = tmp_path / "c.txt"
    src.write_text("<|endoftext|>".join(f"document {i} " * 30 for i in range(20)))
    out = tmp_path / "data"

    def prepare(*extra):
        capsys.readouterr()
        rc = cli.main(["prepare", "--input", str(src), "--out", str(out), "--tokenizer", "byte", "--no-progress",
                       "--seq-len", "16", *extra])
        return rc, capsys.readouterr().err

    assert prepare()[0] == 0
    meta = (out / "meta.json").read_text()
    rc, err = prepare("--val-fraction", "0.2")
    assert rc == 2 and "already holds a prepared DATA_DIR: pass --overwrite" in err
    assert (out / "meta.json").read_text() == meta  # untouched
    assert prepare("--val-fraction", "0.2", "--overwrite")[0] == 0
    assert json.loads((out / "meta.json").read_text())["split"] != json.loads(meta)["split"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["prepare", "--input", str(src), "--out", str(other), "--tokenizer", "byte", "--overwrite"]) == 2
    assert "does not hold a prepared DATA_DIR" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"
