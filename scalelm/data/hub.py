"""Hugging Face Hub access that fails fast: a quick reachability probe before any download.

Without it, ``datasets.load_dataset`` on a machine with no network can retry for minutes.
``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) skips the probe and uses the local cache only.
``SCALELM_HUB_TIMEOUT`` sets the probe's timeout in seconds (default 10).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..checkpoint.names import (
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_WEIGHTS_INDEX,
    TOKENIZER_FILES,
)
from ..errors import UserError

# What `convert --from-hf ORG/NAME` downloads: config, tokenizer and safetensors files only. Never
# *.bin/*.pt/*.pkl: pickles can run code when loaded, and they double the download besides.
MODEL_FILES = [HF_CONFIG, HF_GENERATION_CONFIG, HF_WEIGHTS_INDEX, "*.safetensors", "chat_template.json",
               *TOKENIZER_FILES]
_MODEL_ID = re.compile(r"(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


class HubError(UserError):
    """A Hub dataset or tokenizer that cannot be reached or found."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE")


def _save_hint(kind: str, name: str) -> str:
    if kind == "weights":
        return f"on a machine with network, run `hf download {name} --local-dir DIR` and pass --from-hf DIR"
    if kind == "dataset":
        return (f"on a machine with network, run `python -c \"import datasets; datasets.load_dataset("
                f"'{name}').save_to_disk('DIR')\"` and pass --input DIR")
    return f"on a machine with network, save the tokenizer.json of '{name}' and pass --tokenizer FILE"


def probe(repo_id: str, kind: str = "dataset", revision: str | None = None) -> None:
    """Check that ``repo_id`` (at ``revision``) exists and the Hub answers, within a short timeout.
    ``kind``: "dataset", "model" (a tokenizer) or "weights" (a model to convert)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise HubError("loading from the Hugging Face Hub needs the hf extra: pip install 'scalelm[hf]'") from None
    timeout = float(os.environ.get("SCALELM_HUB_TIMEOUT", "10"))
    api = HfApi()
    try:
        (api.dataset_info if kind == "dataset" else api.model_info)(repo_id, revision=revision, timeout=timeout)
    except RevisionNotFoundError:  # before GatedRepoError/RepositoryNotFoundError: it is not one of them
        raise HubError(f"hf:{repo_id} has no revision '{revision}' (a branch, tag or commit hash)") from None
    except GatedRepoError:
        raise HubError(f"hf:{repo_id} is gated: accept its terms on the Hub and log in "
                       f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        what = "dataset" if kind == "dataset" else "model"
        raise HubError(f"hf:{repo_id}: no such {what} on the Hugging Face Hub (check the name; "
                       f"private ones need `hf auth login` or HF_TOKEN)") from None
    except Exception as e:  # connection refused, DNS failure, timeout, proxy errors: all mean "no Hub"
        raise HubError(f"cannot reach the Hugging Face Hub to load hf:{repo_id} ({type(e).__name__}: "
                       f"{str(e)[:200]}). Without network: {_save_hint(kind, repo_id)}; or set "
                       f"HF_HUB_OFFLINE=1 to use a copy already in the local cache") from None


def parse_hub_name(spec: str) -> tuple[str, str | None]:
    """``owner/name[:config]`` -> ``(repo_id, config)``."""
    repo, _, config = spec.partition(":")
    if not repo or repo.count("/") > 1 or repo.startswith("/") or repo.endswith("/"):
        raise HubError(f"bad Hub name 'hf:{spec}': expected hf:owner/name or hf:owner/name:config")
    return repo, (config or None)


def load_hub_dataset(spec: str, split: str = "train"):
    """``datasets.load_dataset`` of one split (downloaded to the local cache, then memory-mapped)."""
    repo, config = parse_hub_name(spec)
    try:
        import datasets
    except ImportError:
        raise HubError("loading hf: datasets needs the hf extra: pip install 'scalelm[hf]'") from None
    if not offline():
        probe(repo, "dataset")
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        where = "in the local cache (HF_HUB_OFFLINE is set)" if offline() else "on the Hub"
        raise HubError(f"could not load hf:{spec} split '{split}' {where}: {type(e).__name__}: "
                       f"{str(e)[:300]}. {_save_hint('dataset', repo).capitalize()}") from None


def load_hub_tokenizer(spec: str):
    repo, _ = parse_hub_name(spec)
    from tokenizers import Tokenizer

    if not offline():
        probe(repo, "model")
    try:
        return Tokenizer.from_pretrained(repo)
    except Exception as e:
        raise HubError(f"could not load the tokenizer of hf:{repo}: {type(e).__name__}: {str(e)[:300]}. "
                       f"{_save_hint('tokenizer', repo).capitalize()}") from None


def is_hub_model_id(s: str) -> bool:
    """``ORG/NAME[@REVISION]`` (or ``hf:ORG/NAME...``) that is not an existing path: a Hub model id."""
    return not Path(s).exists() and _MODEL_ID.fullmatch(s) is not None


def parse_model_id(spec: str) -> tuple[str, str | None]:
    """``[hf:]org/name[@revision]`` -> ``(repo_id, revision)``."""
    repo, _, revision = spec.removeprefix("hf:").partition("@")
    if not _MODEL_ID.fullmatch(repo) or (not revision and spec.endswith("@")):
        raise HubError(f"bad Hub model id '{spec}': expected ORG/NAME or ORG/NAME@REVISION")
    return repo, (revision or None)


def download_hub_model(spec: str) -> tuple[Path, str]:
    """A Hub model's snapshot folder (config, tokenizer, safetensors), and its ``hf:repo@commit`` name.

    Through ``huggingface_hub.snapshot_download``: the user's token and cache, files already cached
    are not fetched again. Online, the reachability probe runs first, so no network fails in seconds;
    with HF_HUB_OFFLINE=1 only the local cache is read.
    """
    repo, revision = parse_model_id(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubError("converting a Hub model needs the hf extra: pip install 'scalelm[hf]'") from None
    name = f"hf:{repo}" + (f"@{revision}" if revision else "")
    if not offline():
        probe(repo, "weights", revision)
    try:  # local_files_only: HF_HUB_OFFLINE as set now, not as huggingface_hub read it at import
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES,
                                      local_files_only=offline()))
    except Exception as e:
        if offline():
            raise HubError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: unset it to "
                           f"download, or {_save_hint('weights', repo)}") from None
        raise HubError(f"could not download {name}: {type(e).__name__}: {str(e)[:300]}. "
                       f"{_save_hint('weights', repo).capitalize()}") from None
    return path, f"hf:{repo}@{path.name}"  # the snapshot folder is named by its commit
