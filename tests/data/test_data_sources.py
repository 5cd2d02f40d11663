"""Corpus readers: documents and pieces from every input form, bad input counted, the split plan."""

import gzip
import json
import random

import pytest

from scalelm.data import readers
from scalelm.data.readers import (
    DocSplitter,
    SourceError,
    Stats,
    cut_point,
    separator_regex,
)
from scalelm.data.sources import open_source, stdlib_files, stream
from scalelm.data.split import SplitPlan
from scalelm.errors import UserError


def docs_of(pieces):
    """Join pieces into documents."""
    out, cur = [], []
    for text, end, *_ in pieces:
        cur.append(text)
        if end:
            out.append("".join(cur))
            cur = []
    assert not cur, "the stream ended inside a document"
    return out


def split_in_chunks(text, sep, seed, piece_chars=None, monkeypatch=None):
    rng = random.Random(seed)
    st = Stats()
    sp = DocSplitter(separator_regex(sep), st)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 40)
        pieces += sp.feed(text[i:i + n])
        i += n
    pieces += sp.feed("", final=True)
    return pieces, st


@pytest.mark.parametrize("seed", range(4))
def test_separators_found_across_chunk_boundaries(seed):
    stories = [f"story {i} " + "word " * (i * 3 % 17) + "end." for i in range(30)]
    text = "\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n"
    pieces, st = split_in_chunks(text, "eot", seed)
    assert docs_of(pieces) == stories
    blank = "\n\n  \n".join(stories)
    assert docs_of(split_in_chunks(blank, "blank", seed)[0]) == stories
    lines = "\n".join(stories) + "\n\n"
    pieces, st = split_in_chunks(lines, "line", seed)
    assert docs_of(pieces) == stories and st.empty_documents == 1
    assert docs_of(split_in_chunks("a;;b;;c", ";;", seed)[0]) == ["a", "b", "c"]  # literal separator


def test_one_document_file_keeps_its_bytes_and_long_documents_are_cut_into_pieces(monkeypatch):
    monkeypatch.setattr(readers, "PIECE_CHARS", 1000)
    text = "".join(f"line {i} of a long document\n" for i in range(2000))
    pieces, _ = split_in_chunks(text, "none", 0)
    assert docs_of(pieces) == [text]
    assert len(pieces) > 40 and all(len(p) <= 1000 for p, _ in pieces)
    assert all(p.endswith("document") for p, end in pieces if not end)  # cut before a newline after a letter


def test_pieces_encode_exactly_like_the_whole_text(shared_data):
    """The cut points never change GPT-2 style byte-level BPE tokens."""
    from scalelm.data.tokenizer import train_bpe

    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:300_000]
    code = "".join(p.read_text() for p in stdlib_files(300_000)[1][:40])
    tok = train_bpe(iter([text[:100_000], code[:100_000]]), 1000)
    for t in (text, code):
        pieces = []
        while len(t) > 5000:
            c = cut_point(t, 5000)
            pieces.append(t[:c])
            t = t[c:]
        pieces.append(t)
        whole = tok.encode("".join(pieces)).ids
        assert [i for p in pieces for i in tok.encode(p).ids] == whole


def test_text_file_stats_hash_and_bad_bytes(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(readers, "BINARY_PROBE", 8)  # a NUL after the probe is a stray byte, not a binary file

    raw = b"caf\xc3\xa9 ok\n" + b"bad \xff\xfe byte\n" + b"nul\x00here<|endoftext|>second\n"
    f = tmp_path / "a.txt"
    f.write_bytes(raw)
    st = Stats()
    docs = docs_of(stream(open_source(str(f)), st))
    assert docs == ["caf\u00e9 ok\nbad \ufffd\ufffd byte\nnulhere", "second\n"]
    assert st.invalid_utf8 == 2 and st.nul_bytes == 1 and st.documents == 2
    assert st.inputs_sha256() == hashlib.sha256(raw).hexdigest()  # = sha256sum of the file
    st = Stats()
    assert docs_of(stream(open_source(str(f), on_invalid="skip"), st))[0] == "caf\u00e9 ok\nbad  byte\nnulhere"
    with pytest.raises(SourceError, match="invalid UTF-8 near byte 13"):
        list(stream(open_source(str(f), on_invalid="error"), Stats()))


def test_folder_sorted_hidden_and_binary_skipped_gzip_read(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("sea")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("hidden")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with gzip.open(tmp_path / "z.txt.gz", "wt") as g:
        g.write("zipped")
    st = Stats()
    src = open_source(str(tmp_path))
    assert docs_of(stream(src, st)) == ["ay", "bee", "sea", "zipped"]
    assert st.binary_files == ["img.png"] and st.files == 4
    assert docs_of(stream(open_source(str(tmp_path), glob="**/*.md"), Stats())) == ["sea"]
    with pytest.raises(SourceError, match="no files match"):
        open_source(str(tmp_path), glob="*.nothing")


def test_jsonl_json_and_text_fields(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}", "text": f"t{i}"} for i in range(5)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{broken json")
    lines.insert(3, json.dumps({"q": "no answer"}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n\n")
    st = Stats()
    docs = docs_of(stream(open_source(str(tmp_path / "d.jsonl"), text_field="q,a"), st))
    assert docs == [f"question {i}\nanswer {i}" for i in range(5)]
    assert st.bad_records == 1 and st.missing_text == 1 and "d.jsonl:3" in st.bad_records_first
    (tmp_path / "arr.json").write_text(json.dumps(rows + [{"q": "alpaca", "a": "", "text": ""}]))
    assert docs_of(stream(open_source(str(tmp_path / "arr.json")), Stats())) == [f"t{i}" for i in range(5)]
    assert docs_of(stream(open_source(str(tmp_path / "arr.json"), text_field="q,a,text"), Stats()))[-1] == "alpaca"
    with pytest.raises(SourceError, match="no field 'body'.*it has: a, q, text.*--text-field"):
        list(stream(open_source(str(tmp_path / "d.jsonl"), text_field="body"), Stats()))
    (tmp_path / "obj.json").write_text("[1, 2]")
    with pytest.raises(SourceError, match="JSON objects"):
        list(stream(open_source(str(tmp_path / "obj.json")), Stats()))


def test_parquet_and_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one", None, "three"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    st = Stats()
    assert docs_of(stream(open_source(str(tmp_path / "t.parquet"), text_field="body"), st)) == ["one", "three"]
    assert st.missing_text == 1
    with pytest.raises(SourceError, match="no column 'text'.*body, n"):
        list(stream(open_source(str(tmp_path / "t.parquet")), Stats()))

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b", "c d", "e"]}),
                               "test": datasets.Dataset.from_dict({"text": ["held out"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    st = Stats()
    src = open_source(str(tmp_path / "dd"))
    assert src.kind == "hf-disk" and docs_of(stream(src, st)) == ["a b", "c d", "e"] and st.files >= 1
    assert docs_of(stream(open_source(str(tmp_path / "dd"), split="test"), Stats())) == ["held out"]
    with pytest.raises(SourceError, match="no 'validation'.*--split"):
        open_source(str(tmp_path / "dd"), split="validation")
    with pytest.raises(SourceError, match="no column 'body'"):
        open_source(str(tmp_path / "dd"), text_field="body")


def test_missing_input_and_max_bytes(tmp_path):
    with pytest.raises(SourceError, match="input not found.*stdlib"):
        open_source(str(tmp_path / "nope.txt"))
    (tmp_path / "a.txt").write_text("x" * 100 + "<|endoftext|>" + "y" * 100)
    st = Stats()
    assert docs_of(stream(open_source(str(tmp_path / "a.txt")), st, max_bytes=150)) == ["x" * 100, "y" * 50]
    assert st.truncated and st.bytes == 150


def test_stdlib_is_deterministic_without_tests_and_capped():
    root, files = stdlib_files(None)
    rels = [p.relative_to(root).as_posix() for p in files]
    assert rels == sorted(rels) and "os.py" in rels and len(rels) > 100
    assert not any("/test/" in "/" + r or r.startswith("test/") or "site-packages" in r for r in rels)
    root2, capped = stdlib_files(2 << 20)
    assert capped == stdlib_files(2 << 20)[1] and sum(p.stat().st_size for p in capped) <= 2 << 20
    dirs = {p.relative_to(root).parts[0] for p in capped}
    assert len(dirs) > 5  # a spread-out sample, not the alphabetically first modules


def test_split_plan_by_documents_is_exact_and_seeded():
    def val_docs(seed, n=1000, f=0.1):
        plan = SplitPlan(n, 10_000, f, seed)
        return [i for i in range(n) if plan.assign("x", True, 1)[0][0] == "val"]

    a = val_docs(0)
    assert len(a) == 100 and a == val_docs(0) and a != val_docs(1)
    assert len(val_docs(0, n=12)) == 1  # round(1.2)
    assert SplitPlan(5, 100, 0.1, 0).mode == "tail"  # fewer documents than 1 / val_fraction
    with pytest.raises(UserError, match="cannot be split by document"):
        SplitPlan(1, 100, 0.1, 0, "documents")
    with pytest.raises(UserError, match="between 0 and 1"):
        SplitPlan(10, 100, 1.0, 0)


def test_split_plan_tail_starts_val_on_a_line():
    text = "".join(f"line {i:03d}\n" for i in range(100))  # 900 bytes
    plan = SplitPlan(1, len(text), 0.1, 0)
    out = plan.assign(text, True, len(text))
    assert [s for s, _, _ in out] == ["train", "val"] and out[0][1] + out[1][1] == text
    assert out[1][1].startswith("line 091") and out[0][2] is False and out[1][2] is True
    plan = SplitPlan(1, 20, 0.1, 0)
    out = plan.assign("no newline at all ok", True, 20)  # nowhere to cut on a line: cut mid-line
    assert out[1][1] == "ok" and out[0][1] == "no newline at all "


def test_windows_line_ends_become_newlines_even_across_read_chunks(tmp_path, monkeypatch):
    """A novel saved on Windows (BOM, CRLF) reads as "\\n" text: the tokenizer never learns "\\r\\n",
    blank-line separators still split it, and a "\\r\\n" cut between two read chunks is one line end."""
    import scalelm.data.readers as readers

    monkeypatch.setattr(readers, "READ_BYTES", 7)  # many chunk boundaries, some between "\r" and "\n"
    body = "Chapter 1\r\n\r\nIt was a dark night.\r\nThe end.\r\n\r\nChapter 2\r\nA lone \r stays.\r\n"
    f = tmp_path / "novel.txt"
    f.write_bytes("\ufeff".encode() + body.encode())
    st = readers.Stats()
    docs = [t for t, _ in readers.read_text(f, "novel.txt", st, readers.DOC_SEPARATORS["blank"], "error")]
    text = "".join(docs)
    assert "\r\n" not in text and "\ufeff" not in text and "A lone \r stays." in text
    assert st.crlf_lines == body.count("\r\n") and st.to_dict()["crlf_lines"] == st.crlf_lines
