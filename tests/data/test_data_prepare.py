"""`scalelm prepare` end to end: the DATA_DIR format, determinism, every input form, bad input."""

import json
import time

import numpy as np
import pytest
from conftest import run_cli
from tokenizers import Tokenizer

from scalelm.data.loader import BatchLoader, DataError, TokenData
from scalelm.data.prepare import parse_size, prepare
from scalelm.data.readers import DataWarning
from scalelm.errors import UserError

# small corpora warn that a split is shorter than a 1024-token window; tests that check it use pytest.warns
pytestmark = pytest.mark.filterwarnings("ignore::scalelm.data.readers.DataWarning")


def read_docs(data: TokenData, split: str) -> list[str]:
    """Decode a split back into its documents (the end-of-text id separates them)."""
    tok, ids = data.tokenizer(), np.asarray(data.tokens(split), dtype=np.int64)
    cuts = np.flatnonzero(ids == data.eot_id)
    starts = np.concatenate([[0], cuts + 1])
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, np.concatenate([cuts, [len(ids)]])) if b > a]


def check_format(out, meta):
    """Everything the DATA_DIR contract promises."""
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta and meta["format"] == "scalelm-data" and meta["version"] == 1
    tj = (out / "tokenizer.json").read_text()
    import hashlib

    assert meta["tokenizer"]["sha256"] == hashlib.sha256(tj.encode()).hexdigest()
    tok = Tokenizer.from_str(tj)
    vocab = tok.get_vocab(with_added_tokens=True)
    assert vocab_id(vocab, meta["tokenizer"]["eot_id"]) in ("<|endoftext|>", "</s>")
    assert meta["dtype"] == ("uint16" if meta["tokenizer"]["vocab_size"] <= 65536 else "uint32")
    data = TokenData(out)
    for s in ("train", "val"):
        info = meta["splits"][s]
        toks = data.tokens(s)
        assert len(toks) == info["tokens"] > 0 and info["documents"] >= 1 and info["bytes"] > 0
        assert int(toks.max()) < meta["tokenizer"]["vocab_size"]
    assert set(meta) >= {"source", "inputs_sha256", "created", "splits", "tokenizer", "dtype"}
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temporary directory was left behind"
    return data


def vocab_id(vocab, i):
    return next(t for t, j in vocab.items() if j == i)


def test_char_shakespeare_cli_tail_split_roundtrips(shared_data, tmp_path):
    src = shared_data / "tinyshakespeare" / "input.txt"
    out = tmp_path / "shk"
    p = run_cli("prepare", "--input", src, "--out", out, "--tokenizer", "char")
    meta = json.loads(p.stdout)  # machine-readable meta on stdout, logs on stderr
    data = check_format(out, meta)
    assert meta["tokenizer"]["kind"] == "char" and meta["tokenizer"]["vocab_size"] == 65 + 3
    assert meta["split"]["by"] == "tail" and meta["inputs_sha256"] == \
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # = sha256sum input.txt
    text = src.read_text()
    tok = data.tokenizer()
    train = tok.decode(np.asarray(data.tokens("train"), np.int64).tolist())
    val = tok.decode(np.asarray(data.tokens("val"), np.int64).tolist()[:-1])  # ends with end-of-text
    assert train + val == text  # nothing lost, nothing added: val is the last ~10%, from a line start
    assert train.endswith("\n") and 0.09 < len(val) / len(text) < 0.11
    assert data.bytes_per_token("train") == 1.0
    x, y = BatchLoader(data.tokens("train"), 4, 64, seed=0).next_batch()
    assert x.shape == (4, 64) and tok.decode(x[0].tolist()) in text


def test_bpe_tinystories_by_document(shared_data, tmp_path):
    src = shared_data / "tinystories" / "tinystories_sample.txt"
    meta = prepare(str(src), str(tmp_path / "ts"), vocab_size=2048, progress=False)
    data = check_format(tmp_path / "ts", meta)
    stories = [s.strip() for s in src.read_text().split("<|endoftext|>") if s.strip()]
    assert meta["split"]["by"] == "documents" and meta["tokenizer"]["vocab_size"] == 2048
    train, val = read_docs(data, "train"), read_docs(data, "val")
    assert len(val) == round(len(stories) * 0.1) == meta["splits"]["val"]["documents"]
    assert sorted(train + val) == sorted(stories)  # every story once, disjoint splits, exact text
    assert meta["splits"]["train"]["bytes"] == sum(len(s.encode()) for s in train)
    assert 3 < data.bytes_per_token("train") < 6  # BPE compresses English about 4x


def test_deterministic_and_seeded(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    corpus.write_text("<|endoftext|>".join(" ".join(rng.choice(words, 50)) for _ in range(300)))
    a = prepare(str(corpus), str(tmp_path / "a"), vocab_size=300, progress=False)
    b = prepare(str(corpus), str(tmp_path / "b"), vocab_size=300, progress=False, workers=1)
    c = prepare(str(corpus), str(tmp_path / "c"), vocab_size=300, progress=False, seed=1)
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    drop = lambda m: {k: v for k, v in m.items() if k != "created"}
    assert drop(a) == drop(b)
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    assert c["splits"]["val"]["documents"] == a["splits"]["val"]["documents"] == 30  # other documents, same count


def test_jsonl_cli_with_two_fields(shared_data, tmp_path):
    src = shared_data / "gsm8k" / "train.jsonl"
    out = tmp_path / "gsm"
    p = run_cli("prepare", "--input", src, "--out", out, "--tokenizer", "byte", "--text-field", "question,answer",
                "--max-bytes", "300k", "--no-progress")
    meta = json.loads(p.stdout)
    data = check_format(out, meta)
    first = json.loads(src.read_text().splitlines()[0])
    docs = read_docs(data, "train") + read_docs(data, "val")
    assert f"{first['question']}\n{first['answer']}" in docs
    assert meta["source"]["text_field"] == "question,answer" and meta["stats"]["truncated"]
    assert meta["tokenizer"] == {**meta["tokenizer"], "kind": "byte", "vocab_size": 258, "eot_id": 256}


def test_stdlib_corpus(tmp_path):
    meta = prepare("stdlib", str(tmp_path / "std"), tokenizer="byte", max_bytes="1MB", progress=False)
    check_format(tmp_path / "std", meta)
    assert meta["source"]["type"] == "stdlib" and meta["source"]["max_bytes"] == 1 << 20
    assert meta["stats"]["bytes"] <= 1 << 20 and meta["split"]["by"] == "documents"
    again = prepare("stdlib", str(tmp_path / "std2"), tokenizer="byte", max_bytes="1MB", progress=False)
    assert again["inputs_sha256"] == meta["inputs_sha256"]


def test_saved_dataset_and_user_tokenizer(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"row {i}: " + "text " * (i % 9) for i in range(60)]
    datasets.Dataset.from_dict({"content": rows}).save_to_disk(str(tmp_path / "ds"))
    first = prepare(str(tmp_path / "ds"), str(tmp_path / "a"), tokenizer="char", text_field="content",
                    progress=False)
    data = check_format(tmp_path / "a", first)
    assert first["source"]["type"] == "hf-disk" and sorted(read_docs(data, "train") + read_docs(data, "val")) \
        == sorted(r.strip() if False else r for r in rows)
    # a tokenizer from another DATA_DIR (as from a checkpoint) is reused as is
    second = prepare(str(tmp_path / "ds"), str(tmp_path / "b"), tokenizer=str(tmp_path / "a"),
                     text_field="content", progress=False)
    assert second["tokenizer"]["kind"] == "file" and second["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]


def test_vocab_larger_than_uint16(tmp_path):
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab.update({"<unk>": 70_000, "<|endoftext|>": 70_001})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("<|endoftext|>".join(f"w{i} w{69_999 - i} w{i * 7}" for i in range(40)))
    with pytest.raises(UserError, match="does not fit uint16"):
        prepare(str(corpus), str(tmp_path / "u16"), tokenizer=str(tmp_path / "big.json"), dtype="uint16",
                progress=False)
    assert not (tmp_path / "u16").exists()
    meta = prepare(str(corpus), str(tmp_path / "u32"), tokenizer=str(tmp_path / "big.json"), progress=False)
    data = check_format(tmp_path / "u32", meta)
    assert meta["dtype"] == "uint32" and int(data.tokens("train").max()) >= 65536


def test_small_val_warns_with_the_context_it_allows(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("".join(f"line {i}\n" for i in range(60)))
    with pytest.warns(DataWarning, match=r"validation split has \d+ tokens.*at most \d+ tokens"):
        meta = prepare(str(corpus), str(tmp_path / "d"), tokenizer="char", block_size=256, progress=False)
    assert any("validation split" in w for w in meta["warnings"])
    data = TokenData(tmp_path / "d")
    n = meta["splits"]["val"]["tokens"]
    data.check_window("val", n - 1)
    with pytest.raises(DataError):
        data.check_window("val", 256)


def test_bad_inputs_fail_clearly_and_leave_nothing(tmp_path):
    with pytest.raises(UserError, match="input not found"):
        prepare(str(tmp_path / "missing.txt"), str(tmp_path / "o"), progress=False)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        prepare(str(tmp_path / "empty.txt"), str(tmp_path / "o"), progress=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(bytes(range(256)) * 4)
    with pytest.warns(DataWarning, match="binary"), pytest.raises(UserError, match="empty.*1 binary file"):
        prepare(str(tmp_path / "bin"), str(tmp_path / "o"), progress=False)
    with pytest.raises(UserError, match="--vocab-size applies to --tokenizer bpe only"):
        prepare(str(tmp_path / "bin"), str(tmp_path / "o"), tokenizer="char", vocab_size=100, progress=False)
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_invalid_utf8_warns_with_a_count(tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("caf\u00e9 na\u00efve r\u00e9sum\u00e9\n".encode("latin-1") * 30)
    with pytest.warns(DataWarning, match=r"120 invalid UTF-8 sequence\(s\) replaced"):
        meta = prepare(str(corpus), str(tmp_path / "d"), tokenizer="byte", progress=False)
    assert meta["stats"]["invalid_utf8"] == 120
    with pytest.raises(UserError, match="invalid UTF-8"):
        prepare(str(corpus), str(tmp_path / "e"), tokenizer="byte", on_invalid_utf8="error", progress=False)


def test_out_dir_is_protected_and_replaced_atomically(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("<|endoftext|>".join(f"doc {i} " * 20 for i in range(30)))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for overwrite in (False, True):  # never another folder
        with pytest.raises(UserError, match="does not hold a prepared DATA_DIR"):
            prepare(str(corpus), str(precious), tokenizer="byte", progress=False, overwrite=overwrite)
    assert (precious / "notes.txt").read_text() == "keep me"
    out = tmp_path / "d"
    prepare(str(corpus), str(out), tokenizer="byte", progress=False)
    with pytest.raises(UserError, match="already holds a prepared DATA_DIR: pass --overwrite"):
        prepare(str(corpus), str(out), tokenizer="char", progress=False)
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["kind"] == "byte"
    meta = prepare(str(corpus), str(out), tokenizer="char", progress=False, overwrite=True)  # a DATA_DIR is replaced
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["kind"] == "char" == meta["tokenizer"]["kind"]


def test_folder_input_may_contain_the_output(tmp_path):
    (tmp_path / "a.txt").write_text("first document " * 10)
    (tmp_path / "b.txt").write_text("second document " * 10)
    meta = prepare(str(tmp_path), str(tmp_path / "data"), tokenizer="byte", progress=False)
    assert meta["stats"]["files"] == 2
    again = prepare(str(tmp_path), str(tmp_path / "data"), tokenizer="byte", progress=False, overwrite=True)
    assert again["stats"]["files"] == 2 and again["inputs_sha256"] == meta["inputs_sha256"]


def test_hub_names_fail_fast_offline(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    t = time.monotonic()
    p = run_cli("prepare", "--input", "hf:nobody/no-such-dataset", "--out", tmp_path / "o", check=False,
                env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "hf:nobody/no-such-dataset" in p.stderr and "Traceback" not in p.stderr
    # no network: the probe fails at once (a refused local port stands in for an unreachable Hub)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub to load hf:owner/name.*save_to_disk"):
        prepare("hf:owner/name:config", str(tmp_path / "o"), progress=False)
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub to load hf:gpt2"):
        prepare(str(tmp_path / "x.txt"), str(tmp_path / "o"), tokenizer="hf:gpt2", progress=False)
    with pytest.raises(UserError, match="bad Hub name"):
        prepare("hf:a/b/c", str(tmp_path / "o"), progress=False)
    assert time.monotonic() - t < 120
    assert not (tmp_path / "o").exists()


def test_parse_size():
    assert parse_size("8MB") == 8 << 20 and parse_size("1.5k") == 1536 and parse_size("100") == 100
    assert parse_size(None) is None and parse_size("2GiB") == 2 << 30
    with pytest.raises(UserError, match="cannot read the size"):
        parse_size("lots")


def test_byte_ids_match_the_tokenizer_even_with_special_token_text(tmp_path):
    recs = [{"text": "plain ascii"}, {"text": "ünïcödé 😀"}, {"text": "has <|endoftext|> inside"}, {"text": "<|pad|>"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs * 5))
    meta = prepare(str(tmp_path / "r.jsonl"), str(tmp_path / "d"), tokenizer="byte", split_by="tail",
                   progress=False)
    data = TokenData(tmp_path / "d")
    tok = data.tokenizer()
    ids = np.concatenate([data.tokens("train"), data.tokens("val")]).astype(np.int64).tolist()
    expected = []
    for r in recs * 5:
        expected += tok.encode(r["text"]).ids + [meta["tokenizer"]["eot_id"]]
    assert ids == expected and 256 in tok.encode(recs[2]["text"]).ids


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_loader_on_prepared_data_resumes_exactly_and_splits_ranks(shared_data, tmp_path, mode):
    prepare(str(shared_data / "tinyshakespeare" / "input.txt"), str(tmp_path / "d"), tokenizer="char",
            progress=False)
    toks = TokenData(tmp_path / "d").tokens("train")
    full = BatchLoader(toks, 4, 32, grad_accum_steps=2, seed=5, mode=mode)
    stream = [full.next_batch()[0] for _ in range(12)]
    part = BatchLoader(toks, 4, 32, grad_accum_steps=2, seed=5, mode=mode)
    for _ in range(5):
        part.next_batch()
    resumed = BatchLoader(toks, 4, 32, grad_accum_steps=2, seed=5, mode=mode)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert all(np.array_equal(resumed.next_batch()[0], stream[i]) for i in range(5, 12))
    ranks = [BatchLoader(toks, 4, 32, dp_rank=r, dp_world=2, seed=5, mode=mode) for r in range(2)]
    a, b = ranks[0].next_batch()[0], ranks[1].next_batch()[0]
    import torch

    assert torch.equal(torch.cat([a, b]), torch.cat(stream[:2]))  # the same global batch, split by rank
