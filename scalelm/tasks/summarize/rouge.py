"""ROUGE-1/2/L/Lsum F1 as Hugging Face ``evaluate``'s ``rouge`` computes it, and the lead-K baseline.

The scores are Google's ``rouge-score`` (the package ``evaluate`` wraps) with the Porter stemmer
(``use_stemmer=True``, as the HF summarization examples call it): lowercased, non-alphanumerics
dropped. ROUGE-Lsum splits a text into sentences at newlines (HF's examples put one sentence per
line first); a subject line or a one-line summary is one sentence, where Lsum equals L.

With several references per example the example's score is ``RougeScorer.score_multi``'s, what
``evaluate`` does with a list of references: for each ROUGE type, the reference with the highest
F1. A corpus score is the mean of the examples' F1, times 100. (``evaluate`` by default reports the
median of 1,000 bootstrap resamples of that mean, which differs from it in the noise only.)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_f1(hyps: Sequence[str], refs: Sequence[Sequence[str]], scorer_=None) -> dict[str, float]:
    """Mean F1 x 100 of each ROUGE type; ``refs[i]``: the references of ``hyps[i]`` (one or more)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
    if not hyps:
        raise ValueError("no example to score")
    sc = scorer_ or scorer()
    total = dict.fromkeys(ROUGE_TYPES, 0.0)
    for h, r in zip(hyps, refs):
        if not r:
            raise ValueError("an example has no reference")
        s = sc.score(r[0], h) if len(r) == 1 else sc.score_multi(list(r), h)
        for k in ROUGE_TYPES:
            total[k] += s[k].fmeasure
    return {k: 100.0 * v / len(hyps) for k, v in total.items()}


def length_stats(texts: Sequence[str]) -> dict:
    """Words (whitespace-separated) per text: mean, median, 95th percentile, min, max; and how many are empty."""
    n = sorted(len(t.split()) for t in texts)
    return {"mean_words": round(statistics.fmean(n), 2), "median_words": statistics.median(n),
            "p95_words": n[min(len(n) - 1, int(0.95 * len(n)))], "min_words": n[0], "max_words": n[-1],
            "empty": sum(1 for k in n if k == 0)}


def lead(sources: Sequence[str], k: int) -> list[str]:
    """The lead-K baseline: the first ``k`` words of each source, as one line."""
    return [" ".join(s.split()[:k]) for s in sources]


def parse_baseline(spec: str) -> int:
    """``lead-K`` -> K."""
    from ...errors import UserError

    name, _, k = spec.partition("-")
    if name != "lead" or not k.isdigit() or int(k) < 1:
        raise UserError(f"--baseline {spec!r}: the baseline is lead-K, the first K words of each source (e.g. lead-8)")
    return int(k)


def report(hyps: Sequence[str], originals: Sequence[str], extra: Sequence[Sequence[str]] | None = None) -> dict:
    """The scores of ``hyps`` against the original references and, when ``extra`` holds more
    references per example, against all of them (original + extra); the length statistics."""
    sc = scorer()
    out = {"rouge": rouge_f1(hyps, [[r] for r in originals], sc)}
    if extra is not None and any(extra):
        out["rouge_all_references"] = rouge_f1(hyps, [[o, *e] for o, e in zip(originals, extra)], sc)
        out["references_per_example"] = round(statistics.fmean(1 + len(e) for e in extra), 2)
    out["hypothesis_lengths"] = length_stats(hyps)
    out["reference_lengths"] = length_stats(originals)
    return out
