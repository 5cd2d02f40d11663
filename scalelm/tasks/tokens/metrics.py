"""Tag predictions and scores: per-word logits from windows, seqeval entity scores or token accuracy,
the loss, and the Trainer's ``evaluate_fn``.

A tagset with spans is scored per entity by ``seqeval`` (``mode="strict"``, ``scheme=IOB2``: an
entity counts only when its type and both ends match, and a predicted ``I-X`` that continues no
entity is no entity): precision, recall and F1 per type and micro-averaged. Every tagset also gets
token accuracy over words (POS tagging's figure). Each word is predicted at its first subword; a span
tagset's sentence is decoded as the most probable valid IOB2 sequence (Viterbi, :func:`tags_of`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...model.loss import IGNORE_INDEX
from ..classify.metrics import batched_logits
from .align import WordEncoder
from .schemes import has_spans, split_tag


def word_logits(model: nn.Module, enc: WordEncoder, words: list[list[str]], batch_size: int, device,
                autocast: Callable = contextlib.nullcontext) -> list[list[Optional[torch.Tensor]]]:
    """fp32 logits ``(n_labels,)`` of every word of every sentence (None: a word with no subword)."""
    wins = enc.windows(words)
    out: list[list[Optional[torch.Tensor]]] = [[None] * len(ws) for ws in words]
    for sel, logits in batched_logits(model, [w.ids for w in wins], batch_size, enc.fill_id, device, autocast):
        for r, i in enumerate(sel):
            w = wins[i]
            for k, pos in enumerate(w.first):
                if pos >= 0:
                    out[w.sent][w.word0 + k] = logits[r, pos]
    return out


def tags_of(logits: list[list[Optional[torch.Tensor]]], names: list[str], fallback: str) -> list[list[str]]:
    """Each sentence's tags: for a span tagset the most probable *valid* IOB2 sequence (an ``I-X`` only
    after ``B-X`` or ``I-X``), else each word's most probable tag."""
    if not has_spans(names):
        return [[names[int(x.argmax())] if x is not None else fallback for x in sent] for sent in logits]
    allowed, start = _iob2_transitions(names)
    return [[names[i] if x is not None else fallback for i, x in zip(_viterbi(sent, names, fallback, allowed, start), sent)]
            for sent in logits]


def _iob2_transitions(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``allowed[prev, cur]`` and ``start[cur]``: an ``I-X`` continues only ``B-X`` or ``I-X``."""
    kinds = [split_tag(n) for n in names]
    allowed = np.array([[c[0] != "I" or (p[0] in ("B", "I") and p[1] == c[1]) for c in kinds] for p in kinds])
    return allowed, np.array([c[0] != "I" for c in kinds])


def _viterbi(sent: list[Optional[torch.Tensor]], names: list[str], fallback: str, allowed: np.ndarray,
             start: np.ndarray) -> list[int]:
    """Per-word argmax would write ``O I-MISC`` or ``B-PER I-ORG``, which strict IOB2 scoring counts as no
    entity: decode the best sequence the scheme allows instead (the log-probabilities summed over words).
    A word with no subword is held at ``fallback``."""
    if not sent:
        return []
    neg = -1e9
    fixed = np.where(np.array(names) == fallback, 0.0, neg) if fallback in names else np.zeros(len(names))
    scores = np.stack([F.log_softmax(x.float(), -1).numpy() if x is not None else fixed for x in sent])
    trans = np.where(allowed, 0.0, neg)
    dp, back = scores[0] + np.where(start, 0.0, neg), []
    for row in scores[1:]:
        cand = dp[:, None] + trans  # (prev, cur)
        b = cand.argmax(0)
        back.append(b)
        dp = cand[b, np.arange(len(names))] + row
    path = [int(dp.argmax())]
    for b in reversed(back):
        path.append(int(b[path[-1]]))
    return path[::-1]


def loss_of(logits: list[list[Optional[torch.Tensor]]], gold: list[list[int]]) -> float:
    """Mean cross-entropy over the words that have a subword (what training minimises)."""
    rows = [(x, y) for sent, ys in zip(logits, gold) for x, y in zip(sent, ys) if x is not None]
    if not rows:
        return float("nan")
    return float(F.cross_entropy(torch.stack([x for x, _ in rows]), torch.tensor([y for _, y in rows])))


def scores(gold: list[list[str]], pred: list[list[str]], spans: bool) -> dict:
    """Token accuracy, and (``spans``) seqeval's strict IOB2 entity scores: micro P/R/F1 and per type;
    else per-tag precision/recall/F1 over words."""
    n = sum(len(g) for g in gold)
    right = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    out: dict = {"accuracy": right / n if n else float("nan"), "words": n, "sentences": len(gold)}
    if spans:
        from seqeval.metrics import classification_report
        from seqeval.scheme import IOB2

        rep = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
        micro = rep.pop("micro avg")
        out.update(precision=float(micro["precision"]), recall=float(micro["recall"]), f1=float(micro["f1-score"]),
                   entities=int(micro["support"]))
        out["per_type"] = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                               "f1": float(v["f1-score"]), "support": int(v["support"])}
                           for k, v in sorted(rep.items()) if not k.endswith(" avg")}
    else:
        from sklearn.metrics import precision_recall_fscore_support

        g = [t for s in gold for t in s]
        p = [t for s in pred for t in s]
        tags = sorted(set(g))
        pr, rc, f1, sup = precision_recall_fscore_support(g, p, labels=tags, zero_division=0)
        out["per_tag"] = {t: {"precision": float(pr[i]), "recall": float(rc[i]), "f1": float(f1[i]),
                              "support": int(sup[i])} for i, t in enumerate(tags)}
    return out


def tokens_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of the head's logits at the labelled positions (fp32): the Trainer's ``loss_fn``."""
    idx, valid, y = batch
    logits = model(idx, valid).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)


def make_evaluate_fn(enc: WordEncoder, words: list[list[str]], gold: list[list[str]], names: list[str],
                     fallback: str, spans: bool, batch_size: int):
    """``evaluate_fn(trainer)`` on the whole validation set: ``{f1 (spans), accuracy, loss}``. Every
    rank scores all of it (the same forward passes on each, so a sharded model's collectives match)."""
    index = {n: i for i, n in enumerate(names)}
    gold_ids = [[index[t] for t in s] for s in gold]

    def evaluate_fn(trainer) -> dict:
        logits = word_logits(trainer.model, enc, words, batch_size, trainer.device, trainer.autocast)
        s = scores(gold, tags_of(logits, names, fallback), spans)
        out = {"accuracy": s["accuracy"], "loss": loss_of(logits, gold_ids)}
        if spans:
            out["f1"] = s["f1"]
        return out

    return evaluate_fn
