"""``scalelm prepare``: a corpus in, a tokenizer and token shards out (the DATA_DIR format).

Three streaming passes over the input, so memory stays bounded whatever its size:

1. scan: count documents and bytes, hash the input, find bad input (binary files, invalid
   UTF-8, broken records), collect the character set for ``--tokenizer char``;
2. tokenizer: train the byte-level BPE on the train split (a spread-out sample of at most
   ``--tokenizer-sample`` bytes); nothing to do for char/byte/a loaded tokenizer;
3. encode: batches of pieces through the tokenizer's parallel ``encode_batch_fast``, appended
   to ``train.bin`` / ``val.bin`` as they come, with the end-of-text id after each document.

Cleaning (``--dedup``, ``--scrub-pii``, ``--quality-filter``, ``--decontaminate``) is decided in the
scan pass and applied in the other two (:mod:`.clean`): it adds no pass and keeps no copy.

Everything is written to a temporary directory beside ``--out`` and renamed into place at the
end, so an interrupted run leaves no half-written DATA_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .. import __version__
from ..checkpoint import staged_dir
from ..checkpoint.names import TOKENIZER
from ..cliargs import add_deprecated, add_overwrite_arg
from ..errors import UserError
from .clean import Cleaner, CleanOptions, add_clean_args, options_from_args
from .clean.report import REPORT, log_line, summary
from .sources import (
    ON_INVALID,
    STDLIB_MAX_BYTES,
    DataWarning,
    SourceError,
    Stats,
    open_source,
    stream,
    utf8_len,
)
from .split import MODES, SplitPlan
from .tokenizer import (
    DEFAULT_BPE_VOCAB,
    KINDS,
    byte_tokenizer,
    check_bpe_vocab_size,
    char_tokenizer,
    dtype_for_vocab,
    ensure_eot,
    load_tokenizer,
    tokenizer_sha256,
    train_bpe,
    vocab_size_of,
)

FORMAT, VERSION = "scalelm-data", 1
SPLITS = ("train", "val")
# characters per encode batch: enough pieces for every core, few enough that the tokenizer's
# Encoding objects (about 100 bytes per token) stay small: 1 MiB per 4 threads, at most 8 MiB
BATCH_CHARS = min(8 << 20, max(1 << 20, (os.cpu_count() or 1) << 18))
BATCH_PIECES = 2048
DEFAULT_SAMPLE = 128 << 20  # BPE training sample, bytes
DEFAULT_BLOCK = 1024  # context length that the val split is checked against


def parse_size(s: str | int | None) -> Optional[int]:
    """``'8MB'``, ``'1.5G'``, ``'500k'``, ``'1048576'`` -> bytes (binary multiples)."""
    if s is None or isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(s))
    if not m:
        raise UserError(f"cannot read the size {s!r}: use a number of bytes or e.g. 500k, 8MB, 1.5GB")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index((m.group(2) or "_").upper()))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                file=sys.stderr, mininterval=0.5, leave=False)


@contextmanager
def _tokenizer_threads(workers: Optional[int]):
    """Let ``encode_batch`` use the cores for this call (``TOKENIZERS_PARALLELISM=false`` is
    often set globally to make forking safe); ``workers=1`` keeps it single-threaded."""
    saved = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if workers == 1 else "true"
    if workers and workers > 1 and saved["RAYON_NUM_THREADS"] is None:
        os.environ["RAYON_NUM_THREADS"] = str(workers)  # effective if the thread pool is not yet started
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Notes:
    """Warnings: raised as :class:`DataWarning` and kept for meta.json."""

    def __init__(self):
        self.items: list[str] = []

    def warn(self, msg: str) -> None:
        self.items.append(msg)
        warnings.warn(msg, DataWarning, stacklevel=3)


def _scan_warnings(st: Stats, notes: _Notes, on_invalid: str) -> None:
    if st.binary_files:
        shown = ", ".join(st.binary_files[:5]) + (f" and {len(st.binary_files) - 5} more" if len(st.binary_files) > 5 else "")
        notes.warn(f"skipped {len(st.binary_files)} binary file(s) (NUL bytes): {shown}")
    if st.invalid_utf8:
        how = "replaced with U+FFFD" if on_invalid == "replace" else "dropped"
        notes.warn(f"{st.invalid_utf8} invalid UTF-8 sequence(s) {how} (first in {st.invalid_utf8_first}); "
                   f"--on-invalid-utf8 error stops instead")
    if st.nul_bytes:
        notes.warn(f"removed {st.nul_bytes} NUL byte(s) from text files")
    if st.bad_records:
        notes.warn(f"skipped {st.bad_records} record(s) that are not valid JSON (first at {st.bad_records_first})")
    if st.missing_text:
        notes.warn(f"skipped {st.missing_text} record(s) without text in the text field(s) "
                   f"(first at {st.missing_text_first})")


def _pieces(source, stats: Stats, max_bytes, clean: Optional[Cleaner]) -> Iterator[tuple[str, bool, int]]:
    """The stream of pieces, cleaned when cleaning is on (``stats`` counts the raw input)."""
    pieces = stream(source, stats, max_bytes)
    return clean.apply(pieces) if clean is not None else pieces


def _training_texts(source, plan: SplitPlan, max_bytes, sample_bytes: int, total: int, progress: bool,
                    clean: Optional[Cleaner] = None) -> Iterator[str]:
    """The train split's pieces, thinned evenly to about ``sample_bytes``."""
    rate = min(1.0, sample_bytes / max(1, total))
    credit = 0.0
    plan.reset()
    with _progress(total, "train tokenizer", progress) as bar:
        for text, end, n in _pieces(source, Stats(), max_bytes, clean):
            bar.update(n)
            for split, part, _ in plan.assign(text, end, n):
                if split != "train" or not part:
                    continue
                credit += len(part) * rate
                if credit >= len(part):
                    credit -= len(part)
                    yield part


def build_tokenizer(spec: str, source, plan: SplitPlan, scan: Stats, *, vocab_size: Optional[int], max_bytes,
                    sample_bytes: int, progress: bool, notes: _Notes, eot_token: Optional[str] = None,
                    clean: Optional[Cleaner] = None):
    """``(tokenizer, kind, eot_id, pad_id)`` for ``--tokenizer`` bpe/char/byte/PATH (or a loaded one).
    With ``clean``, ``scan.chars`` must hold the characters of the cleaned text."""
    if not isinstance(spec, str):
        tok, kind = spec, "file"
    elif spec == "byte":
        tok, kind = byte_tokenizer(), "byte"
    elif spec == "char":
        tok, kind = char_tokenizer(scan.chars or ()), "char"
    elif spec == "bpe":
        vocab_size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
        total = clean.bytes_out if clean is not None else scan.bytes
        train_bytes = int(total * (1 - plan.val_fraction))  # about: the exact size is known after encoding
        texts = _training_texts(source, plan, max_bytes, sample_bytes, train_bytes, progress, clean)
        tok, kind = train_bpe(texts, vocab_size, progress=progress), "bpe"
        if tok.get_vocab_size(with_added_tokens=True) < vocab_size:
            notes.warn(f"BPE learned only {tok.get_vocab_size(with_added_tokens=True)} of the {vocab_size} "
                       f"tokens asked for: the corpus has too few distinct pairs (that is fine; lower "
                       f"--vocab-size to silence this)")
    else:
        tok, kind = load_tokenizer(spec), "file"
    eot, pad, added = ensure_eot(tok, eot_token)
    if added:
        notes.warn(f"the tokenizer has no end-of-text token: added <|endoftext|> as id {eot}")
    return tok, kind, eot, pad


class _Shards:
    """The two split files, appended to batch by batch."""

    def __init__(self, out: Path, dtype: str, vocab_size: int, eot: int, raw_bytes: bool = False):
        self.dtype, self.vocab_size, self.eot = np.dtype(dtype), vocab_size, eot
        self.raw_bytes = raw_bytes  # the byte tokenizer: ids are the UTF-8 bytes, no need to ask it
        self.files = {s: open(out / f"{s}.bin", "wb") for s in SPLITS}
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.bytes = dict.fromkeys(SPLITS, 0)
        self.docs = dict.fromkeys(SPLITS, 0)
        self._doc, self._seen = 0, {s: -1 for s in SPLITS}  # documents counted once per split

    def _encode(self, tok, texts: list[str]) -> list:
        out: list = [None] * len(texts)
        slow = list(range(len(texts)))
        if self.raw_bytes:  # same ids as the tokenizer unless a special token's text is inside
            slow = [i for i, t in enumerate(texts) if "<|" in t]
            for i, t in enumerate(texts):
                out[i] = np.frombuffer(t.encode("utf-8"), np.uint8)
        if slow:
            encs = tok.encode_batch_fast([texts[i] for i in slow], add_special_tokens=False)
            for i, enc in zip(slow, encs):
                out[i] = enc.ids
        return out

    def write_batch(self, tok, batch: list[tuple[str, str, bool]]) -> None:
        encs = self._encode(tok, [t for _, t, _ in batch])
        parts: dict[str, list] = {s: [] for s in SPLITS}
        eot = np.array([self.eot], dtype=np.int64)
        for (split, text, end), ids in zip(batch, encs):
            parts[split].append(np.asarray(ids, dtype=np.int64))
            self.bytes[split] += utf8_len(text)
            if self._seen[split] != self._doc:
                self._seen[split] = self._doc
                self.docs[split] += 1
            if end:
                parts[split].append(eot)
                self._doc += 1
        for split, arrays in parts.items():
            count = sum(map(len, arrays))
            if not count:
                continue
            ids = np.concatenate(arrays)
            top = int(ids.max())
            if top >= self.vocab_size or int(ids.min()) < 0:
                raise UserError(f"the tokenizer produced id {top}, outside its vocabulary of "
                                f"{self.vocab_size}: the tokenizer.json is inconsistent")
            ids.astype(self.dtype).tofile(self.files[split])
            self.tokens[split] += count

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def encode_corpus(source, tok, plan: SplitPlan, shards: _Shards, max_bytes, total: int, progress: bool,
                  clean: Optional[Cleaner] = None) -> Stats:
    """Encode the (cleaned) pieces into ``shards``; returns what the pass read of the raw input."""
    st, batch, chars, nbytes = Stats(), [], 0, 0
    plan.reset()
    with _progress(total, "encode", progress) as bar:
        for text, end, n in _pieces(source, st, max_bytes, clean):
            batch.extend(plan.assign(text, end, n))
            chars, nbytes = chars + len(text), nbytes + n
            if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
                shards.write_batch(tok, batch)
                bar.update(nbytes)
                batch, chars, nbytes = [], 0, 0
        if batch:
            shards.write_batch(tok, batch)
            bar.update(nbytes)
    return st


def is_data_dir(path: Path) -> bool:
    """A DATA_DIR an earlier ``prepare`` wrote (what ``--overwrite`` may replace)."""
    return (Path(path) / "meta.json").is_file()


def _check_out(out: Path, input: str, overwrite: bool) -> None:
    from ..runs import check_output_dir

    sources = [input] if Path(input).exists() else []  # stdlib and hf: names are not paths
    check_output_dir(out, "prepared DATA_DIR", is_data_dir, sources=sources, overwrite=overwrite)


def prepare(input: str, out: str, tokenizer: str = "bpe", vocab_size: Optional[int] = None,
            val_fraction: float = 0.1, seed: int = 0, text_field: str = "text", glob: Optional[str] = None,
            progress: bool = True, *, doc_sep: str = "eot", split: str = "train", split_by: str = "auto",
            max_bytes: int | str | None = None, tokenizer_sample: int | str = DEFAULT_SAMPLE,
            dtype: str = "auto", block_size: int = DEFAULT_BLOCK, on_invalid_utf8: str = "replace",
            eot_token: Optional[str] = None, workers: Optional[int] = None, overwrite: bool = False,
            dedup: Optional[str] = None, dedup_threshold: Optional[float] = None, scrub_pii: bool = False,
            quality_filter: bool = False, quality_thresholds: Optional[dict | list[str]] = None,
            decontaminate: Sequence[str] = ()) -> dict:
    """Prepare a DATA_DIR from ``input`` (see module doc and docs/data.md); returns its meta.

    An existing, non-empty ``out`` is refused unless it is an earlier DATA_DIR and ``overwrite``
    is set (then it is replaced atomically). The cleaning options (docs/data.md "Cleaning"):
    ``dedup`` "exact" or "minhash" (``dedup_threshold``: its Jaccard threshold), ``scrub_pii``,
    ``quality_filter`` (``quality_thresholds``: {name: value or None}), ``decontaminate``: files."""
    t0 = time.perf_counter()
    out_dir = Path(out).expanduser().resolve()
    _check_out(out_dir, input, overwrite)
    max_bytes, sample = parse_size(max_bytes), parse_size(tokenizer_sample)
    # wrong arguments fail before a possibly long read of the corpus
    if vocab_size is not None and tokenizer != "bpe":
        raise UserError(f"--vocab-size applies to --tokenizer bpe only (the {tokenizer} vocabulary is fixed "
                        f"by the {'corpus' if tokenizer == 'char' else 'tokenizer'})")
    if vocab_size is not None:
        check_bpe_vocab_size(vocab_size)
    # numbers given are numbers meant: 0 is refused, not read as "the default"
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1 (leave it out for all cores), got {workers}")
    if block_size < 1:
        raise UserError(f"--seq-len must be a positive number of tokens, got {block_size}")
    SplitPlan(2, 2, val_fraction, seed, split_by)  # checks the split arguments
    cleaning = CleanOptions(dedup, dedup_threshold, scrub_pii, quality_filter, quality_thresholds,
                            tuple(decontaminate or ())).check()
    loaded = None if tokenizer in KINDS else load_tokenizer(tokenizer)
    dtype_for_vocab(vocab_size_of(loaded) if loaded else (vocab_size or 2), dtype)
    stdlib_cap = max_bytes if max_bytes is not None else STDLIB_MAX_BYTES
    source = open_source(input, text_field=text_field, glob=glob, doc_sep=doc_sep, split=split,
                         on_invalid=on_invalid_utf8, stdlib_max_bytes=stdlib_cap, exclude=out_dir)
    limit = None if input == "stdlib" else max_bytes
    notes = _Notes()
    log = (lambda msg: print(f"prepare: {msg}", file=sys.stderr)) if progress else (lambda msg: None)

    with _tokenizer_threads(workers):
        clean = _cleaner(cleaning, tokenizer == "char", log, notes)
        scan = Stats(chars=set() if tokenizer == "char" and clean is None else None)
        with _progress(source.size_hint, "scan", progress) as bar:
            for text, end, n in stream(source, scan, limit):
                bar.update(n)
                if clean is not None:
                    clean.feed(text, end, n)
        _scan_warnings(scan, notes, on_invalid_utf8)
        if scan.documents == 0 or scan.bytes == 0:
            what = f"{len(scan.binary_files)} binary file(s) skipped" if scan.binary_files else "no text found"
            raise SourceError(f"the corpus {input} is empty ({what}): nothing to prepare")
        if scan.truncated:
            log(f"stopped reading at --max-bytes {max_bytes} bytes")
        docs, nbytes, report = scan.documents, scan.bytes, None
        if clean is not None:
            report = clean.finish()
            log(log_line(report))
            if clean.docs_out == 0:
                raise SourceError(f"cleaning removed all {clean.docs_in:,} documents of {input}: nothing to prepare "
                                  f"({log_line(report)})")
            docs, nbytes, scan.chars = clean.docs_out, clean.bytes_out, clean.chars
        plan = SplitPlan(docs, nbytes, val_fraction, seed, split_by)
        log(f"{docs:,} documents, {nbytes / 1e6:.2f} MB of text from {source.kind} {input}; "
            f"val by {plan.mode}")

        tok, kind, eot, pad = build_tokenizer(loaded or tokenizer, source, plan, scan, vocab_size=vocab_size, max_bytes=limit,
                                              sample_bytes=sample, progress=progress, notes=notes, eot_token=eot_token,
                                              clean=clean)
        n_vocab = vocab_size_of(tok)
        np_dtype = dtype_for_vocab(n_vocab, dtype)
        tok_json = tok.to_str()

        # a DATA_DIR has no manifest: its meta.json records what it holds
        with staged_dir(out_dir, manifest=False, tag="tmp-") as tmp:
            shards = _Shards(tmp, np_dtype, n_vocab, eot, raw_bytes=kind == "byte")
            try:
                again = encode_corpus(source, tok, plan, shards, limit, nbytes, progress, clean)
            finally:
                shards.close()
            if (again.documents, again.bytes, again.inputs_sha256()) != (scan.documents, scan.bytes, scan.inputs_sha256()):
                raise SourceError(f"{input} changed while it was being prepared; run prepare again")
            for s, name in (("train", "training"), ("val", "validation")):
                if shards.tokens[s] < block_size + 1:
                    notes.warn(f"the {name} split has {shards.tokens[s]} tokens, fewer than one window of "
                               f"{block_size} + 1: models with a context of at most {max(0, shards.tokens[s] - 1)} "
                               f"tokens can use it (train/eval will refuse longer ones); use a larger corpus"
                               + (" or a larger --val-fraction" if s == "val" else " or a smaller --val-fraction"))
            meta = {
                "format": FORMAT, "version": VERSION,
                "tokenizer": {"kind": kind, "vocab_size": n_vocab, "eot_id": eot, "pad_id": pad,
                              "sha256": tokenizer_sha256(tok_json),
                              **({"path": str(tokenizer)} if kind == "file" else {})},
                "dtype": np_dtype,
                "splits": {s: {"file": f"{s}.bin", "tokens": shards.tokens[s], "documents": shards.docs[s],
                               "bytes": shards.bytes[s]} for s in SPLITS},
                "source": source.describe(),
                "split": plan.describe(),
                "stats": scan.to_dict(),
                "inputs_sha256": scan.inputs_sha256(),
                "warnings": notes.items,
                **({"clean": {**cleaning.describe(), **summary(report)}} if report is not None else {}),
                "scalelm_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            (tmp / TOKENIZER).write_text(tok_json, encoding="utf-8")
            if report is not None:
                (tmp / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    secs = time.perf_counter() - t0
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    log(f"wrote {out_dir}: train {tr['tokens']:,} tokens ({tr['documents']:,} docs), val {va['tokens']:,} tokens "
        f"({va['documents']:,} docs), {kind} vocab {n_vocab:,}, {np_dtype}; {scan.bytes / 1e6 / secs:.2f} MB/s "
        f"({secs:.1f} s)")
    return meta


def _cleaner(options: CleanOptions, collect_chars: bool, log, notes: _Notes) -> Optional[Cleaner]:
    """The cleaning steps that were asked for (None: none), their settings logged."""
    if not options.active:
        return None
    clean = Cleaner(options, collect_chars=collect_chars)
    if options.decontaminate:
        idx = clean.index
        log(f"decontaminate: {int(sum(idx.ngrams)):,} 13-grams of {len(idx.files)} evaluation file(s) "
            f"({idx.memory_bytes() / 2**20:.1f} MiB)")
        for f, n in zip(idx.files, idx.ngrams):
            if n == 0:
                notes.warn(f"--decontaminate {f} has fewer than {idx.n} words: no training document can overlap it")
    if options.quality_filter:
        from .clean.quality import describe

        log(f"quality filter (Gopher): {describe(clean.thresholds)}")
    return clean


# ----------------------------------------------------------------------------- CLI

def add_prepare_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("input forms: a text file; a folder (--glob); .jsonl/.json/.parquet with --text-field;\n"
                "a dataset saved with datasets' save_to_disk; hf:owner/name[:config];\n"
                "stdlib (this Python's standard library, the demo corpus). Prints meta.json to stdout.")
    p.add_argument("--input", required=True, help="corpus: FILE, DIR, hf:owner/name[:config], or stdlib")
    p.add_argument("--out", required=True, help="the DATA_DIR to write")
    add_overwrite_arg(p, "DATA_DIR")
    p.add_argument("--tokenizer", default="bpe",
                   help=f"{'|'.join(KINDS)}, or a tokenizer.json / directory holding one / hf:owner/name (default bpe)")
    p.add_argument("--vocab-size", type=int, default=None, help=f"BPE vocabulary size (default {DEFAULT_BPE_VOCAB})")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents (or tail bytes) for val (0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split (0)")
    p.add_argument("--split-by", choices=MODES, default="auto",
                   help="documents: random whole documents; tail: the last bytes (one-file corpora); auto (default)")
    p.add_argument("--text-field", default="text", help="JSONL/JSON/Parquet/dataset field(s) with the text; "
                   "NAME1,NAME2 joins several with newlines (default text)")
    p.add_argument("--glob", default=None, help="files to read in a folder (default **/*; hidden files skipped)")
    p.add_argument("--doc-sep", default="eot", help="document separator in text files: eot (<|endoftext|>, "
                   "default), blank (blank lines), line, none (one document per file), or a literal string")
    p.add_argument("--split", default="train", help="which split of a Hugging Face dataset to read (train)")
    p.add_argument("--max-bytes", default=None, help="read at most this much text, e.g. 100MB "
                   f"(stdlib: a fixed sample of whole files, default {STDLIB_MAX_BYTES >> 20}MB)")
    p.add_argument("--tokenizer-sample", default=f"{DEFAULT_SAMPLE >> 20}MB",
                   help="train BPE on an evenly spread sample of this much train text (default 128MB)")
    p.add_argument("--token-dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="integer type of the token files (auto: uint16 when the vocabulary fits, else uint32)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_BLOCK,
                   help=f"tokens per window train/eval will use: warn when a split is shorter than one "
                        f"({DEFAULT_BLOCK})")
    add_deprecated(p, "--dtype", "--token-dtype")
    add_deprecated(p, "--block-size", "--seq-len")
    p.add_argument("--on-invalid-utf8", choices=ON_INVALID, default="replace",
                   help="invalid UTF-8 bytes: replace with U+FFFD (default), skip them, or stop with an error")
    p.add_argument("--eot-token", default=None, help="end-of-text token of a loaded tokenizer (default: found)")
    p.add_argument("--workers", type=int, default=None, help="threads for encoding (default: all cores; 1: one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or log lines on stderr")
    add_clean_args(p)


def run_prepare(args: argparse.Namespace) -> int:
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = show
        meta = prepare(args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field, glob=args.glob,
                       progress=not args.no_progress, doc_sep=args.doc_sep, split=args.split,
                       split_by=args.split_by, max_bytes=args.max_bytes, tokenizer_sample=args.tokenizer_sample,
                       dtype=args.token_dtype, block_size=args.seq_len, on_invalid_utf8=args.on_invalid_utf8,
                       eot_token=args.eot_token, workers=args.workers, overwrite=args.overwrite,
                       **vars(options_from_args(args)))
    print(json.dumps(meta, indent=2))
    return 0
