"""`scalelm prepare` with cleaning: every step in one pass, the report beside meta.json, the output
deterministic, the bad input named, and peak memory bounded on a corpus bigger than the budget."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from test_data_memory import MEASURE
from train_helpers import cli

from scalelm.data.clean import PLACEHOLDERS
from scalelm.data.prepare import prepare

WORDS = ("the of and to a in that with have be morning river garden letter window bridge candle harbour meadow "
         "lantern orchard valley winter summer autumn thunder shadow mirror ribbon pocket basket feather violin "
         "marble compass ladder anchor saddle kettle blanket pillow cottage village stranger").split()
QUESTION = "Which river did the surveyors follow north when they mapped the valley beyond the old stone bridge?"


def prose(seed: int, n: int = 120) -> str:
    rng = random.Random(seed)
    lines = []
    while sum(len(x.split()) for x in lines) < n:
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    docs = [prose(i) for i in range(30)]
    docs[4] = docs[4] + "\nWrite to mary.smith@example.com or call (555) 123-4567; card 4111 1111 1111 1111."
    docs[5] = docs[5] + "\nServer 93.184.216.34 runs version 1.2.3.4, updated on 2024-01-15, order 12345678."
    docs += [
        docs[0],  # an exact copy
        docs[1].replace("\n", " ").upper(),  # a copy up to case and line breaks
        docs[2].replace("morning", "evening", 1),  # a near copy
        "Too short to be a document.",  # fails the quality rules
        prose(99) + "\n" + QUESTION.lower() + "\n" + prose(98),  # an evaluation question inside
    ]
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    evals = root / "eval.jsonl"
    evals.write_text(json.dumps({"question": QUESTION, "answer": "The Avon."}) + "\n")
    return root, path, evals, docs


def decoded(out) -> list[str]:
    """The documents of a byte-tokenized DATA_DIR, train then val."""
    docs = []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", np.uint16)
        cuts = np.flatnonzero(ids == 256)
        starts = np.concatenate(([0], cuts[:-1] + 1))
        docs += [bytes(ids[a:b].astype(np.uint8)).decode() for a, b in zip(starts, cuts)]
    return docs


def clean_run(corpus, out, *extra):
    root, path, evals, _ = corpus
    return cli("prepare", "--input", path, "--out", out, "--tokenizer", "byte", "--seq-len", "16", "--overwrite",
               "--dedup", "minhash", "--scrub-pii", "--quality-filter", "--decontaminate", evals, *extra)


def test_every_step_in_one_run(corpus, tmp_path):
    pytest.importorskip("datasketch")
    _, _, evals, docs = corpus
    rc, so, se = clean_run(corpus, tmp_path / "d")
    assert rc == 0, se
    meta = json.loads(so)
    report = json.loads((tmp_path / "d" / "clean_report.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["decontaminate", "quality", "dedup", "scrub_pii"]
    removed = {s["step"]: s.get("removed_documents") for s in report["steps"]}
    assert removed == {"decontaminate": 1, "quality": 1, "dedup": 3, "scrub_pii": None}
    assert report["documents"] == {"in": 35, "out": 30} == meta["clean"]["documents"]
    assert meta["clean"]["removed"] == {"decontaminate": 1, "quality": 1, "dedup": 3}
    assert meta["clean"]["report"] == "clean_report.json" and meta["clean"]["dedup"] == "minhash"
    dec = report["steps"][0]
    # the JSON line's 21 words (keys included: "question", 17 words, "answer", "the avon") hold 9 13-grams
    assert dec["files"] == [{"file": str(evals), "ngrams": 9, "documents_hit": 1}] and dec["examples"][0]["document"] == 34
    assert report["steps"][1]["by_rule"] == {"min_words": 1}
    assert sorted(e["duplicate_of"] for e in report["steps"][2]["examples"]) == [0, 1, 2]
    pii = report["steps"][3]
    assert pii["replaced"] == {"email": 1, "credit_card": 1, "ip_address": 1, "phone": 1} and pii["documents_changed"] == 2
    assert all("@" not in e["context"] and "4111" not in e["context"] for e in pii["examples"])
    # the DATA_DIR holds the kept documents, scrubbed, and nothing else
    out = sorted(decoded(tmp_path / "d"))
    assert sum(s["documents"] for s in meta["splits"].values()) == 30 == len(out)
    text = "\n".join(out)
    for p in PLACEHOLDERS.values():
        assert text.count(p) == 1, p
    for gone in ("mary.smith", "555", "4111", "93.184", "Too short", QUESTION.lower()[:30]):
        assert gone not in text
    assert "version 1.2.3.4, updated on 2024-01-15, order 12345678." in text  # look-alikes survive
    assert sorted(d for i, d in enumerate(docs[:30]) if i not in (4, 5)) == sorted(d for d in out if "<" not in d)
    assert sum(s["bytes"] for s in meta["splits"].values()) == report["bytes"]["out"]
    assert "quality filter (Gopher): min_words=50 max_words=100000" in se  # thresholds printed
    assert "clean: 35 documents in, 30 out" in se


def test_the_output_is_deterministic_and_unchanged_without_cleaning(corpus, tmp_path):
    pytest.importorskip("datasketch")
    for out in ("a", "b"):
        assert clean_run(corpus, tmp_path / out)[0] == 0
    for name in ("train.bin", "val.bin", "clean_report.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    _, path, _, _ = corpus
    meta = prepare(str(path), str(tmp_path / "plain"), tokenizer="byte", progress=False, block_size=16)
    assert "clean" not in meta and not (tmp_path / "plain" / "clean_report.json").exists()
    assert meta["stats"] == json.loads((tmp_path / "a" / "meta.json").read_text())["stats"]  # the input as read


def test_char_tokenizer_and_tail_split_see_the_scrubbed_text(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text("\n".join(prose(i, 40) for i in range(8)) + "\nmail bob@example.org now\n" + prose(50, 60))
    meta = prepare(str(src), str(tmp_path / "c"), tokenizer="char", progress=False, block_size=8, scrub_pii=True)
    assert meta["split"]["by"] == "tail" and meta["clean"]["pii_replaced"]["email"] == 1
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "c" / "tokenizer.json"))
    ids = np.concatenate([np.fromfile(tmp_path / "c" / f"{s}.bin", np.uint16) for s in ("train", "val")])
    text = tok.decode(ids.tolist())
    assert "mail <EMAIL_ADDRESS> now" in text and "bob@" not in text and "<|unk|>" not in text
    assert sum(s["bytes"] for s in meta["splits"].values()) == len(text.encode())


def test_bad_input_is_named(corpus, tmp_path):
    _, path, evals, _ = corpus
    base = ["prepare", "--input", path, "--out", tmp_path / "x", "--tokenizer", "byte"]
    for extra, msg in (
        (["--decontaminate", evals, tmp_path / "nope.txt"], "--decontaminate .*nope.txt: no such file"),
        (["--dedup", "minhash", "--dedup-threshold", "0"], "--dedup-threshold is a Jaccard similarity between 0 and 1"),
        (["--dedup-threshold", "0.5"], "--dedup-threshold applies to --dedup minhash only"),
        (["--quality-filter", "--quality-threshold", "min_wrods=3"], "min_wrods: no such threshold"),
        (["--quality-filter", "--quality-threshold", "min_words=many"], "min_words=many: must be a non-negative"),
    ):
        rc, _, se = cli(*base, *extra)
        assert rc == 2 and se.startswith("error: "), (extra, se)
        assert __import__("re").search(msg, se), (msg, se)
        assert not (tmp_path / "x").exists()  # refused before anything was written
    rc, _, se = cli(*base, "--quality-filter", "--quality-threshold", "min_words=100000")
    assert rc == 2 and "cleaning removed all 35 documents" in se and "quality -35" in se


CHILD = """
import datasketch.lsh  # a library's code (it imports scipy: about 40 MB) is not data: loaded before the baseline
from scalelm.data.prepare import prepare
""" + MEASURE + """
meta = prepare(sys.argv[1], sys.argv[2], tokenizer="byte", progress=False, dedup="minhash", scrub_pii=True,
               quality_filter=True, decontaminate=[sys.argv[3]])
print(json.dumps({"base_mb": base, "peak_mb": vm("VmHWM"), "meta": meta}))
"""
CORPUS_MB, BUDGET_MB = 100, 50


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_stays_bounded_with_every_step_on(tmp_path):
    """As tests/data/test_data_memory.py, with every cleaning step on, in a corpus twice the budget: what
    grows with the corpus is the MinHash index (about 4 KB a document; 1,600 documents of 64 KB here)."""
    pytest.importorskip("datasketch")
    rng = np.random.default_rng(0)
    vocab = np.array(WORDS + ["".join(rng.choice(list("abcdefghij"), 6)) for _ in range(5000)])
    corpus, written, n_docs = tmp_path / "big.jsonl", 0, 0
    with open(corpus, "w") as f:
        while written < CORPUS_MB << 20:
            words = vocab[rng.integers(0, len(vocab), 9000)]
            words[::5] = vocab[rng.integers(0, 10, len(words[::5]))]  # stop words, as in prose
            line = json.dumps({"text": "\n".join(" ".join(words[i:i + 16]) for i in range(0, len(words), 16))}) + "\n"
            f.write(line)
            written, n_docs = written + len(line), n_docs + 1
    evals = tmp_path / "eval.txt"
    evals.write_text(" ".join(vocab[rng.integers(0, len(vocab), 20_000)]))
    p = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(tmp_path / "out"), str(evals)],
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.splitlines()[-1])
    assert r["meta"]["stats"]["documents"] == n_docs and r["meta"]["clean"]["documents"]["out"] == n_docs
    grew = r["peak_mb"] - r["base_mb"]
    print(f"peak RSS grew by {grew:.0f} MB cleaning {written >> 20} MB")  # shown with -s
    assert 0 < grew < BUDGET_MB <= written / 2 ** 20 / 2, f"peak RSS grew by {grew:.0f} MB cleaning {written >> 20} MB"
