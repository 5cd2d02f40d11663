"""Tokenizer kinds, loading from every place a tokenizer lives, and the same-tokenizer check."""

import json

import pytest
from tokenizers import Tokenizer

from scalelm.data.tokenizer import (
    EOT,
    PAD,
    UNK,
    TokenizerError,
    byte_tokenizer,
    char_tokenizer,
    check_same_tokenizer,
    dtype_for_vocab,
    ensure_eot,
    load_tokenizer,
    special_ids,
    train_bpe,
    vocab_size_of,
)

TEXT = "Hello, wörld! 😀 tabs\tand\nnew lines\r\n  indented: x = [1, 2]\n"


def _roundtrip(tok, text):
    tok = Tokenizer.from_str(tok.to_str())  # consumers load from JSON
    return tok.decode(tok.encode(text).ids)


def test_byte_tokenizer_is_the_utf8_bytes_and_roundtrips():
    tok = byte_tokenizer()
    assert tok.encode(TEXT).ids == list(TEXT.encode("utf-8"))
    assert _roundtrip(tok, TEXT) == TEXT
    assert special_ids(tok) == (256, 257) and vocab_size_of(tok) == 258
    assert tok.encode("a" + EOT).ids == [97, 256]


def test_char_tokenizer_roundtrips_and_maps_unseen_characters_to_unk():
    tok = char_tokenizer(set(TEXT))
    assert _roundtrip(tok, TEXT) == TEXT
    assert len(tok.encode(TEXT).ids) == len(TEXT)
    vocab = tok.get_vocab()
    assert [vocab[EOT], vocab[PAD], vocab[UNK]] == [0, 1, 2]
    assert vocab_size_of(tok) == len(set(TEXT)) + 3
    assert tok.encode("Hq").ids == [vocab["H"], vocab[UNK]]  # 'q' is not in TEXT


def test_bpe_trains_from_an_iterator_with_specials_first():
    lines = [f"def function_{i % 7}(x):\n    return x * {i}\n" for i in range(400)]
    tok = train_bpe(iter(lines), 300)
    assert vocab_size_of(tok) == 300 and special_ids(tok) == (0, 1)
    assert _roundtrip(tok, TEXT) == TEXT  # byte-level: any text, even unseen characters
    assert len(tok.encode(lines[0]).ids) < len(lines[0]) / 2
    with pytest.raises(TokenizerError, match="at least 258"):
        train_bpe(iter(lines), 100)


def test_load_tokenizer_from_file_dir_and_errors(tmp_path):
    tok = char_tokenizer("abc")
    (tmp_path / "d").mkdir()
    tok.save(str(tmp_path / "d" / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "d" / "tokenizer.json").to_str() == tok.to_str()
    assert load_tokenizer(tmp_path / "d").to_str() == tok.to_str()  # a DATA_DIR / checkpoint / HF dir
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    run = tmp_path / "run"  # a RUN_DIR means its latest checkpoint
    for step, t in ((1, char_tokenizer("xy")), (2, tok)):
        (run / f"ckpt-{step:08d}").mkdir(parents=True)
        (run / f"ckpt-{step:08d}" / "config.json").write_text("{}")
        t.save(str(run / f"ckpt-{step:08d}" / "tokenizer.json"))
    assert load_tokenizer(run).to_str() == tok.to_str()
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_load_tokenizer_converts_a_hf_dir_without_tokenizer_json(tmp_path):
    pytest.importorskip("transformers")
    bpe = train_bpe(iter(["the quick brown fox jumps over the lazy dog\n"] * 50), 300)
    d = tmp_path / "hf"
    d.mkdir()
    bpe.model.save(str(d))  # vocab.json + merges.txt: a GPT-2 style slow tokenizer
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    tok = load_tokenizer(d)
    assert tok.decode(tok.encode("the lazy fox").ids) == "the lazy fox"
    assert tok.encode("the lazy fox").ids == bpe.encode("the lazy fox").ids


def test_ensure_eot_uses_native_end_token_or_adds_one():
    from tokenizers import models

    native = Tokenizer(models.WordLevel({"a": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    eot, pad, added = ensure_eot(native)
    assert (eot, pad, added) == (1, None, False)
    bare = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    eot, _, added = ensure_eot(bare)
    assert added and eot == 2 and bare.get_vocab()[EOT] == 2
    with pytest.raises(TokenizerError, match="no token"):
        ensure_eot(native, "<|nope|>")


def test_dtype_for_vocab():
    assert dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(65537) == "uint32"
    with pytest.raises(TokenizerError, match="does not fit uint16"):
        dtype_for_vocab(70000, "uint16")


def test_check_same_tokenizer(tmp_path):
    a, b = char_tokenizer("abc"), char_tokenizer("abd")
    d = tmp_path / "data"
    d.mkdir()
    (d / "tokenizer.json").write_text(a.to_str())
    from scalelm.data.tokenizer import tokenizer_sha256

    (d / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "char", "vocab_size": 6,
                                                           "sha256": tokenizer_sha256(a.to_str())}}))
    assert check_same_tokenizer(d, a.to_str()) is True
    pretty = json.dumps(json.loads(a.to_str()), indent=4)  # same tokenizer, other formatting
    assert check_same_tokenizer(d, pretty) is True
    assert check_same_tokenizer(d, None) is False
    with pytest.raises(TokenizerError, match="different tokenizer than the checkpoint.*scalelm prepare"):
        check_same_tokenizer(d, b.to_str())
    with pytest.raises(TokenizerError, match="not a readable prepared data directory"):
        check_same_tokenizer(tmp_path / "missing", a.to_str())


def test_a_masked_lm_tokenizer_is_the_datas_plus_its_mask_token(tmp_path):
    """with_mask_token appends <|mask|> at the id masked-LM training uses (other ids unchanged); a
    checkpoint with that tokenizer matches the data, one with any other added token does not."""
    from scalelm.data.tokenizer import mask_token_id, tokenizer_sha256, vocab_size_of, with_mask_token

    a = char_tokenizer("abc")
    grown, mask = with_mask_token(a.to_str())
    g = Tokenizer.from_str(grown)
    assert mask == mask_token_id(a) == vocab_size_of(a) and g.token_to_id("<|mask|>") == mask
    assert g.encode("cab").ids == a.encode("cab").ids and g.encode("a<|mask|>").ids == [a.token_to_id("a"), mask]
    assert with_mask_token(grown) == (grown, mask) and mask_token_id(g) == mask  # already there: unchanged
    d = tmp_path / "data"
    d.mkdir()
    (d / "tokenizer.json").write_text(a.to_str())
    (d / "meta.json").write_text(json.dumps({"tokenizer": {"sha256": tokenizer_sha256(a.to_str())}}))
    assert check_same_tokenizer(d, grown) is True
    other = char_tokenizer("abc")
    other.add_special_tokens(["<|other|>"])
    with pytest.raises(TokenizerError, match="different tokenizer"):
        check_same_tokenizer(d, other.to_str())
