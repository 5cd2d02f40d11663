"""Translating many sources with a ``Generator``: batched, each source on its own budget, every cut reported.

Both translation models (decoder-only and encoder-decoder) hand their tokenized sources here.
Sources are sorted by length and decoded ``batch_size`` at a time (least padding) and answered in
input order. Each source gets the budget it would get alone: ``max_new_tokens`` (default twice its
length + 16: a translation is about as long as its source), at most what its own context has room
for (the generator does not slide the window for a translation). So the output does not depend on
``--batch-size`` or on the neighbours of a source in its batch.

What the context limit did is counted, never hidden: :class:`Translations` (a list of the lines)
carries the indices of the sources cut to fit the context and of the translations that stopped at
the context limit, for a stderr warning and the fields of a JSON summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional


class Translations(list):
    """One translation per source, in input order (a ``list`` of lines, so callers that want only
    the lines use it as one), and what the context limit did to them."""

    def __init__(self, lines: Sequence[str], cut: Sequence[int] = (), stopped: Sequence[int] = (), kept: int = 0):
        super().__init__(lines)
        self.cut = sorted(cut)  # sources longer than the context, cut to their first `kept` tokens
        self.stopped = sorted(stopped)  # translations that ended at the context limit, not at end-of-text
        self.kept = kept

    def summary(self) -> dict:
        """The counts, for a JSON summary."""
        return {"sources_cut": len(self.cut), "stopped_at_context": len(self.stopped)}

    def warning(self, what: str = "translation") -> Optional[str]:
        """One line for stderr when the context limit cut a source or an output (else None); ``what``
        the outputs are called (``summary`` for a summarizer's)."""
        parts = []
        if self.cut:
            n = len(self.cut)
            parts.append(f"{n} source{'s were' if n > 1 else ' was'} longer than the context (cut to "
                         f"{'their' if n > 1 else 'its'} first {self.kept} tokens; line{'s' if n > 1 else ''} "
                         f"{_lines(self.cut)})")
        if self.stopped:
            n = len(self.stopped)
            what = ("summaries" if what == "summary" else what + "s") if n > 1 else what
            parts.append(f"{n} {what} stopped at the context limit (line"
                         f"{'s' if n > 1 else ''} {_lines(self.stopped)})")
        return "warning: " + "; ".join(parts) if parts else None


def _lines(idx: list[int], most: int = 5) -> str:
    """1-based line numbers, the first ``most`` of them."""
    shown = ", ".join(str(i + 1) for i in idx[:most])
    return shown + (f" and {len(idx) - most} more" if len(idx) > most else "")


# the decoding controls (each as Hugging Face's `generate` has it; see scalelm.generate.sampling)
CONTROLS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "length_penalty": 1.0}


def add_decoding_args(g) -> None:
    """``--repetition-penalty``, ``--no-repeat-ngram-size``, ``--min-new-tokens``, ``--length-penalty``
    (of ``scalelm translate``, ``scalelm summarize`` and ``eval --task translate|summarize``)."""
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already in the "
                   "output (CTRL's penalty, as HF's; default 1: off)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                   help="never repeat an N-gram of the output (default 0: off)")
    g.add_argument("--min-new-tokens", type=int, default=0, metavar="N",
                   help="no end-of-text before N tokens (default 0)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="with --beams: a finished beam's score is "
                   "its log-probability / length ** this (> 1 favours longer outputs; default 1)")


def decoding_controls(args) -> dict:
    """The decoding controls of parsed ``args`` (defaults where the command has none)."""
    return {k: getattr(args, k, v) for k, v in CONTROLS.items()}


def translate_rows(gen, tokenizer, rows: Sequence[Optional[list[int]]], beams: int, batch_size: int,
                   max_new_tokens: Optional[int], cut: Sequence[int] = (), kept: int = 0,
                   default_budget: Optional[int] = None, **controls) -> Translations:
    """The translations of ``rows`` (``gen``'s prompts: token ids, None for an empty source, which
    gives ''), greedy or with ``beams`` beams; ``cut``/``kept``: which sources the caller cut to fit.
    ``max_new_tokens``, else ``default_budget`` (a summarizer's), else twice the source + 16.
    ``controls``: :data:`CONTROLS` (the length penalty is the beams')."""
    from ...generate.sampling import SamplingParams

    bad = set(controls) - set(CONTROLS)
    if bad:
        raise TypeError(f"unknown decoding controls {sorted(bad)}")
    ctl = {**CONTROLS, **controls}
    length_penalty = ctl.pop("length_penalty")
    greedy = SamplingParams(temperature=0.0, **ctl).validate()
    out, stopped = [""] * len(rows), []
    todo = sorted((i for i, r in enumerate(rows) if r), key=lambda i: len(rows[i]))
    for lo in range(0, len(todo), batch_size):
        idx = todo[lo:lo + batch_size]
        batch = [rows[i] for i in idx]
        # translations are about as long as their sources; a summarizer knows its own budget
        budgets = [max_new_tokens or default_budget or 2 * len(r) + 16 for r in batch]
        if beams > 1:
            comps = gen.beam_search(batch, num_beams=beams, max_new_tokens=budgets, length_penalty=length_penalty,
                                    **ctl)
        else:
            comps = gen.generate(batch, max_new_tokens=budgets, sampling=greedy, slide=False)
        for i, c in zip(idx, comps):
            out[i] = " ".join(tokenizer.decode(c.tokens).split())  # one line per input line
            if c.stopped_at_context:
                stopped.append(i)
    return Translations(out, cut, stopped, kept)
