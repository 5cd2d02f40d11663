"""`--quality-filter`: a text failing each Gopher rule is dropped by that rule; good text is kept."""

import random

import pytest

from scalelm.data.clean import CleanOptions, Cleaner
from scalelm.data.clean.quality import THRESHOLDS, describe, gopher_verdict, parse_thresholds
from scalelm.errors import UserError

DEFAULTS = parse_thresholds(None)
GOOD = """The old lighthouse keeper walked along the harbour every morning, counting the boats that had
come in with the tide and noting which of them carried the early catch. He had kept this habit for
thirty years, long before the town built its new pier, and the fishermen trusted his notebook more
than the official records. When a storm was coming he would climb the spiral stairs twice, once to
check the lamp and once simply to look at the sky, because he believed that the colour of the clouds
over the western hills told him more than any forecast on the radio. His daughter, who now ran the
bakery near the square, often said that the whole village set its clocks by his evening walk."""

VOCAB = ("harbour lamp morning keeper notebook storm village bakery square evening window river garden "
         "letter candle bridge meadow orchard valley winter summer autumn thunder shadow mirror basket").split()


def prose(n: int, seed: int = 0) -> str:
    """``n`` words of varied sentences with stop words, no repeats to speak of."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        out += [rng.choice(("the", "a", "and", "of")), rng.choice(VOCAB), rng.choice(VOCAB) + rng.choice(",.;"),
                rng.choice(("to", "with", "that")), rng.choice(VOCAB)]
    return " ".join(out[:n])


def lines(k: int, words: int = 12, seed: int = 0) -> list[str]:
    return [prose(words, seed + i) for i in range(k)]


# rule -> a text that fails it (and, under the defaults, no rule checked before it)
BAD = {
    "min_words": "A short note with too few words to be a document.",
    "max_words": prose(200),  # with max_words=150 below
    "min_mean_word_length": " ".join(map(random.Random(1).choice, [["a", "to", "of", "be", "I", "we", "it"]] * 80)),
    "max_mean_word_length": " ".join(["the"] * 3 + ["extraordinarily", "incomprehensibilities", "counterrevolutionary"] * 25),
    "max_symbol_ratio": prose(100) + " " + " ".join(f"#tag{i}" for i in range(15)),
    "max_bullet_lines": "\n".join("- " + x for x in lines(10)),
    "max_ellipsis_lines": "\n".join(x + " ..." for x in lines(8, words=14)),
    "min_alpha_words": prose(60) + " " + " ".join(str(1000 + i) for i in range(30)),
    "min_stop_words": " ".join(w + "s" for w in map(random.Random(2).choice, [VOCAB] * 80)),
    "max_dup_lines": "\n".join(lines(6) + lines(1, seed=0) * 4),
    "max_dup_line_chars": "\n".join(lines(8) + [prose(40, 50)] * 2),
    "max_dup_paragraphs": "\n\n".join(["\n".join(lines(2, seed=i)) for i in range(5)] + ["\n".join(lines(2))] * 3),
    "max_dup_paragraph_chars": "\n\n".join(["\n".join(lines(2, seed=10 * i)) for i in range(9)] + [prose(80, 7)] * 2),
    "max_top_2gram": prose(60) + " " + " ".join(f"green apple {w}" for w in VOCAB[:20]),
    "max_top_3gram": prose(60) + " " + " ".join(f"big green apple {w}" for w in VOCAB[:14]),
    "max_top_4gram": prose(130) + " " + " ".join(f"one big green apple {w}" for w in VOCAB[:12]),
    "max_dup_5gram": prose(150) + " " + prose(60, seed=3) + " " + prose(40, seed=4) + " " + prose(60, seed=3),
}
# max_dup_6gram .. max_dup_10gram: a text failing them fails the 5-gram rule first (see below)


def only(rule: str, **extra) -> dict:
    """Every rule off but ``rule`` (and ``extra``)."""
    t = {k: None for k in THRESHOLDS}
    t[rule] = DEFAULTS[rule]
    t.update(extra)
    return t


def test_good_text_passes_every_rule():
    assert gopher_verdict(GOOD, DEFAULTS) is None
    assert gopher_verdict(prose(300), DEFAULTS) is None


@pytest.mark.parametrize("rule", list(BAD))
def test_a_text_failing_each_rule_is_dropped_by_it(rule):
    """The first rule it fails under the defaults is that rule, and that rule alone catches it."""
    text = BAD[rule]
    t = dict(DEFAULTS, max_words=150) if rule == "max_words" else DEFAULTS
    found = gopher_verdict(text, t)
    assert found is not None and found[0] == rule, (rule, found)
    assert gopher_verdict(text, only(rule, max_words=150) if rule == "max_words" else only(rule))[0] == rule


@pytest.mark.parametrize("n", range(6, 11))
def test_the_longer_repeated_ngram_rules(n):
    # a passage repeated: its n-grams repeat for every n; with the shorter rules off, rule n catches it
    text = prose(150) + " " + prose(60, seed=3) + " " + prose(40, seed=4) + " " + prose(60, seed=3)
    t = dict(DEFAULTS, **{f"max_dup_{m}gram": None for m in range(5, n)})
    assert gopher_verdict(text, t)[0] == f"max_dup_{n}gram"
    assert gopher_verdict(text, dict(t, **{f"max_dup_{m}gram": None for m in range(n, 11)})) is None


def test_streamed_documents_get_the_same_verdicts_as_whole_ones():
    docs = [GOOD, BAD["min_stop_words"], BAD["max_bullet_lines"], BAD["max_dup_lines"], BAD["max_top_2gram"]]
    c = Cleaner(CleanOptions(quality_filter=True).check())
    for d in docs:
        pieces = d.split("\n")
        for i, p in enumerate(pieces):  # one piece per line, as a reader cuts a long document
            text = p + ("\n" if i < len(pieces) - 1 else "")
            c.feed(text, i == len(pieces) - 1, len(text.encode()))
    report = c.finish()
    assert [c.mask[i] for i in range(len(docs))] == [True, False, False, False, False]
    step = report["steps"][0]
    assert step["by_rule"] == {"max_bullet_lines": 1, "max_dup_lines": 1, "max_top_2gram": 1, "min_stop_words": 1}
    assert step["thresholds"] == DEFAULTS
    ex = step["examples"][0]
    assert ex["document"] == 1 and ex["rule"] == "min_stop_words" and ex["threshold"] == 2 and ex["text"]


def test_a_document_over_max_words_is_not_held():
    c = Cleaner(CleanOptions(quality_filter=True, quality_thresholds=["max_words=100"]).check())
    q = c.filters[0]
    for i in range(10):
        c.feed(prose(50, i) + "\n", False, 0)
        assert sum(map(len, q.parts)) < 2000  # dropped once over the cap, not kept to the end
    c.feed("end\n", True, 4)
    assert c.finish()["steps"][0]["by_rule"] == {"max_words": 1}


def test_thresholds_are_settable_and_checked():
    t = parse_thresholds(["min_words=10", "max_dup_5gram=off", "min_alpha_words=0.5"])
    assert t["min_words"] == 10 and t["max_dup_5gram"] is None and t["min_alpha_words"] == 0.5
    assert "min_words=10 " in describe(t) and "max_dup_5gram=off" in describe(t)
    assert gopher_verdict(BAD["min_words"], parse_thresholds({"min_words": 5})) is None
    for bad, msg in (("min_wrds=3", "no such threshold"), ("min_words", "write NAME=VALUE"),
                     ("min_alpha_words=1.5", "a share between 0 and 1"), ("max_words=-1", "non-negative"),
                     ("max_top_2gram=nan", "a share")):
        with pytest.raises(UserError, match=msg):
            parse_thresholds([bad])
    with pytest.raises(UserError, match="add --quality-filter"):
        CleanOptions(quality_thresholds=["min_words=3"]).check()
