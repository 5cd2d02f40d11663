"""Labelled texts for classification: readers, label names, tokenization, batches.

Formats (by extension, or ``--format``): ``.tsv``/``.csv`` with a header row (columns
``text``/``label`` unless told otherwise), ``.jsonl``/``.json`` objects, and anything else as
SST lines, ``<label> <sentence>``. Labels may be integers or strings; a model's label names are
the sorted labels of its training file (numerically when all are integers). Every bad input is a
:class:`ClassifyDataError` that names ``FILE:LINE``.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...data.lines import split_lines
from ...errors import UserError

FORMATS = ("sst", "tsv", "csv", "jsonl")
EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
_INT = re.compile(r"[+-]?\d+")


class ClassifyDataError(UserError):
    """A classification file that cannot be read as labelled (or unlabelled) texts."""


@dataclass(frozen=True)
class Example:
    text: str
    label: Optional[str]  # None for unlabelled inputs (``scalelm classify --input``)
    where: str  # "FILE:LINE", for error messages


def detect_format(path: str | Path, fmt: Optional[str] = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ClassifyDataError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt
    return EXTENSIONS.get(Path(path).suffix.lower(), "sst")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ClassifyDataError(f"{path} not found" if not path.exists() else f"{path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClassifyDataError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if not text.strip():
        raise ClassifyDataError(f"{path} is empty: it needs one labelled text per line")
    return text


def _nearest(name: str, choices, what: str) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.3)
    return f"; did you mean {what} {close[0]!r}?" if close else ""


def _label(value, where: str, field: str) -> str:
    """A label as its name: ints and strings are accepted, anything else is an error."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ClassifyDataError(f"{where}: no label ({field!r} is empty); every training and validation "
                                f"text needs one")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ClassifyDataError(f"{where}: the label {value!r} is not an integer or a string")
    return str(value).strip()


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ClassifyDataError(f"{where}: no text ({field!r} is {'empty' if value in (None, '') else repr(value)})")
    return value.strip()


def _read_sst(path: Path, text: str, labelled: bool, keep_blank: bool = False) -> list[Example]:
    lines = [(n, line) for n, line in enumerate(split_lines(text), 1) if line.strip() or keep_blank]
    if not labelled:  # plain texts, one per line
        return [Example(line.strip(), None, f"{path}:{n}") for n, line in lines]
    out = []
    for n, line in lines:
        where = f"{path}:{n}"
        if line[0].isspace():
            raise ClassifyDataError(f"{where}: no label (the line starts with a space; SST lines are "
                                    f"'<label> <sentence>')")
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise ClassifyDataError(f"{where}: {parts[0]!r} is a label without text, or a text without a label "
                                    f"(SST lines are '<label> <sentence>')")
        out.append(Example(parts[1].strip(), parts[0], where))
    ints = [bool(_INT.fullmatch(e.label)) for e in out]
    if sum(ints) * 2 > len(out):  # an integer-labelled file: a line starting with a word lacks its label
        for e, ok in zip(out, ints):
            if not ok:
                raise ClassifyDataError(f"{e.where}: no label (the line starts with {e.label!r} but this file's "
                                        f"labels are integers; SST lines are '<label> <sentence>')")
    return out


def _read_table(path: Path, text: str, fmt: str, text_field: str, label_field: Optional[str],
                keep_blank: bool = False) -> list[Example]:
    # TSV (e.g. GLUE) does not quote: a '"' is part of the sentence. csv.reader, not DictReader: that
    # one skips empty lines, which texts to label (keep_blank) count as blank rows
    kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    reader = csv.reader(io.StringIO(text), **kw)
    out = []
    try:
        header = next(reader, [])
        for field, opt in ((text_field, "--text-field"), (label_field, "--label-field")):
            if field is not None and field not in header:
                raise ClassifyDataError(f"{path}:1: no column {field!r} in the header {header}"
                                        f"{_nearest(field, header, opt)} ({opt} names the column)")
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            row = dict(zip(header, fields))  # a short row lacks its last columns; extra fields are ignored
            if not any(v.strip() for v in row.values()):
                if keep_blank:
                    out.append(Example("", None, where))
                continue  # a blank row (or an empty line)
            if keep_blank and not (row.get(text_field) or "").strip():
                out.append(Example("", None, where))
                continue
            label = _label(row.get(label_field), where, label_field) if label_field else None
            out.append(Example(_text(row.get(text_field), where, text_field), label, where))
    except csv.Error as e:
        raise ClassifyDataError(f"{path}:{reader.line_num}: not valid {fmt.upper()} ({e})") from None
    return out


def _read_json(path: Path, text: str, text_field: str, label_field: Optional[str],
               keep_blank: bool = False) -> list[Example]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a .json array of objects
        try:
            items = [(f"{path}:[{i}]", obj) for i, obj in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise ClassifyDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    else:
        items = []
        for n, line in enumerate(split_lines(text), 1):
            if not line.strip():
                if keep_blank:
                    items.append((f"{path}:{n}", None))
                continue
            try:
                items.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ClassifyDataError(f"{path}:{n}: not valid JSON ({e.msg}); JSONL holds one object per "
                                        f"line") from None
    out = []
    for where, obj in items:
        if obj is None and keep_blank:  # a blank line
            out.append(Example("", None, where))
            continue
        if not isinstance(obj, dict):
            raise ClassifyDataError(f"{where}: expected a JSON object with {text_field!r} and {label_field!r}, "
                                    f"got a {type(obj).__name__}")
        for field, opt in ((text_field, "--text-field"), (label_field, "--label-field")):
            if field is not None and field not in obj:
                raise ClassifyDataError(f"{where}: no field {field!r} (the object has {sorted(obj)})"
                                        f"{_nearest(field, obj, opt)} ({opt} names the field)")
        if keep_blank and isinstance(obj[text_field], str) and not obj[text_field].strip():
            out.append(Example("", None, where))
            continue
        label = _label(obj[label_field], where, label_field) if label_field else None
        out.append(Example(_text(obj[text_field], where, text_field), label, where))
    return out


def read_examples(path: str | Path, fmt: Optional[str] = None, text_field: str = "text",
                  label_field: Optional[str] = "label", keep_blank: bool = False) -> list[Example]:
    """The examples of a file (``label_field=None``: texts only, a plain text file is one per line).

    Lines end at ``\\n`` only (:func:`scalelm.data.lines.split_lines`). ``keep_blank`` (texts to
    label): a blank line, blank row or empty text is an input too, an ``Example`` with text ``""``,
    so that the outputs line up with the inputs."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    text = _read_text(path)
    keep_blank = keep_blank and label_field is None  # a labelled file's blank lines are no examples
    if fmt == "sst":
        out = _read_sst(path, text, labelled=label_field is not None, keep_blank=keep_blank)
    elif fmt == "jsonl":
        out = _read_json(path, text, text_field, label_field, keep_blank)
    else:
        out = _read_table(path, text, fmt, text_field, label_field, keep_blank)
    if not out:
        raise ClassifyDataError(f"{path} holds no examples (only a header or blank lines)")
    return out


def label_names(examples: list[Example], path) -> list[str]:
    """The sorted label set (numerically when every label is an integer); at least two."""
    names = set(e.label for e in examples)
    if all(_INT.fullmatch(n) for n in names):
        out = sorted(names, key=int)
    else:
        out = sorted(names)
    if len(out) < 2:
        raise ClassifyDataError(f"{path} has only the label {out}: a classifier needs at least two")
    return out


def label_ids(examples: list[Example], names: list[str], what: str = "--train") -> np.ndarray:
    """Labels as indices into ``names``; a label outside them is an error naming the line."""
    index = {n: i for i, n in enumerate(names)}
    for e in examples:
        if e.label not in index:
            raise ClassifyDataError(f"{e.where}: unknown label {e.label!r}: the model knows {names} (the labels "
                                    f"of {what}); fix the label, or train on examples of it")
    return np.array([index[e.label] for e in examples], dtype=np.int64)


# ----------------------------------------------------------------------------- tokenization

def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer's post-processor puts before and after a text (BERT's ``[CLS]``/``[SEP]``;
    none for a byte-level BPE of ``scalelm prepare``)."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


class TextEncoder:
    """Token ids of texts as the model reads them: the base's tokenizer without its own special
    tokens, truncated to ``max_length`` and (``append_eos``) ended by the end-of-text token, so
    last-token pooling reads a position that has seen the whole text. ``lowercase``: texts are
    lowercased first (set when every training text was lowercase, e.g. SST-2: a cased sentence
    from elsewhere then reads as the training data did). ``special_tokens`` (an encoder): the text
    goes between the tokenizer's own special tokens (``[CLS] ... [SEP]``), which truncation keeps."""

    def __init__(self, tokenizer_json: str, max_length: int, append_eos: bool = True,
                 eos_id: Optional[int] = None, pad_id: Optional[int] = None, lowercase: bool = False,
                 special_tokens: bool = False):
        from tokenizers import Tokenizer

        from ...data.tokenizer import special_ids, vocab_size_of

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.vocab_size = vocab_size_of(self.tokenizer)
        eos, pad = special_ids(self.tokenizer)
        self.eos_id = eos if eos_id is None else eos_id
        self.pad_id = pad if pad_id is None else pad_id
        self.max_length, self.append_eos, self.lowercase = max_length, append_eos, lowercase
        self.special_tokens = special_tokens
        self.prefix, self.suffix = special_wrap(self.tokenizer) if special_tokens else ([], [])
        if max_length < 1 + append_eos + len(self.prefix) + len(self.suffix):
            raise ClassifyDataError(f"--max-length {max_length} leaves no room for text")
        if append_eos and self.eos_id is None:
            raise ClassifyDataError("the tokenizer has no end-of-text token to end each text with: use one that "
                                    "has (e.g. <|endoftext|>), or pass --no-eos")

    def encode(self, texts: list[str]) -> list[list[int]]:
        room = self.max_length - int(self.append_eos) - len(self.prefix) - len(self.suffix)
        texts = [t.lower() for t in texts] if self.lowercase else list(texts)
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        tail = ([self.eos_id] if self.append_eos else []) + self.suffix
        return [self.prefix + e.ids[:room] + tail if e.ids or tail or self.prefix else [self.pad_id or 0]
                for e in encs]

    @property
    def fill_id(self) -> int:
        """What padding positions hold (they are masked, so any id; the pad token when there is one)."""
        return self.pad_id if self.pad_id is not None else 0


def collate(seqs: list[list[int]], fill: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest: ``(idx, valid)``, both (B, T); ``left`` pads at the start."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), fill, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        idx[i, sl] = torch.tensor(s, dtype=torch.long)
        valid[i, sl] = True
    return idx, valid


# ----------------------------------------------------------------------------- training batches

class ClassifyBatches:
    """Shuffled epochs over the examples, the Trainer's ``batches``.

    Global step ``s`` takes positions ``[s*G, (s+1)*G)`` of the stream of epochs (each a seeded
    permutation), ``G = micro_batch x accum x dp_world``; those examples are sorted by length
    (less padding per micro-batch; the step's gradient is the same) and dealt out in
    micro-batches, rank-interleaved. So the state is ``(step, micro)``, batches are a pure
    function of it and the seed, and a resumed run sees exactly the batches an unbroken one would.
    """

    kind = "classify"  # in the state: a checkpoint resumes only batches of its own task

    def __init__(self, ids: list[list[int]], labels: np.ndarray, micro_batch_size: int, grad_accum_steps: int = 1,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, fill: int = 0, device=None):
        self.ids, self.labels, self.B, self.accum = ids, labels, micro_batch_size, grad_accum_steps
        self.dp_rank, self.dp_world, self.seed, self.fill = dp_rank, dp_world, seed, fill
        self.device = torch.device(device) if device is not None else None
        self.lengths = np.array([len(s) for s in ids])
        self.global_batch = micro_batch_size * grad_accum_steps * dp_world
        self.step, self.micro = 0, 0
        self._perm: Optional[tuple[int, np.ndarray]] = None
        self._cache: Optional[tuple[int, np.ndarray]] = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.ids)))
        return self._perm[1]

    def global_indices(self, step: int) -> np.ndarray:
        """The examples of a global step (identical on every rank), shortest first."""
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        n, G = len(self.ids), self.global_batch
        pos = np.arange(step * G, (step + 1) * G, dtype=np.int64)
        out = np.empty(G, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self._permutation(int(epoch))[pos[sel] % n]
        out = out[np.argsort(self.lengths[out], kind="stable")]
        self._cache = (step, out)
        return out

    @property
    def epoch(self) -> float:
        return (self.step * self.global_batch + self.micro * self.B * self.dp_world) / len(self.ids)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch ``(idx, valid, labels)``."""
        lo = (self.micro * self.dp_world + self.dp_rank) * self.B
        sel = self.global_indices(self.step)[lo:lo + self.B]
        idx, valid = collate([self.ids[i] for i in sel], self.fill)
        y = self.label_batch(sel)
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.step = 0, self.step + 1
        if self.device is not None:
            idx, valid, y = idx.to(self.device), valid.to(self.device), y.to(self.device)
        return idx, valid, y

    def label_batch(self, sel: np.ndarray) -> torch.Tensor:
        """The labels of examples ``sel`` (one per example; a subclass may give one per token)."""
        return torch.from_numpy(self.labels[sel])

    def state_dict(self) -> dict:
        return {"version": 1, "kind": self.kind, "seed": self.seed, "examples": len(self.ids),
                "global_batch": self.global_batch, "step": self.step, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        for key, now in (("kind", self.kind), ("seed", self.seed), ("examples", len(self.ids)),
                         ("global_batch", self.global_batch)):
            if state.get(key) != now:
                raise ClassifyDataError(f"the checkpoint's batch order does not match this run: {key} was "
                                        f"{state.get(key)!r}, now {now!r}; resume with the same --train file and "
                                        f"batch settings (or start a new run with another --out)")
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self._cache = None
