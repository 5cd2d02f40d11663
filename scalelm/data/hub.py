"""Hugging Face Hub access that fails fast: a quick reachability probe before any download.

Without it, ``datasets.load_dataset`` on a machine with no network can retry for minutes.
``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) skips the probe and uses the local cache only.
``SCALELM_HUB_TIMEOUT`` sets the probe's timeout in seconds (default 10).
"""

from __future__ import annotations

import os

from ..errors import UserError


class HubError(UserError):
    """A Hub dataset or tokenizer that cannot be reached or found."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE")


def _save_hint(kind: str, name: str) -> str:
    if kind == "dataset":
        return (f"on a machine with network, run `python -c \"import datasets; datasets.load_dataset("
                f"'{name}').save_to_disk('DIR')\"` and pass --input DIR")
    return f"on a machine with network, save the tokenizer.json of '{name}' and pass --tokenizer FILE"


def probe(repo_id: str, kind: str = "dataset") -> None:
    """Check that ``repo_id`` exists and the Hub answers, within a short timeout."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        raise HubError("loading from the Hugging Face Hub needs the hf extra: pip install 'scalelm[hf]'") from None
    timeout = float(os.environ.get("SCALELM_HUB_TIMEOUT", "10"))
    api = HfApi()
    try:
        (api.dataset_info if kind == "dataset" else api.model_info)(repo_id, timeout=timeout)
    except GatedRepoError:
        raise HubError(f"hf:{repo_id} is gated: accept its terms on the Hub and log in "
                       f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise HubError(f"hf:{repo_id}: no such {kind} on the Hugging Face Hub (check the name; "
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
