"""Issue 28 item 6: output lines match input lines.

One reader (scalelm.data.lines) for every line input, file or stdin: lines end at "\\n" only (not at
U+2028, \\x0c, \\x85, \\x1c as str.splitlines() has them), a trailing "\\r" goes, blank lines stay
inputs. `translate --input -` gives as many lines as it reads; `classify --input` answers every
line, blank ones included, with records that carry the input's index and text; the JSONL readers
of classify and SFT keep a U+2028 inside a JSON string."""

import io
import json
import sys

import pytest
import torch
from train_helpers import cli

from scalelm.config import ModelConfig
from scalelm.data.lines import LineInputError, read_lines, split_lines
from scalelm.model.build import build_model
from scalelm.model.io import save_model_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ODD = "Hello\u2028world", "form\x0cfeed", "next\x85line", "file\x1csep"  # one line each, 4 in all
ODD_TEXT = "\n".join(ODD) + "\n"


def test_split_lines_ends_lines_at_newline_only():
    assert split_lines(ODD_TEXT) == list(ODD)
    assert len(ODD_TEXT.splitlines()) == 8  # what the old stdin path did
    assert split_lines("a\r\n\r\nb") == ["a", "", "b"]  # CRLF; a blank line is a line
    assert split_lines("a\n\n") == ["a", ""] and split_lines("\n") == [""] and split_lines("") == []
    assert split_lines("a\rb\n") == ["a\rb"]  # a lone \r is no line end


def test_read_lines_reads_files_and_stdin_alike(tmp_path, monkeypatch):
    data = ("\ufeff" + ODD_TEXT.replace("\n", "\r\n") + "\r\n").encode("utf-8")  # BOM, CRLF, a trailing blank line
    f = tmp_path / "in.txt"
    f.write_bytes(data)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert read_lines(f) == read_lines("-") == [*ODD, ""]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\n")))
    with pytest.raises(LineInputError, match="standard input is not UTF-8 \\(byte 3\\)"):
        read_lines("-")
    with pytest.raises(LineInputError, match="--source .* not found"):
        read_lines(tmp_path / "missing", "--source")


@pytest.fixture(scope="module")
def translator(tmp_path_factory, tiny_tokenizer_json):
    d = tmp_path_factory.mktemp("lines") / "dec"
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32, init_std=0.3))
    save_model_dir(m, d, tokenizer_json=tiny_tokenizer_json,
                   extra={"task": {"name": "translate", "arch": "decoder", "eot_id": 0, "separator": "=>"}})
    return d


def test_translate_from_stdin_gives_one_line_per_input_line(translator, tmp_path, monkeypatch):
    text = ODD_TEXT + "\nlast\r\n"  # 4 odd lines, a blank one, a CRLF one: 6 lines
    f = tmp_path / "in.txt"
    f.write_text(text, encoding="utf-8", newline="")
    rc, from_file, se = cli("translate", translator, "--input", f, "--max-new-tokens", "4")
    assert rc == 0 and "Traceback" not in se, se
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    rc, from_stdin, se = cli("translate", translator, "--input", "-", "--max-new-tokens", "4")
    assert rc == 0 and "Traceback" not in se, se
    lines = from_stdin.split("\n")
    assert len(lines) == 7 and lines[-1] == "" and lines[4] == ""  # 6 lines out, the blank one blank
    assert from_stdin == from_file and "translated 6 lines" in se
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n")))
    rc, so, se = cli("translate", translator, "--input", "-")
    assert rc == 2 and so == "" and "standard input is not UTF-8 (byte 3)" in se and "Traceback" not in se


# ----------------------------------------------------------------------------- classify


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_tokenizer_json):
    from scalelm.model import GPT
    from scalelm.tasks.classify.files import ClassifierFiles
    from scalelm.tasks.classify.model import Classifier

    d = tmp_path_factory.mktemp("cls") / "model"
    torch.manual_seed(0)
    model = Classifier(GPT(ModelConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32)), 2)
    ClassifierFiles({"labels": ["neg", "pos"], "append_eos": True, "max_length": 32, "text_field": "text"}).save(
        model, model.state_dict(), d, tiny_tokenizer_json, {})
    return d


def _records(so):
    lines = so.split("\n")
    assert lines[-1] == "" and len(so.splitlines()) == len(lines) - 1  # no raw U+2028 to cut a record in two
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("name, content, texts", [
    ("in.txt", f"good film\n\n  \n{ODD[0]}\r\nbad\n", ["good film", "", "", ODD[0], "bad"]),
    ("in.csv", 'text,id\ngood film,1\n,,\n"two\nlines",3\n\n', ["good film", "", "two\nlines", ""]),
    ("in.jsonl", json.dumps({"text": ODD[0]}, ensure_ascii=False) + '\n\n{"text": ""}\n{"text": "bad"}\n',
     [ODD[0], "", "", "bad"]),
])
def test_classify_answers_every_input_with_its_index_and_text(classifier, tmp_path, name, content, texts):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8", newline="")
    rc, so, se = cli("classify", classifier, "--input", f)
    assert rc == 0 and "Traceback" not in se, se
    rows = _records(so)
    assert [r["index"] for r in rows] == list(range(len(texts))) and [r["text"] for r in rows] == texts
    for r in rows:
        if r["text"].strip():
            assert r["label"] in ("neg", "pos") and r["label"] == max(r["probs"], key=r["probs"].get)
        else:
            assert r["label"] is None and r["probs"] is None
    blank = sum(not t.strip() for t in texts)
    assert f"{blank} of {len(texts)} inputs are blank" in se
    # a record's label does not depend on its neighbours or on the blank lines around it
    alone = {r["text"]: r["probs"] for r in rows if r["text"].strip()}
    for t, probs in alone.items():
        if "\n" not in t and "\u2028" not in t:
            rc, so, _ = cli("classify", classifier, "--text", t)
            assert rc == 0 and _records(so)[0]["probs"] == probs and _records(so)[0]["index"] == 0


def test_labelled_jsonl_keeps_a_line_separator_inside_a_string(tmp_path):
    from scalelm.tasks.classify.data import read_examples
    from scalelm.tasks.sft.formats import read_records

    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "label": "a", "prompt": t, "response": "r"}, ensure_ascii=False)
                           for t in ODD) + "\n\n", encoding="utf-8")
    assert [e.text for e in read_examples(f)] == list(ODD)  # blank lines are no training examples
    assert [obj["prompt"] for _, obj in read_records(f)] == list(ODD)
