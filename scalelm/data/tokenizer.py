"""Tokenizers: byte-level BPE, characters, raw bytes, or any ``tokenizer.json``.

Every kind is a real ``tokenizers.Tokenizer``, so every consumer loads one the same way
(``Tokenizer.from_str`` / ``from_file``) and decodes with ``.decode(ids)``. Kinds we build have
the end-of-text token ``<|endoftext|>`` and the pad token ``<|pad|>``; a loaded tokenizer keeps
its own end-of-sequence token (``</s>``, ``<|end_of_text|>``, ...) when it has no
``<|endoftext|>``, and ``meta.json``'s ``eot_id`` names the one in use.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

from ..checkpoint.names import CKPT_GLOB, TOKENIZER, TOKENIZER_CONFIG
from ..errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOT, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"
KINDS = ("bpe", "char", "byte")
DEFAULT_BPE_VOCAB = 8192
BPE_MIN_VOCAB = 256 + 2  # byte-level BPE: the 256 byte tokens, end-of-text and padding
# end-of-sequence / pad tokens of common tokenizers, most preferred first
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|im_end|>")
PAD_CANDIDATES = (PAD, "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")
# a masked LM's mask token (BERT's, RoBERTa's); the kinds we build have none, masked-LM training adds MASK
MASK = "<|mask|>"
MASK_CANDIDATES = (MASK, "[MASK]", "<mask>")


class TokenizerError(UserError):
    """A tokenizer that cannot be loaded, built, or does not match the data."""


def tokenizer_sha256(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of the ByteLevel pre-tokenizer)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ----------------------------------------------------------------------------- building

def byte_tokenizer() -> "Tokenizer":
    """Ids 0..255 are the UTF-8 bytes of the text; 256 is ``<|endoftext|>``, 257 ``<|pad|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    # a BPE without merges over the ByteLevel alphabet: every byte is one token
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT, PAD])
    return tok


def char_tokenizer(chars: Iterable[str]) -> "Tokenizer":
    """nanoGPT-style characters: ids 0..2 are ``<|endoftext|>``, ``<|pad|>``, ``<|unk|>``, then the
    corpus's characters in code-point order. A character never seen decodes as ``<|unk|>``."""
    from tokenizers import Tokenizer, decoders, models

    specials = [EOT, PAD, UNK]
    vocab = {s: i for i, s in enumerate(specials)}
    for c in sorted(set(chars) - set(specials)):
        vocab[c] = len(vocab)
    # a BPE without merges and without a pre-tokenizer splits text into single characters
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def check_bpe_vocab_size(vocab_size: int) -> None:
    if vocab_size < 1:  # 0 is refused, not read as "the default"
        raise TokenizerError(f"--vocab-size must be a positive number of tokens (default {DEFAULT_BPE_VOCAB}), "
                             f"got {vocab_size}")
    if vocab_size < BPE_MIN_VOCAB:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs at least "
                             f"{BPE_MIN_VOCAB} (256 byte tokens + {EOT} + {PAD})")


def train_bpe(texts: Iterator[str], vocab_size: int = DEFAULT_BPE_VOCAB, *, min_frequency: int = 2,
              progress: bool = False, length: Optional[int] = None) -> "Tokenizer":
    """Train a GPT-2-style byte-level BPE from an iterator of strings (streamed, not held)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_bpe_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                  special_tokens=[EOT, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


# ----------------------------------------------------------------------------- loading

def _from_file(path: Path) -> "Tokenizer":
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for bad JSON / unknown models
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from None


def _from_hf_dir(d: Path) -> "Tokenizer":
    """A Hugging Face model directory without tokenizer.json (vocab.json + merges.txt, a
    SentencePiece tokenizer.model, ...): let ``transformers`` build the fast tokenizer."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(f"{d} has no tokenizer.json; converting its slow tokenizer needs "
                             f"transformers: pip install 'scalelm[hf]'") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(d), use_fast=True)
    except Exception as e:
        raise TokenizerError(f"could not load the tokenizer in {d}: {e}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"the tokenizer in {d} has no fast (tokenizers) version; save one as tokenizer.json")
    return backend


def load_tokenizer(path_or_dir: str | Path) -> "Tokenizer":
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file, a directory holding one (a scalelm
    DATA_DIR, checkpoint or RUN_DIR, an ONNX export, a Hugging Face model dir), or ``hf:owner/name``
    on the Hub. The one loader of every command: ``prepare``, fine-tuning's ``--tokenizer``/``--base``,
    and ``generate``/``chat``/``serve`` (a checkpoint's own tokenizer, or ``--tokenizer PATH``)."""
    s = str(path_or_dir)
    if s.startswith("hf:"):
        from .hub import load_hub_tokenizer

        return load_hub_tokenizer(s[3:])
    p = Path(s).expanduser()
    if p.is_file():
        return _from_file(p)
    if p.is_dir():
        if (p / TOKENIZER).is_file():
            return _from_file(p / TOKENIZER)
        hf_files = (TOKENIZER_CONFIG, "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
        if any((p / f).is_file() for f in hf_files):
            return _from_hf_dir(p)
        if any(p.glob(f"{CKPT_GLOB}/{TOKENIZER}")):  # a RUN_DIR: its latest checkpoint's tokenizer
            from ..checkpoint.rundir import latest_checkpoint

            ckpt = latest_checkpoint(p)
            if ckpt is not None and (ckpt / TOKENIZER).is_file():
                return _from_file(ckpt / TOKENIZER)
        raise TokenizerError(f"{p} holds no tokenizer.json (nor a Hugging Face tokenizer): pass the file, "
                             f"a DATA_DIR, a checkpoint or a model directory")
    raise TokenizerError(f"tokenizer not found: {p} (expected a tokenizer.json, a directory holding one, "
                         f"or hf:owner/name)")


# ----------------------------------------------------------------------------- describing

def vocab_size_of(tok) -> int:
    """Ids run from 0 to this minus one (added tokens included, holes counted)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(max(vocab.values()) + 1, tok.get_vocab_size(with_added_tokens=True)) if vocab else 0


def special_ids(tok, eot_token: Optional[str] = None) -> tuple[Optional[int], Optional[int]]:
    """The end-of-text and pad ids of ``tok`` (None where it has none)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    if eot_token is not None:
        if eot_token not in vocab:
            raise TokenizerError(f"the tokenizer has no token {eot_token!r} (--eot-token)")
        eot = vocab[eot_token]
    else:
        eot = next((vocab[t] for t in EOT_CANDIDATES if t in vocab), None)
    pad = next((vocab[t] for t in PAD_CANDIDATES if t in vocab), None)
    return eot, pad


def mask_token_id(tok) -> int:
    """The tokenizer's mask token, else the id :func:`with_mask_token` gives ``<|mask|>``: the first
    past the tokenizer (ids it never produces: the vocabulary grows by one)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    own = next((vocab[t] for t in MASK_CANDIDATES if t in vocab), None)
    if own is not None:
        return own
    n = vocab_size_of(tok)
    if tok.get_vocab_size(with_added_tokens=True) == n:  # dense ids: an added token takes the next one
        return n
    return with_mask_token(tok.to_str())[1]  # ids with holes: where `tokenizers` puts it, found by adding it


def with_mask_token(tokenizer_json: str) -> tuple[str, int]:
    """``(tokenizer.json with a mask token, its id)``: unchanged where the tokenizer has one, else with
    ``<|mask|>`` added as a special token (appended: every other id keeps its meaning), so a model
    trained with it can be given the mask as text (``fill-mask``) and its tokenizer names it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    vocab = tok.get_vocab(with_added_tokens=True)
    own = next((t for t in MASK_CANDIDATES if t in vocab), None)
    if own is not None:
        return tokenizer_json, vocab[own]
    tok.add_special_tokens([MASK])
    return tok.to_str(), tok.token_to_id(MASK)


def ensure_eot(tok, eot_token: Optional[str] = None) -> tuple[int, Optional[int], bool]:
    """``(eot_id, pad_id, added)``: adds ``<|endoftext|>`` to a tokenizer that has no end token."""
    eot, pad = special_ids(tok, eot_token)
    if eot is not None:
        return eot, pad, False
    tok.add_special_tokens([EOT])
    eot, pad = special_ids(tok)
    return eot, pad, True


def dtype_for_vocab(vocab_size: int, requested: str = "auto") -> str:
    """``uint16`` when every id fits (vocab <= 65536), else ``uint32``; checks a forced dtype."""
    limits = {"uint16": 1 << 16, "uint32": 1 << 32}
    if requested == "auto":
        requested = "uint16" if vocab_size <= limits["uint16"] else "uint32"
    if requested not in limits:
        raise TokenizerError(f"unknown dtype {requested!r}: use auto, uint16 or uint32")
    if vocab_size > limits[requested]:
        raise TokenizerError(f"a vocabulary of {vocab_size} tokens does not fit {requested} (at most "
                             f"{limits[requested]} ids): use --token-dtype uint32 (or auto)"
                             if requested == "uint16" else
                             f"a vocabulary of {vocab_size} tokens does not fit uint32")
    return requested


# ----------------------------------------------------------------------------- checking

def _canonical(tokenizer_json: Optional[str]) -> Optional[str]:
    from tokenizers import Tokenizer

    if tokenizer_json is None:
        return None
    try:
        return Tokenizer.from_str(tokenizer_json).to_str()
    except Exception:
        return None


def _with_mask_or_none(tokenizer_json: str) -> Optional[str]:
    try:
        return with_mask_token(tokenizer_json)[0]
    except Exception:
        return None


def check_same_tokenizer(data_dir: str | Path, tokenizer_json: Optional[str], what: str = "the checkpoint") -> bool:
    """Raise a clear error unless DATA_DIR was prepared with ``tokenizer_json`` (the text of a
    tokenizer.json, e.g. a checkpoint's). Returns False (and checks nothing) when there is no
    tokenizer to compare with, True when they match. Files that differ only in formatting match."""
    if tokenizer_json is None:
        return False
    d = Path(data_dir)
    try:
        meta = json.loads((d / "meta.json").read_text())
        data_json = (d / TOKENIZER).read_text()
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{d} is not a readable prepared data directory ({e}): prepare one with "
                             f"`scalelm prepare --input SRC --out NEW_DIR` (prepare replaces only a DATA_DIR)") from None
    theirs = tokenizer_sha256(tokenizer_json)
    ours = meta.get("tokenizer", {}).get("sha256") or tokenizer_sha256(data_json)
    if theirs == ours or theirs == tokenizer_sha256(data_json):
        return True
    canon = _canonical(tokenizer_json)
    if canon is not None and canon == _canonical(data_json):
        return True
    # a masked LM saves the data's tokenizer with its mask token appended (scalelm/train/mlm.py): the
    # data's ids mean the same text under it
    if canon is not None and canon == _canonical(_with_mask_or_none(data_json)):
        return True
    try:
        their_vocab = vocab_size_of(__import__("tokenizers").Tokenizer.from_str(tokenizer_json))
    except Exception:
        their_vocab = "?"
    info = meta.get("tokenizer", {})
    raise TokenizerError(
        f"{d} was prepared with a different tokenizer than {what}: data has a {info.get('kind', '?')} "
        f"tokenizer of {info.get('vocab_size', '?')} tokens (sha256 {ours[:12]}), {what} has one of "
        f"{their_vocab} tokens (sha256 {theirs[:12]}). Token ids would mean different text. Prepare the "
        f"data again with that tokenizer: `scalelm prepare --input SRC --out NEW_DIR --tokenizer CKPT_DIR`")
