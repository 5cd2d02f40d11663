"""`--dedup exact|minhash`: planted exact and near duplicates are caught, distinct documents kept."""

import random
import sys

import pytest

from scalelm.data.clean import CleanOptions, Cleaner
from scalelm.errors import UserError

WORDS = ("river stone light quiet garden window morning letter silver forest bridge candle harbor meadow "
         "lantern orchard valley winter summer autumn spring thunder shadow mirror ribbon pocket basket "
         "feather violin marble compass ladder anchor saddle kettle blanket pillow cottage village").split()


def doc(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def near(text: str, changes: int, seed: int = 99) -> str:
    """``text`` with ``changes`` words replaced: of its N 5-grams about 5 * changes differ, a Jaccard
    similarity of (N - 5 changes) / (N + 5 changes)."""
    rng = random.Random(seed)
    w = text.split()
    for i in rng.sample(range(len(w)), changes):
        w[i] = "zebra"
    return " ".join(w)


def run(docs, **options):
    """Feed whole documents (each cut into two pieces, as long ones arrive) to a Cleaner."""
    c = Cleaner(CleanOptions(**options).check())
    for d in docs:
        half = d.find(" ", len(d) // 2)
        for piece, end in ((d[:half], False), (d[half:], True)):
            c.feed(piece, end, len(piece.encode()))
    return [c.mask[i] for i in range(len(docs))], c.finish()


def test_exact_dedup_catches_copies_up_to_case_and_whitespace():
    a, b = doc(1), doc(2)
    copies = [a, b, a, "  " + a.upper().replace(" ", "\n  ", 5) + "\n", near(a, 1)]
    kept, report = run(copies, dedup="exact")
    assert kept == [True, True, False, False, True]  # a near-duplicate is not an exact one
    step = report["steps"][0]
    assert step["method"] == "exact" and step["removed_documents"] == 2
    assert [e["duplicate_of"] for e in step["examples"]] == [0, 0]
    assert report["documents"] == {"in": 5, "out": 3}


def test_minhash_catches_near_duplicates_and_keeps_distinct_documents():
    pytest.importorskip("datasketch")
    base = [doc(i) for i in range(20)]
    planted = [near(base[3], 1), near(base[7], 2, seed=5), base[11]]  # Jaccard about 0.97, 0.94 and 1
    far = near(base[5], 40)  # Jaccard about 0.2: another document
    kept, report = run(base + planted + [far], dedup="minhash")
    assert kept == [True] * 20 + [False, False, False, True]
    step = report["steps"][0]
    assert step["method"] == "minhash" and step["threshold"] == 0.8 and step["bands"] * step["rows"] <= 128
    assert [e["duplicate_of"] for e in step["examples"]] == [3, 7, 11]
    assert step["indexed_documents"] == 21


def test_the_threshold_decides():
    pytest.importorskip("datasketch")
    a = doc(1)
    b = near(a, 12)  # Jaccard about 0.66
    assert run([a, b], dedup="minhash")[0] == [True, True]
    assert run([a, b], dedup="minhash", dedup_threshold=0.3)[0] == [True, False]


def test_short_documents_are_one_shingle():
    pytest.importorskip("datasketch")
    kept, _ = run(["Chapter one", "CHAPTER ONE.", "Chapter two", "chapter one and a half"], dedup="minhash")
    assert kept == [True, False, True, True]


def test_bad_options_are_clear_errors(monkeypatch):
    with pytest.raises(UserError, match="Jaccard similarity between 0 and 1"):
        CleanOptions(dedup="minhash", dedup_threshold=1.5).check()
    with pytest.raises(UserError, match="applies to --dedup minhash only"):
        CleanOptions(dedup="exact", dedup_threshold=0.5).check()
    with pytest.raises(UserError, match="--dedup must be one of exact, minhash"):
        CleanOptions(dedup="fuzzy").check()
    monkeypatch.setitem(sys.modules, "datasketch", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'scalelm\[data\]'"):
        CleanOptions(dedup="minhash").check()
    CleanOptions(dedup="exact").check()  # the core install dedups exactly
