"""`--decontaminate FILE...`: a training document sharing a 13-gram with an evaluation file is dropped,
and the report names the file it overlaps."""

import pytest

from scalelm.data.clean import CleanOptions, Cleaner
from scalelm.data.clean.decontam import EvalIndex
from scalelm.errors import UserError

EVAL_A = ("Q: What did the committee decide about the northern railway extension in the spring of 1887?\n"
          "A: It postponed the decision until the surveyors had mapped the marshland near the river.\n")
EVAL_B = "The quick brown fox jumps over the lazy dog while the farmer sleeps under an old oak tree.\n"
FILLER = ("Several travellers arrived at the inn before sunset and asked the keeper for bread, cheese and "
          "a room with a view of the hills. ")


def feed_docs(c: Cleaner, docs):
    for d in docs:
        mid = len(d) // 2
        mid = d.find(" ", mid)
        c.feed(d[:mid], False, len(d[:mid].encode()))  # the overlap may straddle two pieces
        c.feed(d[mid:], True, len(d[mid:].encode()))
    return [c.mask[i] for i in range(len(docs))], c.finish()


@pytest.fixture
def evals(tmp_path):
    a, b = tmp_path / "eval_a.jsonl", tmp_path / "eval_b.txt"
    a.write_text(EVAL_A)
    b.write_text(EVAL_B)
    return a, b


def test_a_planted_evaluation_sentence_is_removed_and_its_file_named(evals):
    a, b = evals
    # the question's 15 words, in other case and punctuation
    planted = FILLER * 3 + "WHAT did the Committee decide about the northern railway-extension, in the spring of 1887? " + FILLER
    twelve = FILLER + "what did the committee decide about the northern railway extension in the" + " " + FILLER
    docs = [FILLER * 4, planted, twelve, FILLER * 2 + "the lazy dog"]
    kept, report = feed_docs(Cleaner(CleanOptions(decontaminate=(str(a), str(b))).check()), docs)
    assert kept == [True, False, True, True]  # 12 shared words are not 13: the third stays
    step = report["steps"][0]
    assert step["step"] == "decontaminate" and step["ngram"] == 13 and step["removed_documents"] == 1
    assert step["files"][0]["file"] == str(a) and step["files"][0]["documents_hit"] == 1
    assert step["files"][1] == {"file": str(b), "ngrams": 18 - 12, "documents_hit": 0}
    ex = step["examples"][0]
    assert ex["document"] == 1 and ex["files"] == [str(a)]
    assert len(ex["ngram"].split()) == 13 and "northern railway extension" in ex["ngram"]


def test_a_document_overlapping_two_files_counts_for_both(evals):
    a, b = evals
    doc = FILLER + EVAL_B.upper() + " and " + EVAL_A
    kept, report = feed_docs(Cleaner(CleanOptions(decontaminate=(str(a), str(b))).check()), [doc, FILLER])
    assert kept == [False, True]
    assert [f["documents_hit"] for f in report["steps"][0]["files"]] == [1, 1]


def test_the_index_keeps_hashes_not_text(tmp_path):
    f = tmp_path / "e.txt"
    f.write_text(" ".join(f"w{i}" for i in range(10_000)))
    idx = EvalIndex([f], chunk_lines=1)
    assert idx.ngrams == [10_000 - 12] and idx.memory_bytes() == (10_000 - 12) * 12


def test_bad_evaluation_files_are_named(tmp_path):
    with pytest.raises(UserError, match="--decontaminate .*missing.txt: no such file"):
        CleanOptions(decontaminate=(str(tmp_path / "missing.txt"),)).check()
    with pytest.raises(UserError, match="not a file"):
        CleanOptions(decontaminate=(str(tmp_path),)).check()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 20)
    with pytest.raises(UserError, match="latin1.txt is not UTF-8"):
        Cleaner(CleanOptions(decontaminate=(str(bad),)).check())
