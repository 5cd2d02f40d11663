"""``scalelm push``: publish a model on the Hugging Face Hub, with a model card written from its run.

    scalelm push MODEL ORG/NAME [--private] [--revision BRANCH] [--token T] [--license ID]
    scalelm push MODEL ORG/NAME --dry-run DIR     write what would be uploaded to DIR; upload nothing

The upload is ``scalelm convert MODEL --to-hf``'s directory (a classifier as its
``*ForSequenceClassification``; the kinds convert refuses are refused here, before anything is
written) plus a ``README.md`` model card. The card is :func:`model_card`, a function of the model
directory alone: the architecture and shape, the parameter count, and, when the model is a run's
checkpoint (``RUN_DIR``, ``RUN_DIR/ckpt-N``, ``RUN_DIR/best``), the run's training data
(``run.json``), its validation figures at that checkpoint (``metrics.jsonl``, else the checkpoint's
``config.json``) and the command that trained it (``run.json``'s command and the config's
non-default keys). Local paths are published by their last component only: a card is public.

Everything is staged in a temporary directory that is removed afterwards, uploaded or not, so a
failed upload (network, token, permissions: one line, exit 2) leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from .checkpoint.names import CONFIG, RUN_INFO, TASK_FILE
from .cliargs import add_model_arg
from .errors import UserError

CARD = "README.md"  # the Hub shows a repository's README.md as its model card
HUB = "https://huggingface.co"
# the transformers class of each exported family (config.json's "architectures")
CAUSAL_LM_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM"}
SEQUENCE_CLASSES = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
                    "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
                    "mistral": "MistralForSequenceClassification"}
MASKED_LM_CLASSES = {"bert": "BertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}  # encoders (arch=encoder)


def add_push_parser(p: argparse.ArgumentParser) -> None:
    p.epilog = ("examples:\n  scalelm push runs/baby my-org/baby --private\n"
                "  scalelm push runs/baby/best my-org/baby --revision step-4000\n"
                "  scalelm push runs/baby my-org/baby --dry-run staged/baby   # look before uploading")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arg(p, help="a model directory, or a RUN_DIR (its latest checkpoint), to publish")
    p.add_argument("repo", metavar="ORG/NAME", help="the Hub model repository (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                   "its visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created from main when missing; "
                   "default main)")
    p.add_argument("--token", metavar="T", help="a Hub token with write access (default: $HF_TOKEN or the token "
                   "of `hf auth login`)")
    p.add_argument("--license", metavar="ID", help="the card's license, a Hub license id such as apache-2.0 "
                   "(default: none stated)")
    p.add_argument("--dry-run", metavar="DIR", help="write the files that would be uploaded to DIR (new or "
                   "empty) and upload nothing")


# ----------------------------------------------------------------------------- the model card

def _read_json(path: Path) -> Optional[dict]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _run_dir(model_dir: Path) -> Optional[Path]:
    """The run a checkpoint (``ckpt-N``, ``best``) belongs to, if it is one's."""
    from .runs import is_run_dir

    parent = model_dir.parent
    return parent if parent != model_dir and is_run_dir(parent) else None


def _param_count(cfg, meta: dict) -> int:
    """Parameters of the published model: the network built on the meta device (no memory, no
    weights read), plus a classifier's head. A LoRA checkpoint publishes merged, so its base's count."""
    import torch

    from .model.build import build_model

    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(cfg).parameters())
    task = meta.get("task")
    if isinstance(task, dict) and task.get("name") == "classify":
        n += cfg.n_embd * len(task.get("labels") or [])  # the head: n_embd -> labels, no bias
    return n


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _public(value: Any) -> Any:
    """A local path as its last component (a card is public; ``/home/me/data/tiny`` -> ``tiny``)."""
    if isinstance(value, str) and ("/" in value or "\\" in value) and not value.startswith("hf:"):
        return Path(value).name
    return value


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"model": {"n_layer": 2}}`` -> ``{"model.n_layer": 2}``: a config's sections, one level deep."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix.count(".") < 1:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _command_line(run: Path, config: dict, command: str) -> str:
    """``scalelm train --out RUN --model.n_layer=2 ...``: the run's command with every key that
    differs from the defaults (what reproduces its config; a task's own settings are in task.json)."""
    from .config import Config

    defaults = _flatten(Config().to_dict())
    parts = [f"scalelm {command}", f"--out {run.name}"]
    for key, value in _flatten(config).items():
        if key in defaults and defaults[key] == value:
            continue
        value = _public(value)
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"--{key}={text}")
    return " \\\n    ".join(parts)


def _eval_figures(meta: dict, run: Optional[Path]) -> tuple[Optional[int], dict]:
    """The validation figures measured at this checkpoint's step: the run's eval record of that
    step (loss, perplexity, bits per byte, accuracy ...), else those the checkpoint's config.json keeps."""
    step = meta.get("step") if isinstance(meta.get("step"), int) else None
    figures = {k: v for k, v in meta.items() if k.startswith("val_") and isinstance(v, (int, float))}
    if run is not None and step is not None:
        from .train.metrics import read_metrics

        try:
            records = read_metrics(run)
        except UserError:
            records = []
        evals = [r for r in records if r.get("step") == step and any(k.startswith("val_") for k in r)]
        if evals:
            figures = {k: v for k, v in evals[-1].items()
                       if k.startswith("val_") and k != "val_tokens" and isinstance(v, (int, float))}
    return step, figures


def _data_lines(info: Optional[dict]) -> tuple[list[str], list[str]]:
    """The card's training-data lines and the Hub dataset ids they name (from run.json and the
    DATA_DIR's meta.json when it is still there)."""
    from .data.loader import META  # the DATA_DIR's meta.json

    data = (info or {}).get("data")
    if not isinstance(data, dict):
        return ["not recorded (not a run's checkpoint)"], []
    lines, datasets = [], []
    path = data.get("path") or data.get("dir")
    if path:
        lines.append(f"data: `{_public(path)}`")
    meta = _read_json(Path(path) / META) if path else None
    source = (meta or {}).get("source")
    if isinstance(source, dict):
        src = source.get("path", "")
        if source.get("type") == "hf-hub" and isinstance(src, str):
            name = src[3:] if src.startswith("hf:") else src
            datasets.append(name)
            lines.append(f"source: the Hub dataset [`{name}`]({HUB}/datasets/{name})"
                         + (f", split `{source['split']}`" if source.get("split") else ""))
        elif source.get("type"):
            lines.append(f"source: {source['type']} `{_public(src)}`")
    splits = (meta or {}).get("splits")
    if isinstance(splits, dict):
        lines += [f"{s} split: {v['tokens']:,} tokens" for s, v in splits.items()
                  if isinstance(v, dict) and isinstance(v.get("tokens"), int)]
    if data.get("vocab_size"):
        sha = str(data.get("tokenizer_sha256", ""))[:12]
        lines.append(f"tokenizer: {data['vocab_size']:,} tokens" + (f" (sha256 `{sha}`)" if sha else ""))
    return lines or ["not recorded"], datasets


def model_card(model: str | Path, repo_id: str = "", license: Optional[str] = None) -> str:
    """The ``README.md`` of a model published from ``model`` (a model directory or RUN_DIR): Hub
    front matter and what scalelm knows of the model and its run. Reads files, writes nothing."""
    from .checkpoint.kinds import read_kind
    from .model.hf import hf_family, recorded_hf_type
    from .model.io import read_model_config

    kind = read_kind(model)
    d = kind.path
    meta = _read_json(d / CONFIG) or {}
    cfg = read_model_config(d)
    classifier = kind.task == "classify"
    # the class the export writes: an import's own for a language model (classifiers: by shape)
    family = hf_family(cfg, None if classifier else recorded_hf_type(d))
    run = _run_dir(d)
    info = _read_json(run / RUN_INFO) if run else None
    data_lines, datasets = _data_lines(info)
    params = _param_count(cfg, meta)
    step, figures = _eval_figures(meta, run)

    front = ["---", "library_name: transformers"]
    if license:
        front.append(f"license: {license}")
    masked_lm = family in MASKED_LM_CLASSES and not classifier
    front.append("pipeline_tag: " + ("text-classification" if classifier else "fill-mask" if masked_lm
                                     else "text-generation"))
    front += ["tags:", "- scalelm", f"- {family}"]
    if datasets:
        front += ["datasets:"] + [f"- {n}" for n in datasets]
    front.append("---")

    name = repo_id.split("/")[-1] if repo_id else d.name
    arch = (SEQUENCE_CLASSES if classifier else MASKED_LM_CLASSES if masked_lm else CAUSAL_LM_CLASSES)[family]
    body = [f"# {name}", "", f"{kind.describe()[0].upper()}{kind.describe()[1:]}, trained with "
            f"scalelm and exported to `transformers`' `{arch}`.", "",
            "## Model", "", f"- parameters: {params:,} ({_human(params)})",
            f"- layers: {cfg.n_layer}, heads: {cfg.n_head} (key/value heads: {cfg.kv_heads}), width: {cfg.n_embd}",
            f"- context: {cfg.block_size} tokens, vocabulary: {cfg.vocab_size:,}",
            f"- positions: {cfg.pos_embedding}, norm: {cfg.norm}, MLP: {cfg.mlp}"]
    if classifier:
        labels = (meta.get("task") or {}).get("labels") or []
        body.append(f"- labels: {', '.join(map(str, labels))}")
    body += ["", "## Training data", ""] + [f"- {line}" for line in data_lines]
    body += ["", "## Evaluation", ""]
    if figures:
        body += [f"Measured on the run's validation split at step {step}:" if step is not None
                 else "Measured on the run's validation split:", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.4f} |" for k, v in figures.items()]
    else:
        body.append("No validation figures were recorded with this checkpoint.")
    config = _read_json(run / CONFIG) if run else None
    if config is not None:
        command = str((info or {}).get("command") or "train")
        body += ["", "## How it was trained", "", "```", _command_line(run, config, command), "```"]
        task = _read_json(run / TASK_FILE)
        if task:
            body += ["", "The task's settings (`task.json`):", "", "```json",
                     json.dumps({k: _public(v) for k, v in task.items()}, indent=2), "```"]
    load = ("AutoModelForSequenceClassification" if classifier else "AutoModelForMaskedLM" if masked_lm
            else "AutoModelForCausalLM")
    body += ["", "## Use", "", "```python", f"from transformers import AutoTokenizer, {load}", "",
             f"model = {load}.from_pretrained({json.dumps(repo_id or name)})",
             f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(repo_id or name)})", "```", ""]
    return "\n".join(front + [""] + body)


# ----------------------------------------------------------------------------- staging and uploading

def _stage(model: str, dest: Path, repo_id: str, license: Optional[str]) -> list[str]:
    """``convert --to-hf``'s export of ``model`` and its card, written to ``dest`` (must not exist)."""
    from .convert import export_to_hf

    export_to_hf(model, dest)
    (dest / CARD).write_text(model_card(model, repo_id, license))
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UserError(f"{repo!r} is not a Hub repository id (ORG/NAME): {e}") from None
    if repo.count("/") != 1:
        raise UserError(f"{repo!r} is not a Hub repository id: give ORG/NAME (your user name or an organization)")


def _upload(folder: Path, args: argparse.Namespace) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=args.token)
    try:
        repo = api.create_repo(args.repo, private=args.private, exist_ok=True, repo_type="model")
        repo_id = getattr(repo, "repo_id", None) or args.repo
        if args.revision and args.revision != "main":
            api.create_branch(repo_id, branch=args.revision, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=args.revision, repo_type="model",
                          commit_message=f"scalelm push {Path(args.model).name}")
    except Exception as e:  # HTTP, network, token, permission: whatever the Hub client raises is one line
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"uploading to {args.repo} failed ({type(e).__name__}): {msg}") from None
    return repo_id


def run_push(args: argparse.Namespace) -> int:
    from .checkpoint.kinds import require_kind
    from .convert import HF_EXPORT_HINTS, HF_EXPORTABLE
    from .fileio import publish_dir
    from .runs import check_output_dir, resolve_checkpoint

    _check_repo_id(args.repo)
    require_kind(args.model, "scalelm push", HF_EXPORTABLE, hint=HF_EXPORT_HINTS)
    if args.dry_run:
        out = Path(args.dry_run)
        check_output_dir(out, "push staging directory", lambda p: False,
                         sources=[args.model, resolve_checkpoint(args.model)], option="--dry-run")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.push-", dir=out.parent) as tmp:
            files = _stage(args.model, Path(tmp) / "hub", args.repo, args.license)
            publish_dir(Path(tmp) / "hub", out)  # all files appear at once
        print(f"wrote {out} (dry run: nothing uploaded to {args.repo})", file=sys.stderr)
        print(json.dumps({"out": str(out), "repo": args.repo, "files": files}))
        return 0
    with tempfile.TemporaryDirectory(prefix="scalelm-push-") as tmp:
        files = _stage(args.model, Path(tmp) / "hub", args.repo, args.license)
        repo_id = _upload(Path(tmp) / "hub", args)
    url = f"{HUB}/{repo_id}" + (f"/tree/{args.revision}" if args.revision else "")
    print(f"uploaded {len(files)} files to {url}", file=sys.stderr)
    print(json.dumps({"repo": repo_id, "url": url, "revision": args.revision or "main", "files": files}))
    return 0
